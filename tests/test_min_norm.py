"""min_norm: properties of the solution (simplex, KKT conditions, permutation and scale
invariance, degenerate Grams), the exact method against quadprog, and the two
implementations against each other: the native C++ op (the CPU path) and the Triton kernel
(the CUDA path, through the interpreter here), for both methods.

Tolerances, and why:
- Everything is solved in float64 on G / max_i G_ii, so float64 answers carry ~1e-15
  rounding; float32 weights are that answer rounded to float32 (relative 2**-24).
- KKT (exact method): (G c)_j >= c^T G c - tol for all j, and (G c)_j = c^T G c within tol
  on the support, with tol = KKT_TOL[dtype] * max_i G_ii. Wolfe's affine solves are
  backward stable, so the float64 residual stays near 1e-13; in float32 the weights'
  rounding moves (G c)_j by about k * 2**-24 * max_i G_ii.
- Against quadprog: relative 1e-6 of the optimum value (the issue's bar), plus an
  absolute floor of 1e-9 * max_i G_ii for rank-deficient problems whose optimum is ~0.
"""

import importlib
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from mofast.kernels import min_norm
from offline_compile import run_without_interpreter
from sync_guard import forbid_host_sync
from torch.utils._python_dispatch import TorchDispatchMode

# The package attribute `min_norm` is the function, so fetch the module itself.
M = importlib.import_module("mofast.kernels.min_norm")

KS = [1, 2, 3, 5, 8, 17]
DTYPES = [torch.float32, torch.float64]
KKT_TOL = {torch.float64: 1e-11, torch.float32: 1e-6}
SUM_TOL = {torch.float64: 1e-13, torch.float32: 1e-6}
PATHS = ["native-frank-wolfe", "native-exact", "triton-frank-wolfe", "triton-exact"]


def random_gram(batch: int, k: int, dim: int, dtype=torch.float64, spread: float = 0.0):
    """Gram matrices [batch, k, k] of fresh random gradients in R^dim; gradient norms vary
    by up to 10**spread."""
    grads = torch.randn(batch, k, dim, dtype=torch.float64)
    if spread:
        grads = grads * 10.0 ** (spread * (2 * torch.rand(batch, k, 1, dtype=torch.float64) - 1))
    return (grads @ grads.mT).to(dtype)


def solve(G: torch.Tensor, path: str, max_iters: int = 20) -> torch.Tensor:
    """Weights [B, k] of the batch G [B, k, k] along one implementation."""
    k = G.shape[-1]
    if path == "native-frank-wolfe":
        return min_norm(G, max_iters=max_iters)
    if path == "native-exact":
        return min_norm(G, method="exact")
    if path == "triton-frank-wolfe":
        return M._min_norm_triton(G, max_iters, 1e-8, "frank-wolfe")[0]
    if path == "triton-exact":
        return M._min_norm_triton(G, M.exact_budget(k), 0.0, "exact")[0]
    raise AssertionError(path)


def value_of(G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    G = G.double()
    c = c.double()
    return torch.einsum("...i,...ij,...j->...", c, G, c)


def check_simplex(c: torch.Tensor) -> None:
    assert torch.isfinite(c).all()
    assert (c >= 0).all()
    err = (c.double().sum(-1) - 1).abs().max().item()
    assert err <= SUM_TOL[c.dtype], err


def check_kkt(G: torch.Tensor, c: torch.Tensor) -> None:
    """(G c)_j >= c^T G c - tol for every j, with equality on the support."""
    G64 = G.double()
    c64 = c.double()
    gc = (G64 @ c64[..., None])[..., 0]
    value = (c64 * gc).sum(-1, keepdim=True)
    scale = G64.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1e-300)
    tol = KKT_TOL[c.dtype]
    below = ((value - gc) / scale).max().item()
    off = (((gc - value).abs() / scale) * (c > 0)).max().item()
    assert below <= tol, f"some (G c)_j is below c^T G c by {below:.3g} x max diag"
    assert off <= tol, f"(G c)_j differs from c^T G c on the support by {off:.3g} x max diag"


