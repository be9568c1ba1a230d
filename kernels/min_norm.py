"""Batched min-norm solver: for each k x k Gram matrix G, the weights c on the simplex that
minimise c^T G c (SPEC section 2), i.e. the min-norm point of the convex hull of the
gradients behind G.

Layers, as for every mofast kernel:
    _min_norm_fw_kernel     Triton, one program per problem, Frank-Wolfe with a fixed
                            iteration budget and convergence masking (CUDA)
    _frank_wolfe_triton     launcher: checks the batch, allocates the outputs
    _exact_batched          Wolfe's algorithm in batched torch ops with a fixed step budget
                            (the CUDA path of method="exact"; device-agnostic)
    mofast::min_norm        the op: native C++ on the CPU (csrc/min_norm.cpp), the two
                            functions above registered for CUDA
    min_norm                the public function

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


class MinNormInfo(NamedTuple):
    """Diagnostics of one `min_norm` call, each shaped like G's leading dimensions."""

    iterations: torch.Tensor  # int32: Frank-Wolfe iterations, or the exact method's steps
    converged: torch.Tensor  # bool: stopped by its test rather than by the budget
    value: torch.Tensor  # c^T G c, in G's dtype
    gap: torch.Tensor  # c^T G c - min_j (G c)_j >= value - optimum; 0 at the optimum
    finite: torch.Tensor  # bool: G had no inf or NaN (otherwise the weights are NaN)


def exact_budget(k: int) -> int:
    """Step budget of method="exact" at k objectives.

    Wolfe's algorithm takes about one step per point of the final support (5.4 steps on
    average for random k = 8 problems, at most 9); the budget leaves a wide margin and
    `MinNormInfo.converged` reports the rare problem that exhausts it.
    """
    return 4 * k + 16


# ------------------------------------------------------------------------------------------
#  Frank-Wolfe on CUDA: Triton
# ------------------------------------------------------------------------------------------


@triton.jit
def _two_point_weight(a, b, d):
    # Weight of the first point at the min-norm point of the segment between two points
    # with squared norms a, d and inner product b (SPEC section 2's closed form).
    den = a + d - 2.0 * b
    interior = (d - b) / tl.where(den > 0.0, den, 1.0)
    interior = tl.minimum(tl.maximum(interior, 0.0), 1.0)
    return tl.where(b >= a, 1.0, tl.where(b >= d, 0.0, interior))


