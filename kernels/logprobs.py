"""Fused DPO sequence log-probabilities: sum_t log softmax(h_t W^T + b)[y_t] per row.

Materialising the logits costs N x T x V floats (10 GB in fp32 at 16 rows, 1024 tokens and
a 151,936-token vocabulary). Here they are computed a chunk at a time and never held
whole. The forward keeps a running log-sum-exp over vocabulary chunks in float32 plus the
target logit; the backward recomputes each chunk's logits, forms
g_n * (onehot(y_t) - softmax(z_t)) in place of anything of size V per token, and feeds it to
the two gradient products. Ignored tokens are moved out of the way first, so they cost no
vocabulary work.

Layers: Triton kernels (`_logprobs_fwd_kernel`, `_logprobs_bwd_dlogits_kernel`,
`_logprobs_bwd_dhidden_kernel`, `_logprobs_bwd_dweight_kernel`) -> launchers
(`_forward_triton`, `_backward_triton`) beside the chunked torch path for the CPU
(`_forward_torch`, `_backward_torch`) -> one autograd Function (`_SequenceLogprobs`) ->
the public `sequence_logprobs`, which picks Triton for CUDA tensors and torch otherwise.

Neither path reads a tensor on the host. The CUDA path sorts the counted tokens to the
front and lets each program read the count from device memory, so blocks past it stop at
once; the CPU path gathers the counted tokens with a boolean index, which on the CPU reads
memory that is already there.
"""

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@dataclass(frozen=True)
class Tiling:
    """How the work is cut. The CPU defaults were measured on 2 cores; the CUDA tiles are
    conventional sizes for bf16 on recent GPUs, not yet tuned on one.

    chunk_elements bounds the logits (or their gradient) held at once: tokens x vocabulary
    entries of one chunk. token_chunk and vocab_chunk cap the tokens and the vocabulary
    entries of a CPU chunk: the hidden gradient sums a chunk's vocabulary in one float32
    product, and some BLAS builds add its terms one by one (MKL on AMD EPYC: the hidden
    gradient 1e-6 from float64 with 2,048 entries a chunk, 2.7e-5 with all 151,936 in one
    product; tests/test_logprobs.py checks 1e-5). block_* are the Triton tile sizes
    (powers of two, at least 16); splits is how many vocabulary ranges the forward's
    programs share a token block between (None: enough to fill the device).
    """

    chunk_elements: int = 1 << 22
    token_chunk: int = 4096
    vocab_chunk: int = 2048
    block_m: int = 64
    block_v: int = 128
    block_k: int = 64
    block_h: int = 64
    splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3


CPU_TILING = Tiling()
CUDA_TILING = Tiling(chunk_elements=1 << 26)
# Three pipeline stages of float64 tiles need 240 KiB of shared memory in the forward, past
# sm_90's 227 KiB per block (Triton refuses the launch); two need 144 KiB.
CUDA_TILING_FLOAT64 = Tiling(chunk_elements=1 << 26, num_stages=2)


def default_tiling(backend: str, dtype: torch.dtype) -> Tiling:
    """The tiling that `sequence_logprobs` uses for this path and dtype."""
    if backend != "triton":
        return CPU_TILING
    return CUDA_TILING_FLOAT64 if dtype == torch.float64 else CUDA_TILING


# Enough programs in the forward grid to keep every streaming multiprocessor of a large GPU
# busy several times over when there are few token blocks.
_TARGET_PROGRAMS = 1024


# ---------------------------------------------------------------------------------------
#  Triton kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # libdevice's tanh has no interpreter implementation; exp of a non-positive argument
    # cannot overflow, and the absolute error stays at float32 rounding.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "upcast":
        # Triton's interpreter multiplies bf16 operands as their raw 16-bit patterns; their
        # products are exact in float32, so float32 operands give the same result. float64
        # operands come here too: tl.dot has no float64 x float64 -> float32 form for the
        # GPU, and the products are formed in float32 as on the CPU path.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _hidden_tile(hidden_ptr, rows_n, rows_t, row_ok, hs, h_ok, stride_hn, stride_ht, stride_hh):
    """hidden [N, T, H] at tokens (rows_n, rows_t) [R] and features hs [C], as [R, C]; zero
    where row_ok [R] or h_ok [C] is off."""
    ptrs = hidden_ptr + rows_n[:, None] * stride_hn + rows_t[:, None] * stride_ht
    return tl.load(ptrs + hs[None, :] * stride_hh, mask=row_ok[:, None] & h_ok[None, :], other=0.0)