def quadprog_value(G: torch.Tensor) -> tuple[float, float]:
    """The optimum value from quadprog, and the oracle's own slack.

    quadprog needs a strictly positive definite matrix, so only the oracle sees G + delta I
    with delta = 1e-12 * max diag; the value of its solution is taken on the original G,
    which puts it within delta of the true optimum (and never below it).
    """
    # Imported here: the lent GPU machine has no quadprog, and a module-level import would
    # stop the collection of this file's GPU tests there.
    quadprog = pytest.importorskip("quadprog")
    G64 = G.double().numpy()
    k = G64.shape[0]
    delta = 1e-12 * max(float(np.diag(G64).max()), 1e-300)
    constraints = np.hstack([np.ones((k, 1)), np.eye(k)])
    bounds = np.concatenate([[1.0], np.zeros(k)])
    x = quadprog.solve_qp(G64 + delta * np.eye(k), np.zeros(k), constraints, bounds, meq=1)[0]
    x = np.clip(x, 0.0, None)
    x = x / x.sum()
    return float(x @ G64 @ x), delta


class PoisonNew(TorchDispatchMode):
    """Fills every tensor that torch.empty makes with NaN (floats) or -7 (integers), so
    an output element that a kernel forgets to write shows."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format:
            if out.dtype.is_floating_point:
                out.fill_(math.nan)
            elif out.dtype != torch.bool:
                out.fill_(-7)
        return out


# ------------------------------------------------------------------------------------------
#  Properties of the solution
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dim", ["full", "deficient"])
def test_exact_is_on_the_simplex_and_satisfies_kkt(k, dtype, dim):
    d = k + 3 if dim == "full" else max(k // 3, 1)
    G = random_gram(13, k, d, dtype, spread=1.0)
    c, info = min_norm(G, method="exact", return_info=True)

    assert c.dtype == dtype and c.shape == (13, k)
    check_simplex(c)
    check_kkt(G, c)
    assert info.converged.all()
    assert info.finite.all()
    assert (info.iterations <= M.exact_budget(k)).all()
    # info.value is c^T G c of the returned c, summed in another order: relative 1e-6 (the
    # value's float32 rounding), or, where a rank-deficient optimum is ~0 and both values
    # are float64 rounding, each evaluation's bound 2 k 2**-52 max_i G_ii, twice.
    ours, theirs = info.value.double(), value_of(G, c)
    rounding = 4 * k * 2.0**-52 * G.double().diagonal(dim1=-2, dim2=-1).amax(-1)
    assert ((ours - theirs).abs() <= 1e-6 * theirs.abs() + rounding).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_frank_wolfe_is_feasible_and_only_descends(k, dtype):
    G = random_gram(11, k, k + 2, dtype, spread=1.0)
    values = []
    for iters in (0, 1, 2, 5, 20):
        c, info = min_norm(G, max_iters=iters, return_info=True)
        check_simplex(c)
        assert (info.iterations <= iters).all()
        values.append(value_of(G, c))

    # Each Frank-Wolfe step is an exact line search, so the objective never goes up; the
    # exact optimum is below all of them. Slack: float32 rounding of c.
    slack = 1e-12 if dtype == torch.float64 else 1e-6
    scale = G.double().diagonal(dim1=-2, dim2=-1).amax(-1)
    for before, after in zip(values, values[1:], strict=False):
        assert (after <= before + slack * scale).all()
    best = value_of(G, min_norm(G, method="exact"))
    assert (best <= values[-1] + slack * scale).all()


@settings(max_examples=60, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 17),
    dim=st.integers(1, 12),
    spread=st.floats(0.0, 3.0),
)
def test_exact_kkt_on_random_problems(seed, k, dim, spread):
    torch.manual_seed(seed)
    G = random_gram(4, k, dim, spread=spread)
    c = min_norm(G, method="exact")
    check_simplex(c)
    check_kkt(G, c)

    # Never worse than the Frank-Wolfe recipe, which starts from the best pair.
    fw = min_norm(G)
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)
    assert (value_of(G, c) <= value_of(G, fw) + 1e-13 * scale).all()


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 11, 13, 16])
@pytest.mark.parametrize("dim", ["full", "deficient"])
def test_exact_matches_quadprog(k, dim):
    d = k + 5 if dim == "full" else max(k // 2, 1)
    G = random_gram(17, k, d, spread=1.5)
    c = min_norm(G, method="exact")
    ours = value_of(G, c)

    for b in range(G.shape[0]):
        oracle, delta = quadprog_value(G[b])
        floor = 1e-9 * G[b].diagonal().max().item()
        assert abs(ours[b].item() - oracle) <= 1e-6 * oracle + floor + delta, (b, ours[b], oracle)


@pytest.mark.parametrize("method", ["frank-wolfe", "exact"])
def test_permutation_invariance(method):
    k = 8
    G = random_gram(9, k, 12)
    perm = torch.randperm(k)
    c = min_norm(G, method=method)
    c_perm = min_norm(G[:, perm][:, :, perm], method=method)
    # A unique optimum (full rank) and no ties: permuting the objectives permutes c.
    torch.testing.assert_close(c_perm, c[:, perm], rtol=0, atol=1e-11)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_power_of_two_scales_give_identical_weights(path, dtype):
    # Gradient scales 2**-66 (~1.4e-20) .. 2**50 (~1.1e15), and 2**+-480 in float64. In
    # float32 the Gram of 2**-66 gradients would be subnormal: 2**-60 .. 2**60 there.
    if dtype == torch.float64:
        exponents = [-480, -66, -37, -8, 21, 50, 480]
    else:
        exponents = [-60, -30, 0, 30, 60]
    G = random_gram(1, 5, 7).to(dtype)
    batch = torch.cat([G * 2.0 ** (2 * e) for e in exponents])
    c = solve(batch, path)
    assert torch.equal(c, c[:1].expand_as(c)), c


@pytest.mark.parametrize("path", PATHS)
def test_entries_near_the_largest_double_do_not_overflow(path):
    # a + d - 2b of the two-point formula would overflow here without the normalisation.
    huge = 0.6 * torch.finfo(torch.float64).max
    G = torch.tensor([[[1.0, -0.5], [-0.5, 1.0]], [[1.0, 0.25], [0.25, 0.5]]], dtype=torch.float64)
    want = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(solve(G * huge, path), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["frank-wolfe", "exact"])
def test_decimal_scales_of_the_gradients_give_the_same_weights(method):
    k = 6
    grads = torch.randn(k, 9, dtype=torch.float64)
    scales = [1e-20, 1e-12, 1e-5, 1.0, 1e7, 1e15]
    batch = torch.stack([(s * grads) @ (s * grads).T for s in scales])
    c = min_norm(batch, method=method)
    # The Grams differ from s^2 G by rounding (~1e-16 relative): the weights by about that.
    torch.testing.assert_close(c, c[:1].expand_as(c), rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_rank_deficient_grams(path):
    # More objectives than dimensions, and exact copies: the hull contains the origin or
    # lies in a low-dimensional subspace; the Gram is singular either way.
    batch = 7 if path.startswith("native") else 3
    for k, d in ((8, 3), (17, 5), (5, 1)):
        grads = torch.randn(batch, k, d, dtype=torch.float64)
        grads[:, -1] = grads[:, 0]
        G = grads @ grads.mT
        c = solve(G, path)
        check_simplex(c)
        if path.endswith("exact"):
            check_kkt(G, c)
            for b in range(G.shape[0]):
                oracle, delta = quadprog_value(G[b])
                floor = 1e-9 * G[b].diagonal().max().item()
                assert abs(value_of(G[b], c[b]).item() - oracle) <= 1e-6 * oracle + floor + delta


# ------------------------------------------------------------------------------------------
#  Degenerate problems, along every implementation
# ------------------------------------------------------------------------------------------


def _special_pairs(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-gradient problems with known answers, at very small, unit and very large scale."""
    g = torch.randn(13, dtype=torch.float64)
    # The Gram of 1e-20-scale gradients is subnormal in float32.
    scales = [1e-20, 1.0, 1e15] if dtype == torch.float64 else [1e-15, 1.0, 1e15]
    zero = torch.zeros_like(g)
    cases = [
        ((g, g), (1.0, 0.0)),  # identical: SPEC's rule (b >= a) puts all weight on the first
        ((g, 2 * g), (1.0, 0.0)),  # colinear: all weight on the shorter one
        ((2 * g, g), (0.0, 1.0)),
        ((g, -g), (0.5, 0.5)),  # opposite: the midpoint is the origin
        ((zero, g), (1.0, 0.0)),  # a solved objective: its zero gradient is the answer
        ((g, zero), (0.0, 1.0)),
        ((zero, zero), (0.5, 0.5)),  # all zero: the documented uniform weights
    ]
    grams, wants = [], []
    for s in scales:
        for (a, b), want in cases:
            X = torch.stack([a, b]) * s
            grams.append(X @ X.T)
            wants.append(want)
    return torch.stack(grams).to(dtype), torch.tensor(wants, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_colinear_opposite_and_zero_gradients(path, dtype):
    G, want = _special_pairs(dtype)
    c = solve(G, path)
    assert c.dtype == dtype
    torch.testing.assert_close(c.double(), want, rtol=0, atol=SUM_TOL[dtype])


@pytest.mark.parametrize("path", PATHS)
def test_three_gradient_special_cases(path):
    g = torch.randn(11, dtype=torch.float64)
    h = torch.randn(11, dtype=torch.float64)
    h = h - (h @ g) / (g @ g) * g  # orthogonal to g
    zero = torch.zeros_like(g)
    cases = [
        ((g, 2 * g, 3 * g), (1.0, 0.0, 0.0)),
        ((3 * g, 2 * g, g), (0.0, 0.0, 1.0)),
        ((g, h, -g), (0.5, 0.0, 0.5)),
        ((g, g, g), (1.0, 0.0, 0.0)),
        ((h, zero, g), (0.0, 1.0, 0.0)),
        ((zero, zero, zero), (1 / 3, 1 / 3, 1 / 3)),
    ]
    G = torch.stack([torch.stack(x) @ torch.stack(x).T for x, _ in cases])
    want = torch.tensor([w for _, w in cases], dtype=torch.float64)
    torch.testing.assert_close(solve(G, path), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_k1_gives_one(path):
    G = torch.tensor([[[2.5]], [[1e-30]], [[0.0]], [[7e20]]], dtype=torch.float64)
    c = solve(G, path)
    assert torch.equal(c, torch.ones(4, 1, dtype=torch.float64))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_gram_gives_nan_weights_and_leaves_the_rest(path, dtype):
    k = 5
    G = random_gram(6, k, 7, dtype)
    bad = G.clone()
    bad[1, 2, 3] = math.inf
    bad[3, 0, 0] = math.nan
    bad[4, 4, 1] = -math.inf

    c = solve(bad, path)
    nan_rows = torch.tensor([False, True, False, True, True, False])
    assert torch.isnan(c[nan_rows]).all()
    torch.testing.assert_close(c[~nan_rows], solve(G[~nan_rows], path), rtol=0, atol=0)


def test_non_finite_gram_in_the_info():
    G = random_gram(3, 4, 6)
    G[1, 0, 2] = math.nan
    for method in M.METHODS:
        c, info = min_norm(G, method=method, return_info=True)
        assert info.finite.tolist() == [True, False, True]
        assert info.iterations[1].item() == 0 and not info.converged[1]
        assert torch.isnan(info.value[1]) and torch.isnan(c[1]).all()


# ------------------------------------------------------------------------------------------
#  The closed form, batching, dtypes, inputs
# ------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None, database=None)
@given(
    a=st.floats(1e-6, 1e6),
    d=st.floats(1e-6, 1e6),
    rho=st.floats(-1.0, 1.0),
    method=st.sampled_from(M.METHODS),
)
@example(a=1.698334137772318, d=1.6983341377723198, rho=0.9999999999984731, method="frank-wolfe")
def test_two_gradients_give_the_closed_form(a, d, rho, method):
    b = rho * math.sqrt(a * d)
    G = torch.tensor([[a, b], [b, d]], dtype=torch.float64)
    if b >= a:
        want = 1.0
    elif b >= d:
        want = 0.0
    else:
        want = min(max((d - b) / (a + d - 2 * b), 0.0), 1.0)
    c = min_norm(G, method=method)
    check_simplex(c)

    # The weight is (d - b) / (a + d - 2b), a ratio of differences of G's entries, which
    # the solver's scaling by max(a, d) rounds by 2**-53 max(a, d) each: the weight may
    # move by 6 of those over a + d - 2b, the squared distance between the gradients. For
    # (nearly) identical gradients any weight is (nearly) optimal; the value still is.
    # Frank-Wolfe starts from the exact two-point solution, but its line search there
    # divides rounding noise by rounding noise and can step off it: over 200,000 draws of
    # near-duplicate pairs (bench/bench_fw_rounding.py) that moved the weight by up to 30
    # units over the distance and the value by up to 10.8 units (exact: 3.2 and 5.4).
    unit = 2.0**-53 * max(a, d)
    distance = a + d - 2 * b
    units = (8, 8) if method == "exact" else (64, 24)
    slack = units[0] * unit / distance if distance > 0 else math.inf
    assert abs(c[0].item() - want) <= 1e-12 + slack, (c, want)
    optimum = value_of(G, torch.tensor([want, 1 - want], dtype=torch.float64)).item()
    assert value_of(G, c).item() <= optimum + units[1] * unit


@settings(max_examples=60, deadline=None, database=None)
@given(
    a=st.floats(1e-6, 1e6),
    rho=st.floats(-1.0, 1.0),
    path=st.sampled_from(PATHS),
)
@example(a=0.9999999999999999, rho=0.9999999999999999, path="native-exact")
@example(a=0.9999999999999999, rho=0.9999999999999999, path="triton-frank-wolfe")
def test_two_gradients_of_equal_norm_weigh_a_half_each(a, rho, path):
    """|g1| = |g2|, g1 != g2: the min-norm point is their midpoint, exactly, however close
    the two are (a product with the reciprocal of the scale once merged a and b = a - 1 ulp
    into one value and gave [1, 0])."""
    b = rho * a
    assume(b < a)
    G = torch.tensor([[[a, b], [b, a]]], dtype=torch.float64)
    c = solve(G, path)
    assert torch.equal(c, torch.full_like(c, 0.5)), c


@pytest.mark.parametrize("path", PATHS)
def test_subnormal_grams_of_equal_norms_weigh_a_half_each(path):
    # Symmetrising by halves rounded these off-diagonal entries up to the diagonal's value
    # (1.5 of the smallest subnormal is 2 of them), which made the gradients one and gave
    # [1, 0]. The last is asymmetric, with (G + G^T) / 2 = tiny [[4, 3.5], [3.5, 4]].
    tiny = math.ulp(0.0)
    normal = sys.float_info.min
    G = torch.tensor(
        [
            [[4 * tiny, 3 * tiny], [3 * tiny, 4 * tiny]],
            [[normal, normal - tiny], [normal - tiny, normal]],
            [[4 * tiny, 3 * tiny], [4 * tiny, 4 * tiny]],
        ],
        dtype=torch.float64,
    )
    c = solve(G, path)
    assert torch.equal(c, torch.full_like(c, 0.5)), c


@pytest.mark.parametrize("path", PATHS)
# The interpreter evaluates both sides of the kernel's overflow guard in numpy, which warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_extreme_entries_keep_their_weights(path):
    tiny = math.ulp(0.0)
    # A diagonal entry whose quotient by the largest is subnormal is not halved: norms 3
    # and 4 tiny weigh 4/7 and 3/7 (a halving path rounded 1.5 tiny up and gave 1/2 each).
    G = torch.tensor([[[1.0, 0, 0], [0, 3 * tiny, 0], [0, 0, 4 * tiny]]], dtype=torch.float64)
    torch.testing.assert_close(solve(G, path)[0], G.new_tensor([0, 4 / 7, 3 / 7]))
    # An antisymmetric part that dwarfs the diagonal cancels in (G + G^T) / 2 = diag(1, 3)
    # e-300: it must neither set the divisor nor overflow the quotients.
    G = torch.tensor([[[1e-300, 1e300], [-1e300, 3e-300]]], dtype=torch.float64)
    torch.testing.assert_close(solve(G, path)[0], G.new_tensor([0.75, 0.25]))


@pytest.mark.parametrize("method", ["frank-wolfe", "exact"])
def test_leading_dimensions_are_a_batch(method):
    k = 5
    G = random_gram(6, k, 8).reshape(2, 3, k, k)
    c, info = min_norm(G, method=method, return_info=True)
    assert c.shape == (2, 3, k)
    assert info.iterations.shape == (2, 3) and info.iterations.dtype == torch.int32
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(c[i, j], min_norm(G[i, j], method=method))
    assert min_norm(G[0, 0]).shape == (k,)


@pytest.mark.parametrize("method", ["frank-wolfe", "exact"])
def test_float32_follows_float64(method):
    G = random_gram(9, 7, 10)
    c64 = min_norm(G, method=method)
    c32 = min_norm(G.float(), method=method)
    assert c32.dtype == torch.float32
    check_simplex(c32)
    # Only the input's rounding differs (2**-24 relative), amplified by the conditioning.
    value32 = value_of(G, c32)
    value64 = value_of(G, c64)
    assert ((value32 - value64).abs() <= 1e-5 * value64).all()


def test_strided_input():
    G = random_gram(8, 5, 7)
    wide = torch.full((8, 5, 11), math.nan, dtype=torch.float64)
    wide[:, :, 2:7] = G
    view = wide[:, :, 2:7]
    assert not view.is_contiguous()
    for method in M.METHODS:
        assert torch.equal(min_norm(view, method=method), min_norm(G, method=method))
    assert torch.equal(
        M._min_norm_triton(view, 20, 1e-8, "frank-wolfe")[0], solve(G, "triton-frank-wolfe")
    )


@pytest.mark.parametrize("path", ["native-frank-wolfe", "native-exact", "triton-exact"])
def test_a_slightly_asymmetric_gram_is_symmetrised(path):
    # A Gram assembled from shards in another precision can differ from its transpose in
    # the last bits; the solver uses (G + G^T) / 2.
    G = random_gram(4, 6, 8)
    noise = 1e-9 * torch.randn_like(G)
    c = solve(G + noise - noise.mT, path)
    torch.testing.assert_close(c, solve(G, path), rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_indefinite_gram_with_huge_off_diagonal_entries_stays_feasible(path):
    # Dividing by the largest diagonal entry once overflowed these off-diagonal entries to
    # inf: NaN weights on the native path, all-zero weights on the Triton one.
    k = 3
    sign = torch.sign(torch.randn(5, k, k, dtype=torch.float64))
    huge = 10.0 ** (250 + 50 * torch.rand(5, k, k, dtype=torch.float64))
    G = sign * huge
    G = G + G.mT
    G.diagonal(dim1=-2, dim2=-1).copy_(10.0 ** (-250 - 50 * torch.rand(5, k, dtype=G.dtype)))
    check_simplex(solve(G, path))

    # A huge negative diagonal entry sets the divisor too: over the tiny positive one it
    # made an infinite quotient on the native path, which then disagreed with Triton's.
    G = torch.tensor([[[1e-300, 0.0], [0.0, -1e300]]], dtype=torch.float64)
    c = solve(G, path)
    check_simplex(c)
    assert torch.equal(c, solve(G, "triton-exact" if "native" in path else "native-exact"))


@pytest.mark.slow
def test_triton_kernel_compiles_for_a_cuda_target():
    # No GPU here, but Triton can still lower the kernel to a cubin for sm_90, which catches
    # what the interpreter lets through (types of loop-carried values, unsupported ops).
    script = textwrap.dedent(
        """
        import importlib
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        M = importlib.import_module("mofast.kernels.min_norm")
        for ptr, block, exact in (("*fp32", 8, False), ("*fp64", 16, True)):
            signature = {
                "gram_ptr": ptr, "weights_ptr": ptr, "iters_ptr": "*i32",
                "converged_ptr": "*i8", "k": "i32", "max_iters": "i32",
                "stride_gb": "i32", "stride_gi": "i32", "stride_gj": "i32",
                "stride_wb": "i32", "stride_wi": "i32", "tol": "fp32",
                "EXACT": "constexpr", "GAP_REL_TOL": "constexpr",
                "PIVOT_REL_TOL": "constexpr", "BLOCK_K": "constexpr",
            }
            constants = {
                "EXACT": exact, "GAP_REL_TOL": M._GAP_REL_TOL,
                "PIVOT_REL_TOL": M._PIVOT_REL_TOL, "BLOCK_K": block,
            }
            source = ASTSource(M._min_norm_kernel, signature, constexprs=constants)
            out = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            assert len(out.asm["cubin"]) > 0
        """
    )
    run_without_interpreter(script)


def test_bad_input_raises_a_clear_error():
    G = random_gram(2, 3, 4)
    with pytest.raises(ValueError, match=r"\[\.\.\., k, k\]"):
        min_norm(G[:, :, :2])
    with pytest.raises(ValueError, match="k >= 1"):
        min_norm(torch.empty(0, 0))
    with pytest.raises(TypeError, match="float32 or float64"):
        min_norm(G.to(torch.bfloat16))
    with pytest.raises(ValueError, match="method"):
        min_norm(G, method="newton")
    with pytest.raises(ValueError, match="max_iters"):
        min_norm(G, max_iters=-1)
    # Iterations are int32: a larger cap would wrap the Triton counter and never stop.
    with pytest.raises(ValueError, match="max_iters must be at most 2147483647"):
        min_norm(G, max_iters=2**31)
    with pytest.raises(ValueError, match="max_iters must be in"):
        M._min_norm_triton(G, 2**31, 0.0, "frank-wolfe")
    with pytest.raises(RuntimeError, match="max_iters must be in"):
        torch.ops.mofast.min_norm(G, 2**31, 0.0, "frank-wolfe")
    with pytest.raises(ValueError, match="tol"):
        min_norm(G, tol=math.nan)
    with pytest.raises(TypeError, match="torch.Tensor"):
        min_norm(G.numpy())
    with pytest.raises(RuntimeError, match="method must be"):
        torch.ops.mofast.min_norm(G, 20, 1e-8, "newton")
    with pytest.raises(ValueError, match="k <= 64"):
        M._min_norm_triton(random_gram(1, 65, 3), 20, 1e-8, "exact")


def test_empty_batch():
    for method in M.METHODS:
        assert min_norm(torch.empty(0, 4, 4), method=method).shape == (0, 4)
    assert M._min_norm_triton(torch.empty(0, 4, 4), 20, 1e-8, "exact")[0].shape == (0, 4)


def test_op_registration():
    G = random_gram(3, 4, 5)
    for method in M.METHODS:
        torch.library.opcheck(torch.ops.mofast.min_norm.default, (G, 20, 1e-8, method))


# ------------------------------------------------------------------------------------------
#  The implementations against each other, and no host synchronisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
def test_triton_frank_wolfe_matches_native(k):
    for dtype in DTYPES if k in (3, 8) else [torch.float64]:
        G = random_gram(5, k, max(k - 2, 1) if k == 17 else k + 1, dtype, spread=1.0)
        with PoisonNew():
            c, iterations, converged = M._min_norm_triton(G, 20, 1e-8, "frank-wolfe")
        ref, ref_iterations, ref_converged = torch.ops.mofast.min_norm(G, 20, 1e-8, "frank-wolfe")
        # The same float64 arithmetic in another order: weights agree to rounding.
        torch.testing.assert_close(c, ref, rtol=0, atol=SUM_TOL[dtype])
        assert torch.equal(iterations, ref_iterations)
        assert torch.equal(converged, ref_converged)


@pytest.mark.parametrize("k", KS)
def test_triton_exact_matches_native(k):
    budget = M.exact_budget(k)
    # Full rank below k = 17 (a unique optimum); rank 6 at k = 17 (the origin is in the
    # hull and many weight vectors are optimal, so only the values must agree).
    G = random_gram(5, k, k + 2 if k < 17 else 6, spread=1.0)
    with PoisonNew():
        c, steps, converged = M._min_norm_triton(G, budget, 0.0, "exact")
    ref, ref_steps, ref_converged = torch.ops.mofast.min_norm(G, budget, 0.0, "exact")
    check_simplex(c)
    check_kkt(G, c)
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)
    assert ((value_of(G, c) - value_of(G, ref)).abs() <= 1e-13 * scale).all()
    assert converged.all() and ref_converged.all()
    if k < 17:
        torch.testing.assert_close(c, ref, rtol=0, atol=1e-10)
        assert torch.equal(steps, ref_steps)


def test_no_host_sync():
    G = random_gram(6, 5, 7).reshape(2, 3, 5, 5)
    with forbid_host_sync():
        for method in M.METHODS:
            min_norm(G, method=method, return_info=True)
            min_norm(G.float(), method=method)


def test_cpu_tensors_take_the_native_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a CUDA path ran for CPU tensors")

    monkeypatch.setattr(M, "_min_norm_triton", fail)
    table = torch._C._dispatch_dump_table("mofast::min_norm")
    assert "min_norm.cpp" in table.split("CPU: registered at")[1].splitlines()[0]
    for method in M.METHODS:
        check_simplex(min_norm(random_gram(2, 3, 4), method=method))


@requires_cuda
@pytest.mark.parametrize("method", ["frank-wolfe", "exact"])
def test_cuda_matches_native_without_syncing(method):
    k = 8
    G = random_gram(1_003, k, 5, spread=1.0)
    ref, ref_info = min_norm(G, method=method, return_info=True)
    G_cuda = G.cuda()
    min_norm(G_cuda, method=method)  # compile outside the check
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        c, info = min_norm(G_cuda, method=method, return_info=True)
        c32 = min_norm(G_cuda.float(), method=method)
    finally:
        torch.cuda.set_sync_debug_mode(0)

    check_simplex(c.cpu())
    check_simplex(c32.cpu())
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)
    assert ((value_of(G, c.cpu()) - value_of(G, ref)).abs() <= 1e-12 * scale).all()
    if method == "frank-wolfe":
        torch.testing.assert_close(c.cpu(), ref, rtol=0, atol=1e-12)
        assert torch.equal(info.iterations.cpu(), ref_info.iterations)
    else:
        check_kkt(G, c.cpu())


@requires_cuda
def test_cuda_non_finite_and_graph_capture():
    G = random_gram(4, 5, 6).cuda()
    G[2, 1, 1] = math.inf
    for method in M.METHODS:
        min_norm(G, method=method)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            c = min_norm(G, method=method)
        c.fill_(0.0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isnan(c[2]).all() and torch.isfinite(c[[0, 1, 3]]).all()