# k = 1 would otherwise be specialised into a compile-time constant.
@triton.jit(do_not_specialize=["k"])
def _min_norm_fw_kernel(
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
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    rows = offs[:, None]  # [BLOCK_K, 1]
    cols = offs[None, :]  # [1, BLOCK_K]
    in_k = offs < k
    in_kk = (rows < k) & (cols < k)

    # Load G and G^T as float64, [BLOCK_K, BLOCK_K]; padding is zero.
    base = gram_ptr + pid.to(tl.int64) * stride_gb
    g = tl.load(base + rows * stride_gi + cols * stride_gj, mask=in_kk, other=0.0)
    g_t = tl.load(base + rows * stride_gj + cols * stride_gi, mask=in_kk, other=0.0)
    g = g.to(tl.float64)
    g_t = g_t.to(tl.float64)

    # A non-finite problem is solved as a zero one (no inf arithmetic, a fixed number of
    # steps) and its weights are overwritten with NaN at the end.
    finite = tl.sum(tl.where(tl.abs(g) < float("inf"), 0, 1)) == 0
    g = tl.where(finite, g, 0.0)
    g_t = tl.where(finite, g_t, 0.0)

    # Symmetrise, then divide by the largest diagonal entry (scale invariance).
    g = 0.5 * g + 0.5 * g_t
    on_diag = rows == cols
    scale = tl.maximum(tl.max(tl.sum(tl.where(on_diag, g, 0.0), axis=1)), 0.0)
    positive = scale > 0.0
    safe_scale = tl.where(positive, scale, 1.0)
    inv = 1.0 / safe_scale
    g = tl.where(inv < float("inf"), g * inv, g / safe_scale)
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
    iters = tl.zeros((), dtype=tl.int32)

    # Frank-Wolfe: exact line search towards e_t, t = argmin (G c)_t; problems that have
    # converged keep their weights while the loop runs out its budget.
    gc = tl.sum(g * c[None, :], axis=1)  # [BLOCK_K]
    value = tl.sum(c * gc)
    for _ in range(max_iters):
        g_min = tl.min(tl.where(in_k, gc, float("inf")))
        t = tl.min(tl.where(in_k & (gc == g_min), offs, BLOCK_K))
        keep = _two_point_weight(value, g_min, tl.sum(tl.where(offs == t, diag, 0.0)))
        step = 1.0 - keep
        nxt = keep * c + tl.where(offs == t, step, 0.0)
        col_t = tl.sum(tl.where(cols == t, g, 0.0), axis=1)  # [BLOCK_K]
        change = tl.sum(tl.abs(nxt - c))

        active = done == 0
        c = tl.where(active, nxt, c)
        gc = tl.where(active, keep * gc + step * col_t, gc)
        value = tl.where(active, tl.sum(c * gc), value)
        iters += active.to(tl.int32)
        stop = active & (change < tol)
        converged = converged | stop
        done = done | stop.to(tl.int32)

    c = tl.where(finite, c, float("nan"))
    tl.store(
        weights_ptr + pid.to(tl.int64) * stride_wb + offs * stride_wi,
        c.to(weights_ptr.dtype.element_ty),
        mask=in_k,
    )
    tl.store(iters_ptr + pid, iters)
    tl.store(converged_ptr + pid, converged.to(tl.int8))


def _frank_wolfe_triton(
    gram: torch.Tensor, max_iters: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frank-Wolfe on every problem of `gram` [B, k, k] with the Triton kernel.

    Returns (weights [B, k] in gram's dtype, iterations int32 [B], converged bool [B]).
    Runs wherever Triton runs: CUDA, or the CPU under TRITON_INTERPRET=1.
    """
    _check_batch(gram)
    batch, k, _ = gram.shape
    if k > MAX_TRITON_K:
        raise ValueError(
            f"min_norm on the GPU supports k <= {MAX_TRITON_K} objectives, got k = {k}"
        )
    if max_iters < 0:
        raise ValueError(f"min_norm: max_iters must be >= 0, got {max_iters}")

    weights = torch.empty(batch, k, dtype=gram.dtype, device=gram.device)
    iterations = torch.empty(batch, dtype=torch.int32, device=gram.device)
    converged = torch.empty(batch, dtype=torch.int8, device=gram.device)
    if batch == 0:
        return weights, iterations, converged.bool()

    block_k = max(triton.next_power_of_2(k), 2)
    _min_norm_fw_kernel[(batch,)](
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
        BLOCK_K=block_k,
        num_warps=1 if block_k <= 16 else (2 if block_k <= 32 else 4),
    )
    return weights, iterations, converged.bool()


# ------------------------------------------------------------------------------------------
#  Exact method on CUDA: Wolfe's algorithm in batched torch ops
# ------------------------------------------------------------------------------------------


def _normalise(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G + G^T) / (2 max_i G_ii) in float64, zero where G is not finite, as the native
    code does; also the finite and the positive-scale flags, [B] each."""
    finite = torch.isfinite(gram).all(dim=-1).all(dim=-1)
    g = gram.to(torch.float64)
    g = torch.where(finite[:, None, None], g, 0.0)
    g = 0.5 * g + 0.5 * g.mT

    scale = g.diagonal(dim1=-2, dim2=-1).amax(dim=-1).clamp_min(0.0)
    positive = scale > 0
    safe = torch.where(positive, scale, 1.0)[:, None, None]
    inv = 1.0 / safe
    g = torch.where(torch.isfinite(inv), g * inv, g / safe)
    return g, finite, positive


def _two_point_weight_torch(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    den = a + d - 2.0 * b
    interior = ((d - b) / torch.where(den > 0, den, 1.0)).clamp(0.0, 1.0)
    return torch.where(b >= a, 1.0, torch.where(b >= d, 0.0, interior))


def _best_pair(g: torch.Tensor) -> torch.Tensor:
    """The best two-point weights over all pairs i < j, [B, k]; the first pair wins ties."""
    batch, k, _ = g.shape
    diag = g.diagonal(dim1=-2, dim2=-1)
    a = diag[:, :, None]
    d = diag[:, None, :]
    w_first = _two_point_weight_torch(a, g, d)
    w_second = 1.0 - w_first
    value = w_first * w_first * a + 2.0 * w_first * w_second * g + w_second * w_second * d

    upper = torch.ones(k, k, dtype=torch.bool, device=g.device).triu(diagonal=1)
    value = torch.where(upper, value, math.inf).reshape(batch, k * k)
    pick = value.argmin(dim=-1)
    weight = w_first.reshape(batch, k * k).gather(1, pick[:, None])

    idx = torch.arange(k, device=g.device)
    first = (idx == (pick // k)[:, None]).to(g.dtype)
    second = (idx == (pick % k)[:, None]).to(g.dtype)
    return weight * first + (1.0 - weight) * second


def _affine_min_norm(g: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine min-norm weights of every support ([B, k], zero off the support) and whether
    the support was affinely independent to working precision ([B] bool).

    With r the support's first index and x = p_r + sum_a mu_a (p_a - p_r), the normal
    equations A mu = b have A_ab = <p_a - p_r, p_b - p_r> and b_a = <p_r, p_r - p_a>;
    indices off the support get identity rows, so every matrix stays factorable.
    """
    batch, k, _ = g.shape
    idx = torch.arange(k, device=g.device)
    ref = support.to(torch.int8).argmax(dim=-1)
    rest = support & (idx != ref[:, None])

    g_ref = g.gather(2, ref[:, None, None].expand(batch, k, 1))[..., 0]  # [B, k]: G[:, r]
    g_rr = g_ref.gather(1, ref[:, None])  # [B, 1]
    rel = g - g_ref[:, :, None] - g_ref[:, None, :] + g_rr[:, :, None]
    both = rest[:, :, None] & rest[:, None, :]
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    rel = torch.where(both, rel, eye)
    rhs = torch.where(rest, g_rr - g_ref, 0.0)

    chol, info = torch.linalg.cholesky_ex(rel)
    pivots = chol.diagonal(dim1=-2, dim2=-1).square()
    own = rel.diagonal(dim1=-2, dim2=-1)
    independent = (info == 0) & ((pivots > _PIVOT_REL_TOL * own) | ~rest).all(dim=-1)

    mu = torch.cholesky_solve(rhs[:, :, None], chol)[..., 0]
    mu = torch.where(rest & independent[:, None], mu, 0.0)
    weights = torch.where(idx == ref[:, None], 1.0 - mu.sum(dim=-1, keepdim=True), mu)
    return torch.where(support, weights, 0.0), independent


def _exact_batched(
    gram: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wolfe's min-norm-point algorithm on every problem of `gram` [B, k, k] at once.

    The same algorithm as the native exact method (start from the best pair; a major step
    adds argmin_t (G c)_t to the support, minor steps drop points until the affine
    min-norm point of the support has positive weights). Each of the `budget` rounds
    does one affine solve for every unfinished problem; finished problems are masked, so
    nothing is read back to the host. Returns (weights [B, k] in gram's dtype,
    steps int32 [B], converged bool [B]).
    """
    _check_batch(gram)
    batch, k, _ = gram.shape
    device = gram.device
    g, finite, positive = _normalise(gram)
    idx = torch.arange(k, device=device)
    diag = g.diagonal(dim1=-2, dim2=-1)

    if k == 1:
        c = torch.ones(batch, 1, dtype=torch.float64, device=device)
    else:
        c = _best_pair(g)
    c = torch.where(positive[:, None], c, 1.0 / k)
    done = ~finite | ~positive | (k == 1)
    converged = done & finite
    steps = torch.zeros(batch, dtype=torch.int32, device=device)

    support = c > 0
    gc = (g @ c[:, :, None])[..., 0]
    value = (c * gc).sum(dim=-1)
    major = torch.ones(batch, dtype=torch.bool, device=device)
    saved_c, saved_support, saved_gc, saved_value = c, support, gc, value

    for _ in range(budget):
        # Major step: stop at the optimum, or add t = argmin (G c)_t to the support.
        active = ~done
        g_min, t = gc.min(dim=-1)
        joins = idx == t[:, None]
        largest = torch.where(support | joins, diag, 0.0).amax(dim=-1)
        optimal = (support & joins).any(dim=-1) | (value - g_min <= _GAP_REL_TOL * largest)
        finished = active & major & optimal
        adding = active & major & ~optimal
        done = done | finished
        converged = converged | finished

        keep = adding[:, None]
        saved_c = torch.where(keep, c, saved_c)
        saved_support = torch.where(keep, support, saved_support)
        saved_gc = torch.where(keep, gc, saved_gc)
        saved_value = torch.where(adding, value, saved_value)
        support = support | (keep & joins)

        # One affine solve; keep it if its weights are positive, else a minor step: move
        # towards it until the first weight reaches zero and drop the points that did.
        solving = ~done
        w, independent = _affine_min_norm(g, support)
        stuck = solving & ~independent
        settled = solving & independent & ((w > 0) | ~support).all(dim=-1)
        minor = solving & independent & ~settled

        falling = support & (w <= 0)
        drop = torch.where(falling, c - w, 1.0)
        ratio = torch.where(falling, c / torch.where(drop > 0, drop, 1.0), math.inf)
        theta, leaving = ratio.min(dim=-1)
        moved = c + theta[:, None].clamp(max=1.0) * (w - c)
        moved = torch.where(support & (idx != leaving[:, None]) & (moved > 0), moved, 0.0)
        moved = moved / moved.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)

        c = torch.where(settled[:, None], w, torch.where(minor[:, None], moved, c))
        support = torch.where(minor[:, None], moved > 0, support)
        major = (major & ~minor) | settled
        steps = steps + solving.to(torch.int32)

        # A cycle that did not lower the objective (rounding), or a dependent point, leaves
        # the previous point, optimal to working precision.
        gc = (g @ c[:, :, None])[..., 0]
        value = (c * gc).sum(dim=-1)
        revert = stuck | (settled & ~(value < saved_value))
        back = revert[:, None]
        c = torch.where(back, saved_c, c)
        support = torch.where(back, saved_support, support)
        gc = torch.where(back, saved_gc, gc)
        value = torch.where(revert, saved_value, value)
        done = done | revert
        converged = converged | revert

    weights = torch.where(finite[:, None], c, math.nan).to(gram.dtype)
    return weights, steps, converged


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
    if method == "frank-wolfe":
        return _frank_wolfe_triton(gram, max_iters, tol)
    if method == "exact":
        return _exact_batched(gram, max_iters)
    raise ValueError(f"min_norm: method must be one of {METHODS}, got {method!r}")


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
            a CUDA device; batched over the leading dimensions.
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

    Nothing is read back to the host: the call never synchronises with the device.
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