@triton.jit
def _logits_tile(
    # pointers
    hidden_ptr,  # [N, T, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V]
    # rows and columns of the tile
    rows_n,  # [BLOCK_M] batch index of each token
    rows_t,  # [BLOCK_M] position of each token
    row_ok,  # [BLOCK_M]
    cols,  # [BLOCK_V] vocabulary index
    col_ok,  # [BLOCK_V]
    # sizes
    H,
    softcap,
    # strides
    stride_hn,
    stride_ht,
    stride_hh,
    stride_wv,
    stride_wh,
    # constexpr
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """float32 logits [BLOCK_M, BLOCK_V] of a tile, bias and soft cap applied."""
    w_cols = weight_ptr + cols[None, :].to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        # [BLOCK_M, BLOCK_K]
        h = _hidden_tile(
            hidden_ptr, rows_n, rows_t, row_ok, ks, k_ok, stride_hn, stride_ht, stride_hh
        )
        # [BLOCK_K, BLOCK_V]
        w_mask = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_cols + ks[:, None] * stride_wh, mask=w_mask, other=0.0)
        acc = _dot(h, w, acc, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok).to(tl.float32)[None, :]

    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _token_rows(order_ptr, count_ptr, pos, T):
    """Batch index, position and validity of the sorted token slots `pos`."""
    count = tl.load(count_ptr)
    ok = pos < count
    flat = tl.load(order_ptr + pos, mask=ok, other=0)
    return flat // T, flat % T, ok


@triton.jit
def _token_block(
    labels_ptr, order_ptr, count_ptr, pid_m, T, stride_ln, stride_lt, BLOCK_M: tl.constexpr
):
    """Sorted slots [BLOCK_M] of token block pid_m, their tokens (as _token_rows) and labels."""
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n, rows_t, row_ok = _token_rows(order_ptr, count_ptr, pos, T)
    y = tl.load(labels_ptr + rows_n * stride_ln + rows_t * stride_lt, mask=row_ok, other=-1)
    return pos, rows_n, rows_t, row_ok, y


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    hidden_ptr,  # [N, T, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V]
    labels_ptr,  # [N, T] integer
    order_ptr,  # [N * T] int64 flat token index, counted tokens first
    count_ptr,  # [1] number of counted tokens
    lse_part_ptr,  # [S, N * T] float32 log-sum-exp of each vocabulary range
    target_ptr,  # [N * T] float32 target logit (left alone where not found)
    # sizes
    T,
    H,
    V,
    vocab_per_split,
    slots,
    softcap,
    # strides
    stride_hn,
    stride_ht,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_ln,
    stride_lt,
    # constexpr
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(count_ptr):
        return

    # [BLOCK_M] each: sorted slot, batch index, position, validity and label of each token
    pos, rows_n, rows_t, row_ok, y = _token_block(
        labels_ptr, order_ptr, count_ptr, pid_m, T, stride_ln, stride_lt, BLOCK_M
    )

    # Online log-sum-exp over this program's vocabulary range, plus the target logit.
    v_start = pid_s * vocab_per_split
    v_end = tl.minimum(V, v_start + vocab_per_split)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    found = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        col_ok = cols < v_end
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows_n, rows_t, row_ok, cols, col_ok,
            H, softcap, stride_hn, stride_ht, stride_hh, stride_wv, stride_wh,
            HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION,
        )  # fmt: skip
        # Padded lanes leave the sum only after the soft cap, which would make them finite.
        z = tl.where(col_ok[None, :], z, float("-inf"))  # [BLOCK_M, BLOCK_V]

        # The exponents are shifted by 0 while every logit so far is -inf (a vocabulary
        # masked by a -inf bias), where -inf - -inf would make the sum NaN; the running
        # maximum itself stays -inf, or logits far below 0 that follow would underflow.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new

        hit = (cols[None, :] == y[:, None]) & col_ok[None, :]  # [BLOCK_M, BLOCK_V]
        target += tl.sum(tl.where(hit, z, 0.0), axis=1)
        found += tl.sum(hit.to(tl.int32), axis=1)

    lse_row = lse_part_ptr + pid_s.to(tl.int64) * slots  # [slots] of this split
    tl.store(lse_row + pos, tl.where(m == float("-inf"), 0.0, m) + tl.log(s), mask=row_ok)
    tl.store(target_ptr + pos, target, mask=row_ok & (found > 0))


