"""Batched min-norm solver: for each k x k Gram matrix G, the weights c on the simplex that
minimise c^T G c (SPEC section 2), i.e. the min-norm point of the convex hull of the
gradients behind G.

Layers, as for every mofast kernel:
    _min_norm_kernel        Triton, one program per problem: the best-pair start, then
                            Frank-Wolfe or Wolfe's exact algorithm with a fixed budget and
                            convergence masking (the CUDA path)
    _min_norm_triton        launcher: checks the batch, allocates the outputs
    mofast::min_norm        the op: native C++ on the CPU (csrc/min_norm.cpp), the launcher
                            registered for CUDA
    min_norm                the public function (no backward: no autograd Function)

No path reads a value back to the host, so the solver can run inside a CUDA graph and a
non-finite Gram shows up as NaN weights that the trainer can test on the device. The
weights are not differentiable: the MGDA recipe treats them as constants.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mofast.kernels import _native  # noqa: F401  (registers the mofast::min_norm schema)

__all__ = ["METHODS", "MinNormInfo", "exact_budget", "min_norm"]

METHODS = ("frank-wolfe", "exact")

# A Gram tile of BLOCK_K x BLOCK_K float64 lives in one program's registers.
MAX_TRITON_K = 64

# Shared with csrc/min_norm.cpp: a new point joins the support only if its squared distance
# to the support's affine hull exceeds this fraction of its squared distance to the
# reference point; the exact method stops once the duality gap is this small relative to
# the largest squared norm involved (the rounding error of G c itself).
_PIVOT_REL_TOL = 1e-12
_GAP_REL_TOL = 1e-14

# Iterations are counted in int32; past this the Triton counter would wrap and never reach
# the cap.
_MAX_ITERS = 2**31 - 1


class MinNormInfo(NamedTuple):
    """Diagnostics of one `min_norm` call, each shaped like G's leading dimensions."""

    iterations: torch.Tensor  # int32: Frank-Wolfe iterations, or the exact method's steps
    converged: torch.Tensor  # bool: stopped by its test rather than by the budget
    value: torch.Tensor  # c^T G c, in G's dtype
    gap: torch.Tensor  # c^T G c - min_j (G c)_j >= value - optimum; 0 at the optimum
    finite: torch.Tensor  # bool: G had no inf or NaN (otherwise the weights are NaN)


def exact_budget(k: int) -> int:
    """Step budget of method="exact" at k objectives.

    Wolfe's algorithm takes about one step per point of the final support: on the
    benchmark's random problems 4.5 steps on average at k = 8 (at most 12 of the 48
    allowed) and 11 at k = 16 (at most 28 of 80). `MinNormInfo.converged` reports a problem
    that exhausts the budget; its weights are then feasible but not optimal.
    """
    return 4 * k + 16


# ------------------------------------------------------------------------------------------
#  CUDA: one Triton program per problem
# ------------------------------------------------------------------------------------------


@triton.jit
def _two_point_weight(a, b, d):
    # Weight of the first point at the min-norm point of the segment between two points
    # with squared norms a, d and inner product b (SPEC section 2's closed form).
    den = a + d - 2.0 * b
    interior = (d - b) / tl.where(den > 0.0, den, 1.0)
    interior = tl.minimum(tl.maximum(interior, 0.0), 1.0)
    return tl.where(b >= a, 1.0, tl.where(b >= d, 0.0, interior))


