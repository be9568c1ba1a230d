"""The combined update direction d = sum_i c_i g_i, in one pass over the gradients.

`combine(grads, c, out=None)` reads every gradient element once, accumulates in fp32
(fp64 for fp64 gradients) and writes d once, in out's dtype, into `out` when it is given
(for example the parameters' flat .grad, whose dtype may differ from the gradients').

Device paths, both behind the one op name `mofast::combine`:
    CPU   native C++ (kernels/csrc/combine.cpp): OpenMP over blocks of P, simd inner loops.
    CUDA  the Triton kernel below: one program per tile of P, the weights loaded once per
          program, the k rows summed in registers and the tile stored in out's dtype.
Neither path synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["combine"]

# Columns of P per program, and rows loaded per step: a [ROWS, BLOCK] tile in registers.
_BLOCK = 1024
_MAX_ROWS = 8


@triton.jit
def _round_to_bf16(x):
    # fp32 -> bf16 with round-to-nearest-even on the bits, what the GPU's conversion does;
    # the Triton interpreter's own conversion truncates.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _combine_kernel(
    # pointers
    grads_ptr,  # [k, P] column stride 1, row stride stride_row
    weights_ptr,  # [k] any float dtype, stride stride_w
    out_ptr,  # [P] contiguous, in the output dtype
    # sizes
    k,
    P,
    # strides
    stride_row,
    stride_w,
    # constexpr
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.cast(pid, tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    col_mask = cols < P
    r = tl.arange(0, ROWS)

    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for start in range(0, k, ROWS):
        rows = start + r  # [ROWS]
        row_mask = rows < k
        w = tl.load(weights_ptr + rows * stride_w, mask=row_mask, other=0.0)  # [ROWS]
        w = w.to(ACC_DTYPE)
        ptrs = grads_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)  # [ROWS, BLOCK]
        acc += tl.sum(x * w[:, None], axis=0)

    # Narrow outputs are rounded from fp32, as the CPU path does (the interpreter has no
    # direct fp64 -> bf16 conversion).
    if out_ptr.dtype.element_ty != tl.float64:
        acc = acc.to(tl.float32)
    if BF16_BY_BITS:
        result = _round_to_bf16(acc)
    else:
        result = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + cols, result, mask=col_mask)


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_grads(grads: torch.Tensor, name: str = "grads") -> None:
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"combine: {name} must be a [k, P] tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"combine: {name} must be 2-D [k, P], got shape {tuple(grads.shape)}")
    if grads.shape[0] == 0:
        raise ValueError(f"combine: {name} needs k >= 1 gradient rows, got 0")
    if grads.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"combine: {name} has dtype {grads.dtype}; supported are float32, float64, "
            "float16 and bfloat16"
        )
    if grads.shape[1] > 1 and grads.stride(1) != 1:
        raise ValueError(
            f"combine: {name} must have unit column stride (rows may be strided), got "
            f"strides {grads.stride()}"
        )


def _check_combine(grads: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    _check_grads(grads)
    k, P = grads.shape
    if weights.shape != (k,):
        raise ValueError(
            f"combine: weights must have shape [k] = [{k}], got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"combine: weights must be floating point, got {weights.dtype}")
    if out.shape != (P,):
        raise ValueError(f"combine: out must have shape [P] = [{P}], got {tuple(out.shape)}")
    if out.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"combine: out has dtype {out.dtype}; supported are float32, float64, float16 and "
            "bfloat16"
        )
    if P > 1 and out.stride(0) != 1:
        raise ValueError(f"combine: out must be contiguous, got stride {out.stride(0)}")
    if weights.device != grads.device or out.device != grads.device:
        raise ValueError(
            f"combine: grads, weights and out must be on one device, got {grads.device}, "
            f"{weights.device} and {out.device}"
        )
    if out.requires_grad:
        raise ValueError(
            "combine: out requires grad; combine is not differentiable and cannot write "
            "into a tensor that autograd tracks (pass a .grad buffer or a detached tensor)"
        )
    _check_overlap(grads, out)


def _check_overlap(grads: torch.Tensor, out: torch.Tensor) -> None:
    """out may be exactly one row of grads, or apart from them, but not partly over them.

    Blocks of P are written as soon as they are summed; a partial overlap would let one
    block's result land in gradients that another block has not read yet. Only pointers
    are compared, so nothing waits for the device.
    """
    k, P = grads.shape
    if P == 0:
        return
    size = grads.element_size()
    row_bytes = P * size
    step = grads.stride(0) * size
    first = grads.data_ptr()
    begin = first + min(0, (k - 1) * step)
    end = first + max(0, (k - 1) * step) + row_bytes
    out_begin = out.data_ptr()
    out_end = out_begin + P * out.element_size()
    if out_end <= begin or end <= out_begin:
        return

    for i in range(k):
        row_begin = first + i * step
        if out_begin < row_begin + row_bytes and row_begin < out_end:
            if row_begin == out_begin and out.dtype == grads.dtype:
                continue
            raise ValueError(
                f"combine: out overlaps gradient row {i} without being that row; it must be "
                "exactly one row of grads (same start and dtype) or apart from them"
            )


def _combine_triton(grads: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """Launch the Triton combine kernel: out <- sum_i weights[i] * grads[i].

    Used for CUDA tensors; tests call it on CPU tensors under TRITON_INTERPRET=1.
    """
    _check_combine(grads, weights, out)
    k, P = grads.shape
    if P == 0:
        return

    rows = min(_MAX_ROWS, triton.next_power_of_2(k))
    acc_dtype = tl.float64 if grads.dtype == torch.float64 else tl.float32
    _combine_kernel[(triton.cdiv(P, _BLOCK),)](
        grads_ptr=grads,
        weights_ptr=weights,
        out_ptr=out,
        k=k,
        P=P,
        stride_row=grads.stride(0),
        stride_w=weights.stride(0),
        ROWS=rows,
        BLOCK=_BLOCK,
        ACC_DTYPE=acc_dtype,
        BF16_BY_BITS=out.dtype == torch.bfloat16
        and isinstance(_combine_kernel, InterpretedFunction),
        num_warps=4,
    )


def _combine_fake(grads: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    return None


_LIB = torch.library.Library("mofast", "IMPL")
_LIB.impl("combine", _combine_triton, "CUDA")
torch.library.register_fake("mofast::combine", _combine_fake, lib=_LIB)


def _weights_for(c: torch.Tensor | Sequence[float], grads: torch.Tensor) -> torch.Tensor:
    # A tensor on another device is refused, since moving it to the host would wait for the
    # device. A Python sequence is uploaded: to a GPU through pinned memory, since a copy
    # from pageable memory synchronises the stream (and fails under sync debug mode "error").
    if isinstance(c, torch.Tensor) and c.device != grads.device:
        raise ValueError(f"combine: c is on {c.device}, grads on {grads.device}")
    if isinstance(c, torch.Tensor) or grads.device.type == "cpu":
        weights = torch.as_tensor(c, device=grads.device)
    else:
        weights = torch.as_tensor(c).pin_memory().to(grads.device, non_blocking=True)
    if not weights.is_floating_point():
        raise TypeError(f"combine: c must be floating point, got {weights.dtype}")
    if weights.shape != grads.shape[:1]:
        raise ValueError(
            f"combine: c must have shape [k] = [{grads.shape[0]}], got {tuple(weights.shape)}"
        )
    return weights.to(torch.float32)


def _combine_one(
    grads: torch.Tensor, c: torch.Tensor | Sequence[float], out: torch.Tensor | None
) -> torch.Tensor:
    _check_grads(grads)
    if out is None:
        out = torch.empty(grads.shape[1:], dtype=grads.dtype, device=grads.device)
    weights = _weights_for(c, grads)
    _check_combine(grads, weights, out)
    torch.ops.mofast.combine.default(grads, weights, out)
    return out


def combine(
    grads: torch.Tensor | Sequence[torch.Tensor],
    c: torch.Tensor | Sequence[float],
    out: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """d = sum_i c[i] * grads[i], accumulated in fp32 and written in out's dtype.

    grads: a [k, P] tensor (rows may be strided, column stride 1) or a list of [k, P_j]
        shards; float32, float64, float16 or bfloat16.
    c: the k mixing coefficients: a tensor on grads' device (any float dtype), or a sequence
        of floats, uploaded without a host synchronisation (inside a CUDA graph capture,
        pass a device tensor).
    out: None (a new [P] tensor in grads' dtype), a contiguous [P] tensor of any float dtype
        that does not require grad, to write into (it may be exactly one row of grads; any
        other overlap with grads is refused), or for a list of shards a list of them.
    Returns out, or the list of outs for a list of shards. fp64 gradients accumulate in
    fp64. CUDA tensors run the Triton kernel, CPU tensors the native C++ op; no host
    synchronisation either way.
    """
    if isinstance(grads, torch.Tensor):
        if out is not None and not isinstance(out, torch.Tensor):
            raise TypeError("combine: for a [k, P] tensor, out must be a tensor or None")
        return _combine_one(grads, c, out)

    if not isinstance(grads, Sequence) or not grads:
        raise TypeError("combine: grads must be a [k, P] tensor or a non-empty list of them")
    shards = list(grads)
    for s, shard in enumerate(shards):
        _check_grads(shard, f"shard {s}")
        if shard.shape[0] != shards[0].shape[0] or shard.device != shards[0].device:
            raise ValueError(
                f"combine: all shards need the same k and device; shard 0 is "
                f"{tuple(shards[0].shape)} on {shards[0].device}, shard {s} "
                f"{tuple(shard.shape)} on {shard.device}"
            )
    if out is None:
        outs = [None] * len(shards)
    elif isinstance(out, torch.Tensor) or len(out) != len(shards):
        raise TypeError(
            f"combine: for a list of {len(shards)} shards, out must be a list of as many"
        )
    else:
        outs = list(out)
    weights = _weights_for(c, shards[0])
    return [_combine_one(g, weights, o) for g, o in zip(shards, outs, strict=True)]