@triton.jit
def _logprobs_bwd_dlogits_kernel(
    # pointers
    hidden_ptr,  # [N, T, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V]
    labels_ptr,  # [N, T] integer
    order_ptr,  # [N * T] int64 flat token index, counted tokens first
    count_ptr,  # [1]
    lse_ptr,  # [N * T] float32, in sorted order
    grad_lp_ptr,  # [N] upstream gradient of the log-probabilities
    dlogits_ptr,  # [N * T, chunk] gradient of this chunk's logits, in sorted order
    # sizes
    T,
    H,
    v0,
    v_end,
    slots,
    softcap,
    # strides
    stride_hn,
    stride_ht,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_ln,
    stride_lt,
    stride_g,
    stride_dm,
    # constexpr
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    # Rows past the count stay at the zeros the buffer was allocated with.
    if pid_m * BLOCK_M >= tl.load(count_ptr):
        return

    # [BLOCK_M] each: sorted slot, batch index, position, validity and label of each token
    pos, rows_n, rows_t, row_ok, y = _token_block(
        labels_ptr, order_ptr, count_ptr, pid_m, T, stride_ln, stride_lt, BLOCK_M
    )
    lse = tl.load(lse_ptr + pos, mask=row_ok, other=0.0)
    g = tl.load(grad_lp_ptr + rows_n * stride_g, mask=row_ok, other=0.0).to(tl.float32)

    cols = v0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
    col_ok = cols < v_end
    z = _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows_n, rows_t, row_ok, cols, col_ok,
        H, softcap, stride_hn, stride_ht, stride_hh, stride_wv, stride_wh,
        HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION,
    )  # fmt: skip

    # d lp / d z = onehot(y) - softmax(z), scaled by the row's upstream gradient.
    onehot = (cols[None, :] == y[:, None]).to(tl.float32)
    d = (onehot - tl.exp(z - lse[:, None])) * g[:, None]  # [BLOCK_M, BLOCK_V]
    if SOFTCAP:
        # z is already capped: c * tanh(u / c) has derivative 1 - (z / c)^2.
        d = d * (1.0 - (z / softcap) * (z / softcap))
    d = tl.where(row_ok[:, None] & col_ok[None, :], d, 0.0)

    out = dlogits_ptr + pos[:, None].to(tl.int64) * stride_dm + (cols - v0)[None, :]
    out_mask = (pos < slots)[:, None] & col_ok[None, :]
    tl.store(out, d.to(dlogits_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dlogits_tile(dlogits_ptr, rows, row_ok, cols, col_ok, stride_dm):
    """dlogits[rows, cols] as [R, C] from the sorted chunk buffer, zero where masked."""
    ptrs = dlogits_ptr + rows[:, None].to(tl.int64) * stride_dm + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _logprobs_bwd_dhidden_kernel(
    # pointers
    dlogits_ptr,  # [N * T, chunk] in sorted order
    weight_ptr,  # [V, H]
    count_ptr,  # [1]
    grad_h_ptr,  # [N * T, H] float32 accumulator, in sorted order
    # sizes
    H,
    v0,
    width,
    # strides
    stride_dm,
    stride_wv,
    stride_wh,
    stride_gm,
    # constexpr
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_m * BLOCK_M >= count:
        return

    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = pos < count
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = hs < H
    # This chunk's product starts from zero and joins the running sum at the end: the
    # running sum is as large as a weight row, and adding each tile's small terms to it
    # would round at that size once per tile of the whole vocabulary.
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < width
        d = _dlogits_tile(dlogits_ptr, pos, row_ok, ks, k_ok, stride_dm)  # [BLOCK_M, BLOCK_K]
        # [BLOCK_K, BLOCK_H]
        w_ptrs = weight_ptr + (v0 + ks[:, None]).to(tl.int64) * stride_wv + hs[None, :] * stride_wh
        w = tl.load(w_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        acc = _dot(d, w.to(d.dtype), acc, PRECISION)

    acc_ptrs = grad_h_ptr + pos[:, None].to(tl.int64) * stride_gm + hs[None, :]
    acc_mask = row_ok[:, None] & h_ok[None, :]
    acc += tl.load(acc_ptrs, mask=acc_mask, other=0.0)
    tl.store(acc_ptrs, acc, mask=acc_mask)


@triton.jit
def _logprobs_bwd_dweight_kernel(
    # pointers
    dlogits_ptr,  # [N * T, chunk] in sorted order
    hidden_ptr,  # [N, T, H]
    order_ptr,  # [N * T] int64
    count_ptr,  # [1]
    grad_w_ptr,  # [V, H] written for rows v0 .. v0 + width
    grad_b_ptr,  # [V] float32, written for the same rows
    # sizes
    T,
    H,
    v0,
    width,
    # strides
    stride_dm,
    stride_hn,
    stride_ht,
    stride_hh,
    stride_gv,
    stride_gh,
    # constexpr
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    count = tl.load(count_ptr)

    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] within the chunk
    col_ok = cols < width
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = hs < H
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)

    # The sum over tokens runs to the count read on the device, so ignored tokens cost
    # nothing and the host never learns how many there are.
    for k0 in range(0, count, BLOCK_K):
        pos = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        rows_n, rows_t, row_ok = _token_rows(order_ptr, count_ptr, pos, T)
        d = _dlogits_tile(dlogits_ptr, pos, row_ok, cols, col_ok, stride_dm)  # [BLOCK_K, BLOCK_V]
        # [BLOCK_K, BLOCK_H]
        h = _hidden_tile(
            hidden_ptr, rows_n, rows_t, row_ok, hs, h_ok, stride_hn, stride_ht, stride_hh
        )
        acc = _dot(tl.trans(d), h.to(d.dtype), acc, PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(d.to(tl.float32), axis=0)

    rows = (v0 + cols).to(tl.int64)
    out = grad_w_ptr + rows[:, None] * stride_gv + hs[None, :] * stride_gh
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=col_ok[:, None] & h_ok[None, :])
    if HAS_BIAS:
        if pid_h == 0:
            tl.store(grad_b_ptr + rows, bias_acc, mask=col_ok)


# ---------------------------------------------------------------------------------------
#  Triton launchers
# ---------------------------------------------------------------------------------------


def _spans(total: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each piece when 0 .. total is cut into pieces of step."""
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _check_tiling(tiling: Tiling) -> None:
    for name in ("block_m", "block_v", "block_k", "block_h"):
        size = getattr(tiling, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"Tiling.{name} must be a power of two >= 16 (tl.dot), got {size}")
    if min(tiling.chunk_elements, tiling.token_chunk, tiling.vocab_chunk) < 1:
        raise ValueError(
            "Tiling.chunk_elements, Tiling.token_chunk and Tiling.vocab_chunk must be positive"
        )
    if tiling.splits is not None and tiling.splits < 1:
        raise ValueError(f"Tiling.splits must be positive or None, got {tiling.splits}")


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "upcast"
    if dtype == torch.bfloat16 and isinstance(_logprobs_fwd_kernel, InterpretedFunction):
        return "upcast"
    # float32 products follow torch's own switch, so the kernel is as exact as a torch matmul;
    # for 16-bit operands the setting means nothing and Triton's default stands.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_sizes(
    hidden: torch.Tensor, weight: torch.Tensor, tiling: Tiling
) -> tuple[int, int, int, int, int]:
    """(N, T, H, V, N * T) of a launch, once the tiling is known to be usable."""
    _check_tiling(tiling)
    n_rows, seq_len, width = hidden.shape
    return n_rows, seq_len, width, weight.shape[0], n_rows * seq_len


def _launch_options(tiling: Tiling) -> dict:
    return {"num_warps": tiling.num_warps, "num_stages": tiling.num_stages}


def _token_block_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    softcap: float | None,
    tiling: Tiling,
) -> dict:
    """Keyword arguments that the forward and the logits-gradient kernels share: both walk
    blocks of sorted tokens and compute tiles of their logits."""
    return {
        "hidden_ptr": hidden,
        "weight_ptr": weight,
        # An unused pointer still needs a tensor behind it.
        "bias_ptr": bias if bias is not None else weight,
        "labels_ptr": labels,
        "order_ptr": order,
        "count_ptr": count,
        "T": hidden.shape[1],
        "H": hidden.shape[2],
        "softcap": float(softcap or 1.0),
        "stride_hn": hidden.stride(0),
        "stride_ht": hidden.stride(1),
        "stride_hh": hidden.stride(2),
        "stride_wv": weight.stride(0),
        "stride_wh": weight.stride(1),
        "stride_ln": labels.stride(0),
        "stride_lt": labels.stride(1),
        "HAS_BIAS": bias is not None,
        "SOFTCAP": softcap is not None,
        "BLOCK_M": tiling.block_m,
        "BLOCK_V": tiling.block_v,
        "BLOCK_K": tiling.block_k,
        "PRECISION": _dot_precision(hidden.dtype),
        **_launch_options(tiling),
    }


def _sort_counted(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices with the counted tokens first, and their count, both on the device."""
    counted = (labels != ignore_index).reshape(-1)
    order = torch.argsort(torch.logical_not(counted).to(torch.uint8), stable=True)
    return order, counted.sum().reshape(1)


def _unsort(rows: torch.Tensor, order: torch.Tensor, n_rows: int, seq_len: int) -> torch.Tensor:
    """Rows [N * T, ...] in sorted token order put back as [N, T, ...]."""
    out = torch.zeros_like(rows)
    out.index_copy_(0, order, rows)
    return out.view(n_rows, seq_len, *rows.shape[1:])


def _forward_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    tiling: Tiling,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row log-probabilities [N], plus what the backward needs (lse, order, count)."""
    n_rows, seq_len, _, vocab, slots = _launch_sizes(hidden, weight, tiling)
    order, count = _sort_counted(labels, ignore_index)
    if slots == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return torch.zeros(n_rows, dtype=torch.float32, device=hidden.device), empty, order, count

    m_blocks = triton.cdiv(slots, tiling.block_m)
    splits = tiling.splits or triton.cdiv(_TARGET_PROGRAMS, m_blocks)
    splits = max(1, min(splits, triton.cdiv(vocab, tiling.block_v)))
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), tiling.block_v) * tiling.block_v
    splits = triton.cdiv(vocab, vocab_per_split)

    lse_part = torch.empty(splits, slots, dtype=torch.float32, device=hidden.device)
    # A label outside the vocabulary is never found, so its row comes out NaN.
    target = torch.full((slots,), float("nan"), dtype=torch.float32, device=hidden.device)
    _logprobs_fwd_kernel[(m_blocks, splits)](
        **_token_block_args(hidden, weight, bias, labels, order, count, softcap, tiling),
        lse_part_ptr=lse_part,
        target_ptr=target,
        V=vocab,
        vocab_per_split=vocab_per_split,
        slots=slots,
    )

    lse = torch.logsumexp(lse_part, dim=0)
    counted = torch.arange(slots, device=hidden.device) < count
    token_lp = torch.where(counted, target - lse, 0.0)
    return _unsort(token_lp, order, n_rows, seq_len).sum(dim=1), lse, order, count


def _backward_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    softcap: float | None,
    lse: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    grad_lp: torch.Tensor,
    needs: tuple[bool, bool, bool],
    tiling: Tiling,
    grad_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_n grad_lp[n] * lp[n] with respect to (hidden, weight, bias).

    needs says which of the three are wanted. grad_weight, when given, is the [V, H] buffer
    to write the weight gradient into; every element of it is written.
    """
    n_rows, seq_len, width, vocab, slots = _launch_sizes(hidden, weight, tiling)
    device = hidden.device
    needs_h, needs_w, needs_b = needs
    if grad_weight is not None and (grad_weight.shape != weight.shape or not needs_w):
        raise ValueError("grad_weight must be a [V, H] buffer, and only when it is needed")
    if slots == 0:
        return (
            torch.zeros_like(hidden) if needs_h else None,
            torch.zeros_like(weight) if needs_w else None,
            torch.zeros_like(bias) if needs_b else None,
        )

    # One chunk of the logits' gradient, zero in the rows that no kernel ever writes.
    chunk = max(tiling.block_v, tiling.chunk_elements // max(slots, 1))
    chunk = min(chunk // tiling.block_v * tiling.block_v, triton.cdiv(vocab, 16) * 16)
    chunk = max(chunk, 16)
    dlogits = torch.zeros(slots, chunk, dtype=hidden.dtype, device=device)
    grad_h = torch.zeros(slots, width, dtype=torch.float32, device=device) if needs_h else None
    if (needs_w or needs_b) and grad_weight is None:
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_b = torch.empty(vocab, dtype=torch.float32, device=device) if needs_b else None

    m_blocks = triton.cdiv(slots, tiling.block_m)
    h_blocks = triton.cdiv(width, tiling.block_h)
    token_block_args = _token_block_args(
        hidden, weight, bias, labels, order, count, softcap, tiling
    )
    # Both gradient products read the same chunk buffer with the same tiles.
    product_args = {
        "dlogits_ptr": dlogits,
        "count_ptr": count,
        "H": width,
        "stride_dm": dlogits.stride(0),
        "BLOCK_H": tiling.block_h,
        "BLOCK_K": tiling.block_k,
        "PRECISION": token_block_args["PRECISION"],
        **_launch_options(tiling),
    }
    for v0, v_end in _spans(vocab, chunk):
        step = v_end - v0
        _logprobs_bwd_dlogits_kernel[(m_blocks, triton.cdiv(step, tiling.block_v))](
            **token_block_args,
            lse_ptr=lse,
            grad_lp_ptr=grad_lp,
            dlogits_ptr=dlogits,
            v0=v0,
            v_end=v_end,
            slots=slots,
            stride_g=grad_lp.stride(0),
            stride_dm=dlogits.stride(0),
        )

        if needs_h:
            _logprobs_bwd_dhidden_kernel[(m_blocks, h_blocks)](
                **product_args,
                weight_ptr=weight,
                grad_h_ptr=grad_h,
                v0=v0,
                width=step,
                stride_wv=weight.stride(0),
                stride_wh=weight.stride(1),
                stride_gm=grad_h.stride(0),
                BLOCK_M=tiling.block_m,
            )

        if needs_w or needs_b:
            _logprobs_bwd_dweight_kernel[(triton.cdiv(step, tiling.block_v), h_blocks)](
                **product_args,
                hidden_ptr=hidden,
                order_ptr=order,
                grad_w_ptr=grad_weight,
                grad_b_ptr=grad_b if grad_b is not None else lse,
                T=seq_len,
                v0=v0,
                width=step,
                stride_hn=hidden.stride(0),
                stride_ht=hidden.stride(1),
                stride_hh=hidden.stride(2),
                stride_gv=grad_weight.stride(0),
                stride_gh=grad_weight.stride(1),
                HAS_BIAS=needs_b,
                BLOCK_V=tiling.block_v,
            )

    grad_hidden = _unsort(grad_h.to(hidden.dtype), order, n_rows, seq_len) if needs_h else None
    grad_bias = grad_b.to(bias.dtype) if needs_b else None
    return grad_hidden, grad_weight if needs_w else None, grad_bias


# ---------------------------------------------------------------------------------------
#  The CPU path: the same algorithm in chunks of torch matmuls
# ---------------------------------------------------------------------------------------


def _chunk_shape(counted_tokens: int, vocab: int, tiling: Tiling) -> tuple[int, int]:
    tokens = max(1, min(counted_tokens, tiling.token_chunk))
    return tokens, max(1, min(vocab, tiling.vocab_chunk, tiling.chunk_elements // tokens))


def _counted_tokens(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mask of counted tokens [N, T], their float32 hidden states [M, H], labels [M]."""
    counted = labels != ignore_index
    return counted, hidden[counted].float(), labels[counted]


def _vocab_chunk(
    weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, v0: int, v1: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """float32 weight and bias of vocabulary rows v0 .. v1, which labels fall in them [M],
    and each label's column in the chunk [M, 1] (clamped where it falls outside)."""
    w = weight[v0:v1].float()
    b = bias[v0:v1].float() if bias is not None else None
    in_chunk = (y >= v0) & (y < v1)
    col = (y - v0).clamp_(0, v1 - v0 - 1).unsqueeze(1)
    return w, b, in_chunk, col


def _chunk_logits(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None
) -> torch.Tensor:
    """float32 logits [tokens, vocab chunk] with the soft cap applied."""
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _forward_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    tiling: Tiling,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-probabilities [N] and the counted tokens' log-sum-exp [M]."""
    counted, h, y = _counted_tokens(hidden, labels, ignore_index)  # [N, T], [M, H], [M]
    tokens, chunk = _chunk_shape(h.shape[0], weight.shape[0], tiling)

    # Online log-sum-exp: the running maximum and the sum of exp(z - maximum). Adding each
    # chunk's log-sum-exp with logaddexp instead would round at the size of the log-sum-exp
    # (tens) once per chunk.
    top = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32)
    total = torch.zeros(h.shape[0], dtype=torch.float32)
    target = torch.full((h.shape[0],), float("nan"), dtype=torch.float32)
    for v0, v1 in _spans(weight.shape[0], chunk):
        w, b, in_chunk, col = _vocab_chunk(weight, bias, y, v0, v1)

        for t0, t1 in _spans(h.shape[0], tokens):
            z = _chunk_logits(h[t0:t1], w, b, softcap)
            picked = z.gather(1, col[t0:t1]).squeeze(1)
            target[t0:t1] = torch.where(in_chunk[t0:t1], picked, target[t0:t1])
            new_top = torch.maximum(top[t0:t1], z.amax(dim=1))
            # A shift of 0 while every logit so far is -inf (a vocabulary masked by a -inf
            # bias), where -inf - -inf would make the sum NaN. (A +inf logit still gives NaN.)
            shift = torch.where(new_top == float("-inf"), 0.0, new_top)
            total[t0:t1] *= (top[t0:t1] - shift).exp_()
            # In place: the chunk is dead once its sum is known.
            total[t0:t1] += z.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)
            top[t0:t1] = new_top

    lse = total.log_().add_(torch.where(top == float("-inf"), 0.0, top))
    per_token = torch.zeros(labels.shape, dtype=torch.float32)
    per_token[counted] = target - lse
    return per_token.sum(dim=1), lse


def _backward_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    lse: torch.Tensor,
    grad_lp: torch.Tensor,
    needs: tuple[bool, bool, bool],
    tiling: Tiling,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_n grad_lp[n] * lp[n] with respect to (hidden, weight, bias).

    Each chunk forms e = softmax - onehot (times the soft cap's derivative) with no
    per-row factor: the upstream gradient g scales the rows of hidden before the weight
    product and the hidden gradient once at the end, so a chunk costs one pass besides its
    three products.
    """
    needs_h, needs_w, needs_b = needs
    counted, h, y = _counted_tokens(hidden, labels, ignore_index)  # [N, T], [M, H], [M]
    g = grad_lp.float().unsqueeze(1).expand(labels.shape)[counted]  # [M]
    vocab, width = weight.shape
    tokens, chunk = _chunk_shape(h.shape[0], vocab, tiling)

    hg = h * g.unsqueeze(1) if needs_w else None
    # The sum over chunks of e @ w. Each chunk's product goes to a fresh buffer and is added
    # after: addmm_ onto the running sum lets the BLAS fold every product term into it one
    # by one, and rounding at the running sum's size over a whole vocabulary costs ~1e-5.
    sum_ew = torch.zeros_like(h) if needs_h else None
    ew = torch.empty(tokens, width, dtype=torch.float32) if needs_h else None
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_w else None
    # A float32 weight takes its gradient in place; another dtype is summed in float32 first.
    scratch = None
    if needs_w and weight.dtype != torch.float32:
        scratch = torch.empty(chunk, width, dtype=torch.float32)
    grad_b = torch.zeros(vocab, dtype=torch.float32) if needs_b else None
    neg_lse = lse.neg().unsqueeze(1)  # [M, 1]

    for v0, v1 in _spans(vocab, chunk):
        w, b, in_chunk, col = _vocab_chunk(weight, bias, y, v0, v1)
        minus_onehot = torch.where(in_chunk, -1.0, 0.0).unsqueeze(1)
        block = None
        if needs_w:
            block = grad_w[v0:v1] if scratch is None else scratch[: v1 - v0]
            block.zero_()

        for t0, t1 in _spans(h.shape[0], tokens):
            if softcap is None:
                # z - lse straight out of the product, when there is no bias to add first.
                if b is None:
                    e = torch.addmm(neg_lse[t0:t1], h[t0:t1], w.T)
                else:
                    e = torch.addmm(b, h[t0:t1], w.T).add_(neg_lse[t0:t1])
                e.exp_()
                e.scatter_add_(1, col[t0:t1], minus_onehot[t0:t1])
            else:
                cap = torch.mm(h[t0:t1], w.T) if b is None else torch.addmm(b, h[t0:t1], w.T)
                cap.div_(softcap).tanh_()
                e = torch.add(neg_lse[t0:t1], cap, alpha=softcap).exp_()
                e.scatter_add_(1, col[t0:t1], minus_onehot[t0:t1])
                # d c tanh(u / c) / du = 1 - tanh^2
                e.addcmul_(e, cap.square_(), value=-1.0)

            if needs_h:
                sum_ew[t0:t1] += torch.mm(e, w, out=ew[: t1 - t0])
            if needs_w:
                block.addmm_(e.T, hg[t0:t1], alpha=-1.0)
            if needs_b:
                grad_b[v0:v1].addmv_(e.T, g[t0:t1], alpha=-1.0)

        if scratch is not None:
            grad_w[v0:v1].copy_(block)

    grad_hidden = None
    if needs_h:
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        grad_hidden[counted] = sum_ew.mul_(g.neg().unsqueeze(1)).to(hidden.dtype)
    grad_bias = grad_b.to(bias.dtype) if needs_b else None
    return grad_hidden, grad_w, grad_bias


# ---------------------------------------------------------------------------------------
#  Autograd and the public function
# ---------------------------------------------------------------------------------------


class _SequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, backend, tiling):
        # Under an enclosing autocast (a bf16 forward over float32 weights) the CPU path's
        # float32 chunk products would run in the autocast dtype: the op has its own precision.
        with torch.autocast(hidden.device.type, enabled=False):
            if backend == "triton":
                lp, lse, order, count = _forward_triton(
                    hidden, weight, bias, labels, ignore_index, softcap, tiling
                )
                ctx.save_for_backward(hidden, weight, bias, labels, lse, order, count)
            else:
                lp, lse = _forward_torch(
                    hidden, weight, bias, labels, ignore_index, softcap, tiling
                )
                ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.softcap = softcap
        ctx.backend = backend
        ctx.tiling = tiling
        return lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp):
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return (None,) * 8

        with torch.autocast(grad_lp.device.type, enabled=False):
            if ctx.backend == "triton":
                hidden, weight, bias, labels, lse, order, count = ctx.saved_tensors
                grads = _backward_triton(
                    hidden, weight, bias, labels, ctx.softcap, lse, order, count,
                    grad_lp, needs, ctx.tiling,
                )  # fmt: skip
            else:
                hidden, weight, bias, labels, lse = ctx.saved_tensors
                grads = _backward_torch(
                    hidden, weight, bias, labels, ctx.ignore_index, ctx.softcap, lse,
                    grad_lp, needs, ctx.tiling,
                )  # fmt: skip
        return (*grads, None, None, None, None, None)


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
) -> None:
    named = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        named["bias"] = bias
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)):
        raise TypeError(f"softcap must be None or a number, got {type(softcap).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    if hidden.shape[2] == 0:
        raise ValueError("hidden has no features (H = 0)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[2]}, got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels must be [N, T] = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden and weight must share one floating dtype, got {hidden.dtype} and "
            f"{weight.dtype}"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be [V] = [{weight.shape[0]}] in {weight.dtype}, got "
            f"{tuple(bias.shape)} in {bias.dtype}"
        )
    tensors = [hidden, weight, labels] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            f"all inputs must be on one device, got {[str(t.device) for t in tensors]}"
        )
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap}")


def _sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    *,
    backend: str,
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """sequence_logprobs with the path and the tiling chosen by the caller (tests, benches)."""
    _check_inputs(hidden, weight, labels, bias, ignore_index, softcap)
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if backend == "torch" and hidden.device.type != "cpu":
        raise ValueError(f"the torch path runs on the CPU, got tensors on {hidden.device}")
    if tiling is None:
        tiling = default_tiling(backend, hidden.dtype)

    # torch's gather and index ops take int32 or int64 indices only.
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.long()

    # Checked on the device, so the host never waits for it.
    vocab = weight.shape[0]
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < vocab))
    torch._assert_async(
        valid.all(), f"sequence_logprobs: labels must lie in [0, {vocab}) or equal ignore_index"
    )
    softcap = None if softcap is None else float(softcap)
    return _SequenceLogprobs.apply(
        hidden, weight, bias, labels, ignore_index, softcap, backend, tiling
    )


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum over each row's counted tokens of log softmax(hidden @ weight.T + bias)[label].

    hidden: [N, T, H] final hidden states (after the final norm); weight: [V, H], the LM
    head; labels: [N, T] integers aligned with hidden (labels[n, t] is the token predicted
    from hidden[n, t]; the caller shifts), ignore_index where a token is not counted;
    bias: optional [V], may hold -inf for tokens never to be emitted (a label on one gives
    its row -inf; the soft cap maps -inf to -c); softcap: None or c, meaning
    logits -> c * tanh(logits / c).

    Returns float32 [N]; a row with no counted token gives 0. Differentiable with respect
    to hidden, weight and bias, and never holds more than a chunk of the logits. CUDA
    tensors run the Triton kernels, CPU tensors the chunked torch path.
    """
    on_cuda = isinstance(hidden, torch.Tensor) and hidden.device.type == "cuda"
    backend = "triton" if on_cuda else "torch"
    return _sequence_logprobs(hidden, weight, labels, bias, ignore_index, softcap, backend=backend)