@triton.jit
def _frank_wolfe_loop(g, diag, c, done, converged, k, max_iters, tol, BLOCK_K: tl.constexpr):
    # Exact line search towards e_t, t = argmin (G c)_t, until the L1 change of c is below
    # tol or the budget is spent. Each program stops on its own: with one problem per
    # program, no other problem waits on it.
    offs = tl.arange(0, BLOCK_K)
    cols = offs[None, :]
    in_k = offs < k
    iters = tl.zeros((), dtype=tl.int32)
    gc = tl.sum(g * c[None, :], axis=1)  # [BLOCK_K]
    value = tl.sum(c * gc)
    while (iters < max_iters) & (done == 0):
        g_min = tl.min(tl.where(in_k, gc, float("inf")))
        t = tl.min(tl.where(in_k & (gc == g_min), offs, BLOCK_K))
        keep = _two_point_weight(value, g_min, tl.sum(tl.where(offs == t, diag, 0.0)))
        step = 1.0 - keep
        nxt = keep * c + tl.where(offs == t, step, 0.0)
        col_t = tl.sum(tl.where(cols == t, g, 0.0), axis=1)  # [BLOCK_K]
        change = tl.sum(tl.abs(nxt - c))

        c = nxt
        gc = keep * gc + step * col_t
        value = tl.sum(c * gc)
        iters += 1
        stop = change < tol
        converged = converged | stop
        done = done | stop.to(tl.int32)
    return c, iters, converged


@triton.jit
def _affine_min_norm(g, diag, in_s, k, PIVOT_REL_TOL: tl.constexpr, BLOCK_K: tl.constexpr):
    # Weights (summing to 1, any sign, zero off the support) of the affine min-norm point
    # of the support, and whether the support was affinely independent.
    # With r the support's first index and x = p_r + sum_a mu_a (p_a - p_r), the normal
    # equations A mu = b have A_ab = <p_a - p_r, p_b - p_r> and b_a = <p_r, p_r - p_a>.
    # Indices off the support get identity rows. Gauss-Jordan without pivoting is stable
    # on this positive definite A, and its pivots are the squared distances of each point
    # to the affine hull of the points before it.
    offs = tl.arange(0, BLOCK_K)
    rows = offs[:, None]
    cols = offs[None, :]
    ref = tl.min(tl.where(in_s != 0, offs, BLOCK_K))
    rest = (in_s != 0) & (offs != ref)  # [BLOCK_K]
    g_ref = tl.sum(tl.where(cols == ref, g, 0.0), axis=1)  # [BLOCK_K]: G[:, r]
    g_rr = tl.sum(tl.where(offs == ref, diag, 0.0))
    both = rest[:, None] & rest[None, :]
    a = tl.where(both, g - g_ref[:, None] - g_ref[None, :] + g_rr, tl.where(rows == cols, 1.0, 0.0))
    b = tl.where(rest, g_rr - g_ref, 0.0)
    own = tl.sum(tl.where(rows == cols, a, 0.0), axis=1)  # [BLOCK_K]

    independent = tl.full((), 1, tl.int32)
    for j in range(k):
        row_j = tl.sum(tl.where(rows == j, a, 0.0), axis=0)  # [BLOCK_K]: A[j, :]
        col_j = tl.sum(tl.where(cols == j, a, 0.0), axis=1)  # [BLOCK_K]: A[:, j]
        pivot = tl.sum(tl.where(offs == j, row_j, 0.0))
        b_j = tl.sum(tl.where(offs == j, b, 0.0))
        own_j = tl.sum(tl.where(offs == j, own, 0.0))
        independent = independent & (pivot > PIVOT_REL_TOL * own_j).to(tl.int32)
        factor = tl.where(offs == j, 0.0, col_j / tl.where(pivot > 0.0, pivot, 1.0))
        a = a - factor[:, None] * row_j[None, :]
        b = b - factor * b_j

    pivots = tl.sum(tl.where(rows == cols, a, 0.0), axis=1)
    mu = tl.where(rest, b / tl.where(pivots > 0.0, pivots, 1.0), 0.0)
    w = tl.where(offs == ref, 1.0 - tl.sum(mu), mu)
    return tl.where(in_s != 0, w, 0.0), independent


