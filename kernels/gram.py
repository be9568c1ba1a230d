"""The Gram matrix G = X X^T of k gradient rows, in one pass over the gradients.

`gram(grads)` takes a [k, P] tensor (rows may be strided, columns must be contiguous) or a
list of [k, P_j] shards whose Gram matrices add up, in any float dtype, and returns a
float32 [k, k] symmetric matrix. Every gradient element is read from memory once: all
k(k+1)/2 products of a block of P are formed while the block is on chip, never as k^2
separate dot products and never after stacking the rows into a new buffer.

Device paths, both behind the one op name `mofast::gram`:
    CPU   native C++ (kernels/csrc/gram.cpp): OpenMP over blocks of P, fp32 products per
          block, float64 accumulation across blocks.
    CUDA  the Triton kernels below: a persistent pass in which each program walks groups
          of tiles, forms each tile's products in fp32 (one tl.dot of the tile with its
          transpose, on the tensor cores for bf16/fp16; a broadcast product for fp32 with
          k <= 8) and adds each group (each tile, for tl.dot) into a float64 partial;
          then a deterministic float64 sum of the partials. No atomics, no host
          synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["gram", "MAX_K"]

# The Triton path keeps a [K_PAD, K_PAD] accumulator per program in registers; 64 is the
# largest k it handles. The CPU path has no such limit.
MAX_K = 64

# Elements of P that one group covers: the broadcast path's products are summed in fp32
# before they are added to the float64 partial, so this bounds the length of its fp32 sums
# (the tl.dot paths go to float64 after every tile instead).
_GROUP_ELEMS = 8192

# (BLOCK, num_warps) of the [K_PAD, BLOCK] tile, per product path and K_PAD: the largest
# tiles that compiled for sm_90 without spilling registers (cuobjdump -res-usage). On the
# tensor cores at most 128 columns, so that a tile's truncating fp32 chain stays at most 8
# steps (BLOCK / 16) long.
_TILES_MMA = {16: (128, 4), 32: (128, 4), 64: (64, 8)}  # bf16/fp16 on the tensor cores
_TILES_FMA = {16: (256, 4), 32: (32, 8), 64: (32, 8)}  # fp32 tl.dot, IEEE precision
_TILES_BROADCAST = {1: (1024, 4), 2: (1024, 4), 4: (512, 4), 8: (512, 8)}  # fp32, k <= 8

# Rows of partials summed per step of the reduction.
_REDUCE_ROWS = 64

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@triton.jit
def _gram_partial_kernel(
    # pointers
    x_ptr,  # [k, P] one shard, column stride 1, row stride stride_row
    partial_ptr,  # [num_programs, K_PAD, K_PAD] float64, this launch's slice
    # sizes
    k,
    P,
    num_groups,
    # strides
    stride_row,
    # constexpr
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    DOT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)

    rows = tl.arange(0, K_PAD)
    row_mask = rows < k
    # int64 row offsets: k * stride_row can pass 2^31 for billion-parameter models.
    row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_row  # [K_PAD, 1]
    cols = tl.arange(0, BLOCK)

    total = tl.zeros((K_PAD, K_PAD), dtype=tl.float64)
    for group in range(pid, num_groups, num_programs):
        acc = tl.zeros((K_PAD, K_PAD), dtype=tl.float32)
        group_start = tl.cast(group, tl.int64) * (BLOCK * TILES)
        for t in range(TILES):
            offs = group_start + t * BLOCK + cols  # [BLOCK]
            mask = row_mask[:, None] & (offs < P)[None, :]
            tile = tl.load(row_ptrs + offs[None, :], mask=mask, other=0.0)  # [K_PAD, BLOCK]
            if not DOT:
                # Small k in fp32/fp64: tl.dot would pad k to 16 and spend 16^2 FMAs per
                # column on the CUDA cores; the broadcast product spends K_PAD^2.
                x = tile.to(tl.float32)
                acc += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
            elif UPCAST:
                # The FMA dot sums each entry in one sequential fp32 chain; restarting it
                # every tile keeps that chain BLOCK long instead of a whole group.
                tile = tile.to(tl.float32)
                total += tl.dot(tile, tl.trans(tile), input_precision="ieee").to(tl.float64)
            else:
                # Products of two bf16/fp16 values are exact, but the tensor cores truncate
                # each fp32 partial sum: chained over a whole group that biases the diagonal
                # low by ~1e-5. Each tile's dot starts from zero and goes to float64 at once,
                # so a chain is BLOCK / 16 steps long.
                total += tl.dot(tile, tl.trans(tile)).to(tl.float64)
        total += acc.to(tl.float64)

    out_rows = tl.arange(0, K_PAD)
    out_ptrs = partial_ptr + pid * K_PAD * K_PAD + out_rows[:, None] * K_PAD + out_rows[None, :]
    tl.store(out_ptrs, total)


@triton.jit
def _gram_reduce_kernel(
    # pointers
    partial_ptr,  # [num_partials, K_PAD, K_PAD] float64
    out_ptr,  # [k, k] float32
    # sizes
    k,
    num_partials,
    # constexpr
    K_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    # One program per row i of G. Entry (i, j) is read from the upper triangle of every
    # partial, so G comes out exactly symmetric whatever order the dots summed in.
    i = tl.program_id(0)
    j = tl.arange(0, K_PAD)
    src = tl.minimum(i, j) * K_PAD + tl.maximum(i, j)  # [K_PAD]
    r = tl.arange(0, ROWS)

    total = tl.zeros((K_PAD,), dtype=tl.float64)
    for start in range(0, num_partials, ROWS):
        n = start + r  # [ROWS]
        # int64: each non-empty shard adds a partial, and many shards times K_PAD^2 can
        # pass 2^31.
        rows = n.to(tl.int64)[:, None] * (K_PAD * K_PAD)
        ptrs = partial_ptr + rows + src[None, :]  # [ROWS, K_PAD]
        vals = tl.load(ptrs, mask=(n < num_partials)[:, None], other=0.0)
        total += tl.sum(vals, axis=0)

    tl.store(out_ptr + i * k + j, total.to(tl.float32), mask=j < k)


def _check_shards(grads: torch.Tensor | Sequence[torch.Tensor], op: str) -> list[torch.Tensor]:
    """The shards as a list of [k, P_j] tensors on one device, or a clear error."""
    if isinstance(grads, torch.Tensor):
        shards = [grads]
    elif isinstance(grads, Sequence) and all(isinstance(g, torch.Tensor) for g in grads):
        shards = list(grads)
    else:
        raise TypeError(f"{op}: grads must be a [k, P] tensor or a list of them")
    if not shards:
        raise ValueError(f"{op}: needs at least one [k, P] shard, got an empty list")

    k = shards[0].shape[0] if shards[0].dim() == 2 else None
    device = shards[0].device
    for s, shard in enumerate(shards):
        if shard.dim() != 2:
            raise ValueError(f"{op}: shard {s} must be 2-D [k, P], got shape {tuple(shard.shape)}")
        if shard.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{op}: shard {s} has dtype {shard.dtype}; supported are float32, float64, "
                "float16 and bfloat16"
            )
        if shard.device != device:
            raise ValueError(f"{op}: shard {s} is on {shard.device}, shard 0 on {device}")
        if shard.shape[0] != k:
            raise ValueError(
                f"{op}: all shards need the same k; shard 0 has {k} rows, shard {s} has "
                f"{shard.shape[0]}"
            )
        if shard.shape[1] > 1 and shard.stride(1) != 1:
            raise ValueError(
                f"{op}: shard {s} must have unit column stride (rows may be strided), got "
                f"strides {shard.stride()}"
            )
    if k == 0:
        raise ValueError(f"{op}: needs k >= 1 gradient rows, got 0")
    return shards


def _needs_upcast(dtype: torch.dtype) -> bool:
    """Whether the tile goes through tl.dot as fp32 (exact, no tensor-core TF32 rounding).

    fp16 and bf16 tiles go to the tensor cores as they are, except under the Triton
    interpreter, which multiplies bf16 bit patterns as integers in tl.dot
    (triton-lang/triton#11584); there the tile is upcast first, which gives the same
    fp32 products.
    """
    if dtype == torch.float16:
        return False
    if dtype == torch.bfloat16:
        return isinstance(_gram_partial_kernel, InterpretedFunction)
    return True


def _programs_per_shard(device: torch.device, groups: list[int]) -> list[int]:
    """Programs to launch for each shard, given how many groups of columns each has.

    On a GPU a few programs per SM keep enough loads in flight; more would only add
    partials. That budget is shared among the shards in proportion to their size, so many
    shards do not multiply the partials. Elsewhere (the interpreter) one program per group.
    """
    if device.type != "cuda":
        return list(groups)
    budget = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    total = max(sum(groups), 1)
    return [min(n, max(1, budget * n // total)) if n else 0 for n in groups]


def _gram_triton(
    shards: torch.Tensor | Sequence[torch.Tensor], *, max_programs: int | None = None
) -> torch.Tensor:
    """Launch the Triton Gram kernels on `shards`; float32 [k, k].

    Used for CUDA tensors; tests call it on CPU tensors under TRITON_INTERPRET=1.
    `max_programs` caps the programs per shard (tests use it to make programs walk
    several groups).
    """
    shards = _check_shards(shards, "gram")
    k = shards[0].shape[0]
    device = shards[0].device
    if k > MAX_K:
        raise ValueError(
            f"gram: the Triton kernel supports k <= {MAX_K} gradient rows, got k = {k}"
        )

    # One K_PAD for every shard, since their partials are summed together: the broadcast
    # product when no shard can use the tensor cores and k is small, tl.dot otherwise.
    tensor_cores = any(shard.dtype in (torch.float16, torch.bfloat16) for shard in shards)
    use_dot = tensor_cores or k > 8
    k_pad = max(16, triton.next_power_of_2(k)) if use_dot else triton.next_power_of_2(k)

    groups = [triton.cdiv(shard.shape[1], _GROUP_ELEMS) for shard in shards]
    launches = []
    for shard, num_groups, programs in zip(
        shards, groups, _programs_per_shard(device, groups), strict=True
    ):
        if max_programs is not None:
            programs = min(programs, max_programs)
        if programs > 0:
            launches.append((shard, num_groups, programs))

    out = torch.empty((k, k), dtype=torch.float32, device=device)
    num_partials = sum(programs for _, _, programs in launches)
    partial = torch.empty((max(num_partials, 1), k_pad, k_pad), dtype=torch.float64, device=device)
    if num_partials == 0:
        # Every shard is empty (P = 0): the Gram of empty rows is zero.
        partial.zero_()
        num_partials = 1

    offset = 0
    for shard, num_groups, programs in launches:
        if not use_dot:
            block, num_warps = _TILES_BROADCAST[k_pad]
        elif shard.dtype in (torch.float16, torch.bfloat16):
            block, num_warps = _TILES_MMA[k_pad]
        else:
            block, num_warps = _TILES_FMA[k_pad]
        _gram_partial_kernel[(programs,)](
            x_ptr=shard,
            partial_ptr=partial[offset:],
            k=k,
            P=shard.shape[1],
            num_groups=num_groups,
            stride_row=shard.stride(0),
            K_PAD=k_pad,
            BLOCK=block,
            TILES=_GROUP_ELEMS // block,
            DOT=use_dot,
            UPCAST=_needs_upcast(shard.dtype),
            num_warps=num_warps,
        )
        offset += programs

    _gram_reduce_kernel[(k,)](
        partial_ptr=partial,
        out_ptr=out,
        k=k,
        num_partials=num_partials,
        K_PAD=k_pad,
        ROWS=_REDUCE_ROWS,
    )
    return out


def _gram_fake(shards: list[torch.Tensor]) -> torch.Tensor:
    k = shards[0].shape[0]
    return shards[0].new_empty((k, k), dtype=torch.float32)


_LIB = torch.library.Library("mofast", "IMPL")
_LIB.impl("gram", _gram_triton, "CUDA")
torch.library.register_fake("mofast::gram", _gram_fake, lib=_LIB)


def gram(grads: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The float32 [k, k] Gram matrix of the gradient rows, G[i, j] = <g_i, g_j>.

    grads: a [k, P] tensor (rows may be strided, column stride 1), or a list of [k, P_j]
        shards (parameter groups) whose Gram matrices add up; float32, float64, float16 or
        bfloat16. CUDA tensors run the Triton kernels (k <= MAX_K), CPU tensors the native
        C++ op. Never synchronises with the host; a NaN or inf gradient gives non-finite
        entries. Not differentiable: G never requires grad, whatever grads do.
    """
    shards = _check_shards(grads, "gram")

    # The op has no autograd kernel: outside no_grad, G of a tensor that requires grad
    # would carry a grad_fn whose backward silently leaves the gradient unset.
    with torch.no_grad():
        return torch.ops.mofast.gram.default(shards)