@triton.jit
def _wolfe_loop(
    g,
    diag,
    c,
    done,
    converged,
    k,
    budget,
    GAP_REL_TOL: tl.constexpr,
    PIVOT_REL_TOL: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Wolfe's min-norm-point algorithm, one affine solve per round: a major round adds
    # t = argmin (G c)_t to the support (or stops at the optimum); a minor round moves
    # towards the support's affine min-norm point until the first weight reaches zero and
    # drops the points that did. The same algorithm as csrc/min_norm.cpp. The round that
    # finds the optimum solves nothing; every other round spends one step of the budget.
    offs = tl.arange(0, BLOCK_K)
    in_k = offs < k
    in_s = (c > 0.0).to(tl.int32)
    major = tl.full((), 1, tl.int32)
    steps = tl.zeros((), dtype=tl.int32)
    value = tl.sum(c * tl.sum(g * c[None, :], axis=1))
    saved_c = c
    saved_s = in_s
    saved_value = value
    while (steps < budget) & (done == 0):
        # Major round: the optimality test, else t joins the support.
        gc = tl.sum(g * c[None, :], axis=1)  # [BLOCK_K]
        value = tl.sum(c * gc)
        g_min = tl.min(tl.where(in_k, gc, float("inf")))
        t = tl.min(tl.where(in_k & (gc == g_min), offs, BLOCK_K))
        joins = offs == t
        largest = tl.max(tl.where((in_s != 0) | joins, diag, 0.0))
        t_in_s = tl.sum(tl.where(joins & (in_s != 0), 1, 0)) > 0
        optimal = t_in_s | (value - g_min <= GAP_REL_TOL * largest)
        starting = (done == 0) & (major != 0)
        finished = starting & optimal
        adding = starting & ~optimal
        done = done | finished.to(tl.int32)
        converged = converged | finished
        saved_c = tl.where(adding, c, saved_c)
        saved_s = tl.where(adding, in_s, saved_s)
        saved_value = tl.where(adding, value, saved_value)
        in_s = tl.where(adding & joins, 1, in_s)

        # The affine solve, kept if its weights are positive, else a minor move.
        solving = done == 0
        w, independent = _affine_min_norm(g, diag, in_s, k, PIVOT_REL_TOL, BLOCK_K)
        ok = independent != 0
        falling = (in_s != 0) & (w <= 0.0)
        settled = solving & ok & (tl.sum(falling.to(tl.int32)) == 0)
        minor = solving & ok & ~settled

        drop = tl.where(falling, c - w, 1.0)
        ratio = tl.where(falling, c / tl.where(drop > 0.0, drop, 1.0), float("inf"))
        theta = tl.min(ratio)
        leaving = tl.min(tl.where(ratio == theta, offs, BLOCK_K))
        moved = c + tl.minimum(theta, 1.0) * (w - c)
        moved = tl.where((in_s != 0) & (offs != leaving) & (moved > 0.0), moved, 0.0)
        moved = moved / tl.maximum(tl.sum(moved), 1e-300)

        c = tl.where(settled, w, tl.where(minor, moved, c))
        in_s = tl.where(minor, (moved > 0.0).to(tl.int32), in_s)
        major = tl.where(settled, 1, tl.where(minor, 0, major))
        steps += solving.to(tl.int32)

        # A round that did not lower the objective (rounding), or a dependent point, leaves
        # the previous point, optimal to working precision.
        next_value = tl.sum(c * tl.sum(g * c[None, :], axis=1))
        revert = (solving & ~ok) | (settled & ~(next_value < saved_value))
        c = tl.where(revert, saved_c, c)
        in_s = tl.where(revert, saved_s, in_s)
        done = done | revert.to(tl.int32)
        converged = converged | revert
    return c, steps, converged


# k = 1 would otherwise be specialised into a compile-time constant.
@triton.jit(do_not_specialize=["k"])
def _min_norm_kernel(
    # pointers
    gram_ptr,  # [B, k, k] float32 or float64
    weights_ptr,  # [B, k] gram's dtype, written
    iters_ptr,  # [B] int32, written
    converged_ptr,  # [B] int8, written
    # sizes
    k,
    max_iters,
    # strides
    stride_gb,
    stride_gi,
    stride_gj,
    stride_wb,
    stride_wi,
    # scalars
    tol,
    # constexpr
    EXACT: tl.constexpr,
    GAP_REL_TOL: tl.constexpr,
    PIVOT_REL_TOL: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    rows = offs[:, None]  # [BLOCK_K, 1]
    cols = offs[None, :]  # [1, BLOCK_K]
    in_k = offs < k
    in_kk = (rows < k) & (cols < k)

    # Load G and G^T as float64, [BLOCK_K, BLOCK_K]; padding is zero.
    # int64 offsets: a batch stored problem-minor (a permuted view) has row and column
    # strides of k * B, and (k - 1) * k * B passes 2^31 at k = 64 from B = 2^19.
    base = gram_ptr + pid.to(tl.int64) * stride_gb
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    g = tl.load(base + rows64 * stride_gi + cols64 * stride_gj, mask=in_kk, other=0.0)
    g_t = tl.load(base + rows64 * stride_gj + cols64 * stride_gi, mask=in_kk, other=0.0)
    g = g.to(tl.float64)
    g_t = g_t.to(tl.float64)

    # A non-finite problem is solved as a zero one (no inf arithmetic, a fixed number of
    # steps) and its weights are overwritten with NaN at the end.
    finite = tl.sum(tl.where(tl.abs(g) < float("inf"), 0, 1)) == 0
    g = tl.where(finite, g, 0.0)
    g_t = tl.where(finite, g_t, 0.0)

    # Divide by the largest diagonal entry (scale invariance), or by a larger |entry| of
    # (G + G^T) / 2: that only happens for an indefinite G, whose quotients would
    # otherwise overflow to inf and leave weights off the simplex. Halving before adding
    # keeps that sum finite near the largest double. A division, not a product with the
    # reciprocal: rounded once, it keeps entries that differ by one unit apart (a = d = b +
    # 1 ulp stays a symmetric problem). A symmetric pair is taken as it is; an asymmetric
    # one is averaged as quotients, where halves are exact (halves of subnormal entries
    # round), unless its antisymmetric part dwarfs the divisor and overflows them.
    half_sum = 0.5 * g + 0.5 * g_t
    on_diag = rows == cols
    scale = tl.maximum(tl.max(tl.sum(tl.where(on_diag, g, 0.0), axis=1)), 0.0)
    positive = scale > 0.0
    largest = tl.max(tl.max(tl.abs(half_sum), axis=1))
    safe_scale = tl.where(positive, tl.maximum(scale, largest), 1.0)
    q = g / safe_scale
    q_t = g_t / safe_scale
    both_finite = (tl.abs(q) < float("inf")) & (tl.abs(q_t) < float("inf"))
    averaged = tl.where(both_finite, 0.5 * q + 0.5 * q_t, half_sum / safe_scale)
    g = tl.where(g == g_t, q, averaged)
    diag = tl.sum(tl.where(on_diag, g, 0.0), axis=1)  # [BLOCK_K]

    # Best pair (i < j): closed form for every pair at once, first minimum in row-major
    # order, as the native loop picks it.
    a = diag[:, None]
    d = diag[None, :]
    w_first = _two_point_weight(a, g, d)  # [BLOCK_K, BLOCK_K]
    w_second = 1.0 - w_first
    pair_value = w_first * w_first * a + 2.0 * w_first * w_second * g + w_second * w_second * d
    is_pair = (rows < cols) & (cols < k)
    pair_value = tl.where(is_pair, pair_value, float("inf"))
    best = tl.min(pair_value)
    flat = rows * BLOCK_K + cols
    pick = tl.min(tl.where(is_pair & (pair_value == best), flat, BLOCK_K * BLOCK_K))
    bw = tl.sum(tl.where(flat == pick, w_first, 0.0))
    bi = pick // BLOCK_K
    bj = pick % BLOCK_K
    c = tl.where(offs == bi, bw, 0.0) + tl.where(offs == bj, 1.0 - bw, 0.0)  # [BLOCK_K]

    # Fixed answers: k = 1 -> [1]; all-zero G -> uniform; those (and non-finite G) are done.
    c = tl.where(k == 1, tl.where(offs == 0, 1.0, 0.0), c)
    c = tl.where(positive | (k == 1), c, tl.where(in_k, 1.0 / k.to(tl.float64), 0.0))
    done = ((k == 1) | ~positive | ~finite).to(tl.int32)
    converged = (done != 0) & finite

    if EXACT:
        c, iters, converged = _wolfe_loop(
            g, diag, c, done, converged, k, max_iters, GAP_REL_TOL, PIVOT_REL_TOL, BLOCK_K
        )
    else:
        c, iters, converged = _frank_wolfe_loop(
            g, diag, c, done, converged, k, max_iters, tol, BLOCK_K
        )

    c = tl.where(finite, c, float("nan"))
    tl.store(
        weights_ptr + pid.to(tl.int64) * stride_wb + offs * stride_wi,
        c.to(weights_ptr.dtype.element_ty),
        mask=in_k,
    )
    tl.store(iters_ptr + pid, iters)
    tl.store(converged_ptr + pid, converged.to(tl.int8))


def _min_norm_triton(
    gram: torch.Tensor, max_iters: int, tol: float, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve every problem of `gram` [B, k, k] with the Triton kernel, one program each.

    `max_iters` is Frank-Wolfe's iteration cap, or the exact method's step budget (see
    `exact_budget`). Returns (weights [B, k] in gram's dtype, iterations int32 [B],
    converged bool [B]). Runs wherever Triton runs: CUDA, or the CPU under
    TRITON_INTERPRET=1.
    """
    _check_batch(gram)
    batch, k, _ = gram.shape
    if k > MAX_TRITON_K:
        raise ValueError(
            f"min_norm on the GPU supports k <= {MAX_TRITON_K} objectives, got k = {k}"
        )
    if method not in METHODS:
        raise ValueError(f"min_norm: method must be one of {METHODS}, got {method!r}")
    if not 0 <= max_iters <= _MAX_ITERS:
        raise ValueError(f"min_norm: max_iters must be in [0, {_MAX_ITERS}], got {max_iters}")

    weights = torch.empty(batch, k, dtype=gram.dtype, device=gram.device)
    iterations = torch.empty(batch, dtype=torch.int32, device=gram.device)
    converged = torch.empty(batch, dtype=torch.int8, device=gram.device)
    if batch == 0:
        return weights, iterations, converged.bool()

    block_k = max(triton.next_power_of_2(k), 2)
    _min_norm_kernel[(batch,)](
        gram_ptr=gram,
        weights_ptr=weights,
        iters_ptr=iterations,
        converged_ptr=converged,
        k=k,
        max_iters=max_iters,
        stride_gb=gram.stride(0),
        stride_gi=gram.stride(1),
        stride_gj=gram.stride(2),
        stride_wb=weights.stride(0),
        stride_wi=weights.stride(1),
        tol=tol,
        EXACT=method == "exact",
        GAP_REL_TOL=_GAP_REL_TOL,
        PIVOT_REL_TOL=_PIVOT_REL_TOL,
        BLOCK_K=block_k,
        num_warps=1 if block_k <= 16 else (2 if block_k <= 32 else 4),
    )
    return weights, iterations, converged.bool()


def _check_batch(gram: torch.Tensor) -> None:
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"min_norm: gram must be [B, k, k], got {tuple(gram.shape)}")
    if gram.shape[1] < 1:
        raise ValueError("min_norm: k must be at least 1")
    if gram.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"min_norm: gram must be float32 or float64, got {gram.dtype}")


@torch.library.register_kernel("mofast::min_norm", "cuda")
def _min_norm_cuda(
    gram: torch.Tensor, max_iters: int, tol: float, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _min_norm_triton(gram, max_iters, tol, method)


@torch.library.register_fake("mofast::min_norm")
def _min_norm_fake(
    gram: torch.Tensor, max_iters: int, tol: float, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_batch(gram)
    batch, k, _ = gram.shape
    return (
        gram.new_empty(batch, k),
        gram.new_empty(batch, dtype=torch.int32),
        gram.new_empty(batch, dtype=torch.bool),
    )


# ------------------------------------------------------------------------------------------
#  Public function
# ------------------------------------------------------------------------------------------


def min_norm(
    G: torch.Tensor,
    max_iters: int = 20,
    tol: float = 1e-8,
    method: str = "frank-wolfe",
    *,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, MinNormInfo]:
    """Weights c on the simplex minimising c^T G c, for every Gram matrix of a batch.

    Args:
        G: [..., k, k] symmetric positive semi-definite, float32 or float64, on the CPU or
            a CUDA device (k <= 64 there); batched over the leading dimensions. The solver
            uses (G + G^T) / 2; an indefinite G gives feasible weights without meaning.
        max_iters: Frank-Wolfe's iteration cap (20 in the published recipe). The exact
            method does not use it: it has its own step budget, `exact_budget(k)`.
        tol: Frank-Wolfe stops once the L1 change of c in one iteration is below it. The
            exact method stops at its optimality test, at working precision.
        method: "frank-wolfe" (the published recipe: best-pair start, then Frank-Wolfe)
            or "exact" (Wolfe's min-norm-point algorithm, exact up to rounding).
        return_info: also return a `MinNormInfo` of diagnostics.

    Returns:
        c: [..., k] in G's dtype, c >= 0, sum(c) = 1. Each problem is solved in float64
        after dividing G by its largest diagonal entry, so c does not depend on the
        gradients' scale. Fixed answers: k = 1 gives [1]; an all-zero G (every c is
        optimal) gives the uniform weights 1/k; a G with an inf or NaN anywhere gives
        all-NaN weights for that problem, so the caller can detect it on the device.

    Nothing is read back to the host: the call never synchronises with the device. The
    op underneath, `torch.ops.mofast.min_norm(gram [B, k, k], max_iters, tol, method)`,
    returns (weights, iterations, converged) and takes `max_iters` as the cap of either
    method, so a direct caller of the exact method passes `exact_budget(k)`.
    """
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"min_norm: G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"min_norm: G must be [..., k, k], got shape {tuple(G.shape)}")
    if G.shape[-1] < 1:
        raise ValueError("min_norm: G must have k >= 1 objectives, got k = 0")
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"min_norm: G must be float32 or float64, got {G.dtype}")
    if G.device.type not in ("cpu", "cuda"):
        raise ValueError(f"min_norm runs on CPU and CUDA tensors, got device {G.device}")
    if method not in METHODS:
        raise ValueError(f"min_norm: method must be one of {METHODS}, got {method!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"min_norm: max_iters must be an int >= 0, got {max_iters!r}")
    if max_iters > _MAX_ITERS:
        raise ValueError(
            f"min_norm: max_iters must be at most {_MAX_ITERS} (iterations are counted in "
            f"int32), got {max_iters}"
        )
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"min_norm: tol must be a finite number >= 0, got {tol!r}")

    lead = G.shape[:-2]
    k = G.shape[-1]
    gram = G.detach().reshape(-1, k, k)
    budget = max_iters if method == "frank-wolfe" else exact_budget(k)
    c, iterations, converged = torch.ops.mofast.min_norm(gram, budget, float(tol), method)

    weights = c.reshape(*lead, k)
    if not return_info:
        return weights

    g64 = gram.to(torch.float64)
    c64 = c.to(torch.float64)
    gc = (g64 @ c64[:, :, None])[..., 0]
    value = (c64 * gc).sum(dim=-1)
    info = MinNormInfo(
        iterations=iterations.reshape(lead),
        converged=converged.reshape(lead),
        value=value.to(G.dtype).reshape(lead),
        gap=(value - gc.amin(dim=-1)).to(G.dtype).reshape(lead),
        finite=torch.isfinite(gram).all(dim=-1).all(dim=-1).reshape(lead),
    )
    return weights, info
