"""Combinators: coefficients pinned on hand-computable cases, the S G S rescaling checked
against a second pass over rescaled gradients, guards, state, errors, and no host sync."""

import math

import pytest
import torch
from conftest import requires_cuda
from mofast.kernels import min_norm
from sync_guard import forbid_host_sync

from mofast.combinators import COMBINATORS, GroupDRO, make_combinator

NAMES = ["uniform", "groupdro", "mgda", "mgda-normalised", "mgda-decoupled"]
MGDA_FAMILY = ["mgda", "mgda-normalised", "mgda-decoupled"]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def orthogonal_pair(p: int, n1: float, n2: float, dtype) -> torch.Tensor:
    """Two orthogonal gradients [2, p] of norms n1 and n2, in a random orientation."""
    q, _ = torch.linalg.qr(torch.randn(p, 2, dtype=torch.float64))
    return (q.T * torch.tensor([n1, n2], dtype=torch.float64)[:, None]).to(dtype)


def gram_of(grads: torch.Tensor) -> torch.Tensor:
    return grads.double() @ grads.double().T


def test_registry_lists_the_five_names():
    assert list(COMBINATORS) == NAMES
    for name in NAMES:
        comb = make_combinator(name, k=3)
        assert comb.name == name and comb.k == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonal_gradients_of_different_norms(dtype):
    n1, n2 = 0.3 + torch.rand(()).item(), 2.0 + 3.0 * torch.rand(()).item()
    l1, l2 = 0.2 + torch.rand(()).item(), 1.0 + torch.rand(()).item()
    grads = orthogonal_pair(37, n1, n2, torch.float64)
    gram = gram_of(grads).to(dtype)
    losses = torch.tensor([l1, l2], dtype=dtype)
    expected = {
        "uniform": [0.5, 0.5],
        "groupdro": torch.softmax(
            torch.tensor([0.1 * l1, 0.1 * l2], dtype=torch.float64), 0
        ).tolist(),
        # Min-norm of two orthogonal vectors: weights inversely proportional to |g_i|^2.
        "mgda": [n2**2 / (n1**2 + n2**2), n1**2 / (n1**2 + n2**2)],
        # The unit vectors are orthogonal and of equal length: c' = (1/2, 1/2), then / |g_i|.
        "mgda-normalised": [0.5 / n1, 0.5 / n2],
        # g_i / L_i are orthogonal of lengths n_i / L_i.
        "mgda-decoupled": [
            (n2 / l2) ** 2 / ((n1 / l1) ** 2 + (n2 / l2) ** 2),
            (n1 / l1) ** 2 / ((n1 / l1) ** 2 + (n2 / l2) ** 2),
        ],
    }

    for name, want in expected.items():
        c = make_combinator(name, k=2).weights(losses, gram)
        assert c.dtype == dtype and c.shape == (2,)
        torch.testing.assert_close(
            c.double(), torch.tensor(want, dtype=torch.float64), rtol=TOL[dtype], atol=0
        )


def test_mgda_direction_is_equally_aligned_with_both_orthogonal_gradients():
    grads = orthogonal_pair(11, 0.7, 4.1, torch.float64)
    c = make_combinator("mgda", k=2).weights(torch.rand(2, dtype=torch.float64), gram_of(grads))
    inner = grads @ (c @ grads)
    torch.testing.assert_close(inner[0], inner[1], rtol=1e-12, atol=0)


def test_normalised_direction_is_the_min_norm_point_of_the_unit_gradients():
    grads = orthogonal_pair(23, 0.05, 60.0, torch.float64)
    c = make_combinator("mgda-normalised", k=2).weights(torch.rand(2).double(), gram_of(grads))
    units = grads / grads.norm(dim=1, keepdim=True)
    torch.testing.assert_close(c @ grads, units.mean(0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["frank-wolfe", "exact"])
@pytest.mark.parametrize("k", [3, 5])
def test_rescaled_gram_matches_a_second_pass_over_rescaled_gradients(k, method):
    grads = torch.randn(k, 53, dtype=torch.float64) * torch.logspace(-2, 2, k).double()[:, None]
    losses = 0.1 + torch.rand(k, dtype=torch.float64) * 3.0
    gram = gram_of(grads)
    norms = grads.norm(dim=1)

    units = grads / norms[:, None]
    c_unit = min_norm(gram_of(units), max_iters=20, tol=1e-8, method=method)
    c = make_combinator("mgda-normalised", k=k, method=method).weights(losses, gram)
    torch.testing.assert_close(c, c_unit / norms, rtol=1e-9, atol=1e-12)

    scaled = grads / losses[:, None]
    c_scaled = min_norm(gram_of(scaled), max_iters=20, tol=1e-8, method=method)
    c = make_combinator("mgda-decoupled", k=k, method=method).weights(losses, gram)
    torch.testing.assert_close(c, c_scaled, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_a_solved_objective_gives_finite_weights_and_no_nan(k):
    grads = torch.randn(k, 19, dtype=torch.float64)
    grads[0] = 0.0
    losses = 0.5 + torch.rand(k, dtype=torch.float64)
    losses[0] = 0.0
    gram = gram_of(grads)

    for name in NAMES:
        c = make_combinator(name, k=k).weights(losses, gram)
        assert torch.isfinite(c).all(), name
        assert (c >= 0).all(), name

    # A zero gradient is a Pareto-stationary point: the MGDA family puts the weight on it,
    # so the direction is zero rather than NaN.
    e0 = torch.zeros(k, dtype=torch.float64)
    e0[0] = 1.0
    for name in ["mgda", "mgda-decoupled"]:
        c = make_combinator(name, k=k).weights(losses, gram)
        torch.testing.assert_close(c, e0, rtol=0, atol=1e-12)
    c = make_combinator("mgda-normalised", k=k).weights(losses, gram)
    assert (c[1:] == 0).all()
    assert torch.equal(c @ grads, torch.zeros(19, dtype=torch.float64))


def test_a_zero_loss_with_a_live_gradient_takes_no_weight_in_decoupled():
    grads = orthogonal_pair(9, 1.3, 0.8, torch.float64)
    losses = torch.tensor([0.0, 0.9], dtype=torch.float64)
    c = make_combinator("mgda-decoupled", k=2).weights(losses, gram_of(grads))
    assert torch.isfinite(c).all()
    assert c[0] < 1e-20 and c[1] == pytest.approx(1.0, abs=1e-20)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_decoupled_a_non_finite_loss_gives_nan(bad):
    # An infinite loss once rescaled its gradient to zero, and the min-norm point put all the
    # weight on the diverged objective with finite weights that hid the fault.
    grads = torch.randn(3, 23, dtype=torch.float64)
    losses = 0.5 + torch.rand(3, dtype=torch.float64)
    losses[1] = bad
    c = make_combinator("mgda-decoupled", k=3).weights(losses, gram_of(grads))
    assert torch.isnan(c).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_groupdro_with_a_huge_loss_stays_finite_and_favours_it(dtype):
    comb = make_combinator("groupdro", k=2, eta=0.01)
    losses = torch.tensor([1e4, 1.0], dtype=dtype)
    gram = torch.eye(2, dtype=dtype)

    for _ in range(50):
        c = comb.weights(losses, gram)
        assert torch.isfinite(c).all() and (c >= 0).all()
    assert c[0] == pytest.approx(1.0, abs=1e-12)
    assert c[1] < 1e-30


def test_groupdro_accumulates_exponentiated_losses():
    k, eta = 5, 0.1
    comb = make_combinator("groupdro", k=k, eta=eta)
    gram = torch.eye(k, dtype=torch.float64)
    total = torch.zeros(k, dtype=torch.float64)

    for _ in range(7):
        losses = torch.rand(k, dtype=torch.float64) * 4.0
        total += losses
        c = comb.weights(losses, gram)

    torch.testing.assert_close(c, torch.softmax(eta * total, 0), rtol=1e-12, atol=0)


def test_groupdro_a_non_finite_loss_gives_nan_and_leaves_the_state_alone():
    losses = [torch.rand(3, dtype=torch.float64) for _ in range(2)]
    gram = torch.eye(3, dtype=torch.float64)
    clean, faulty = GroupDRO(3, eta=0.3), GroupDRO(3, eta=0.3)

    clean.weights(losses[0], gram)
    faulty.weights(losses[0], gram)
    bad = faulty.weights(torch.tensor([0.5, float("nan"), 0.1], dtype=torch.float64), gram)

    assert torch.isnan(bad).all()
    torch.testing.assert_close(faulty.weights(losses[1], gram), clean.weights(losses[1], gram))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_uniform(k):
    losses, gram = torch.rand(k), torch.rand(k, k)
    c = make_combinator("uniform", k=k).weights(losses, gram)
    assert torch.equal(c, torch.full((k,), 1.0 / k))


def test_k_equal_one():
    grad = torch.randn(1, 13, dtype=torch.float64)
    gram, losses = gram_of(grad), torch.rand(1, dtype=torch.float64) + 0.1
    for name in ["uniform", "groupdro", "mgda", "mgda-decoupled"]:
        c = make_combinator(name, k=1).weights(losses, gram)
        torch.testing.assert_close(c, torch.ones(1, dtype=torch.float64), rtol=1e-15, atol=0)

    c = make_combinator("mgda-normalised", k=1).weights(losses, gram)
    torch.testing.assert_close(c, 1.0 / grad.norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_permuting_the_objectives_permutes_the_weights(name):
    k = 5
    grads = torch.randn(k, 31, dtype=torch.float64)
    losses = 0.2 + torch.rand(k, dtype=torch.float64)
    perm = torch.randperm(k)
    gram = gram_of(grads)

    c = make_combinator(name, k=k, method="exact").weights(losses, gram)
    c_perm = make_combinator(name, k=k, method="exact").weights(losses[perm], gram[perm][:, perm])
    torch.testing.assert_close(c_perm, c[perm], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-15, 1e-6, 1e6, 1e15])
def test_a_common_gradient_scale_changes_nothing_but_normalised_weights(scale):
    k = 3
    grads = torch.randn(k, 29, dtype=torch.float64)
    losses = 0.2 + torch.rand(k, dtype=torch.float64)
    gram = gram_of(grads)

    # Norms below mgda-normalised's guard (eps = 1e-12) count as zero, so it joins in only
    # where the scaled norms stay well above it.
    names = ["mgda", "mgda-decoupled"] + (["mgda-normalised"] if scale >= 1e-6 else [])
    for name in names:
        c = make_combinator(name, k=k, method="exact").weights(losses, gram)
        c_scaled = make_combinator(name, k=k, method="exact").weights(losses, gram * scale**2)
        # mgda-normalised divides by the norms: c_i = c'_i / |g_i| scales as 1 / scale.
        want = c / scale if name == "mgda-normalised" else c
        torch.testing.assert_close(c_scaled, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1e3, 1e8])
def test_decoupled_ignores_a_common_loss_scale_above_the_guard(scale):
    k = 4
    grads = torch.randn(k, 29, dtype=torch.float64)
    losses = 0.2 + torch.rand(k, dtype=torch.float64)
    gram = gram_of(grads)

    comb = make_combinator("mgda-decoupled", k=k, method="exact")
    torch.testing.assert_close(
        comb.weights(losses * scale, gram), comb.weights(losses, gram), rtol=1e-9, atol=1e-12
    )


def test_mgda_family_weights_sum_to_one_except_normalised():
    k = 4
    grads = torch.randn(k, 41, dtype=torch.float64)
    losses = 0.2 + torch.rand(k, dtype=torch.float64)
    gram = gram_of(grads)
    for name in ["mgda", "mgda-decoupled"]:
        c = make_combinator(name, k=k).weights(losses, gram)
        assert (c >= 0).all() and c.sum() == pytest.approx(1.0, abs=1e-12)

    # mgda-normalised returns c'_i / |g_i|: the direction is the min-norm point of the
    # unit gradients, of length at most 1.
    c = make_combinator("mgda-normalised", k=k).weights(losses, gram)
    assert (c >= 0).all()
    assert (c @ grads).norm() <= 1.0 + 1e-12


def test_state_round_trip():
    k = 4
    gram = torch.eye(k, dtype=torch.float64)
    steps = [torch.rand(k, dtype=torch.float64) * 5 for _ in range(4)]

    for name in NAMES:
        comb = make_combinator(name, k=k)
        for losses in steps[:3]:
            comb.weights(losses, gram)
        state = comb.state_dict()
        assert state["name"] == name and state["k"] == k

        restored = make_combinator(name, k=k)
        restored.load_state_dict(state)
        torch.testing.assert_close(restored.weights(steps[3], gram), comb.weights(steps[3], gram))


def test_groupdro_state_is_a_copy():
    comb = make_combinator("groupdro", k=3, eta=0.5)
    gram = torch.eye(3)
    comb.weights(torch.rand(3) + 1.0, gram)
    state = comb.state_dict()
    saved = state["log_weights"].clone()

    comb.weights(torch.rand(3) + 1.0, gram)
    assert torch.equal(state["log_weights"], saved)


def test_load_state_dict_rejects_a_mismatch():
    state = make_combinator("groupdro", k=3).state_dict()
    with pytest.raises(ValueError, match="cannot load into 'mgda'"):
        make_combinator("mgda", k=3).load_state_dict(state)
    with pytest.raises(ValueError, match="k = 3 cannot load into k = 4"):
        make_combinator("groupdro", k=4).load_state_dict(state)
    with pytest.raises(ValueError, match="log_weights"):
        make_combinator("groupdro", k=3).load_state_dict({"name": "groupdro", "k": 3})


def test_bad_names_options_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown combinator 'mgda-normalized'"):
        make_combinator("mgda-normalized", k=2)
    with pytest.raises(ValueError, match="positive int"):
        make_combinator("mgda", k=0)
    with pytest.raises(ValueError, match="eta"):
        make_combinator("groupdro", k=2, eta=-1.0)
    with pytest.raises(ValueError, match="min-norm method"):
        make_combinator("mgda", k=2, method="newton")
    with pytest.raises(ValueError, match="max_iters"):
        make_combinator("mgda-decoupled", k=2, max_iters=-1)
    with pytest.raises(ValueError, match="eps"):
        make_combinator("mgda-normalised", k=2, eps=0.0)
    with pytest.raises(TypeError, match="eta .* must be a number, got str"):
        make_combinator("groupdro", k=2, eta="0.1")
    with pytest.raises(TypeError, match="tol must be a number, got NoneType"):
        make_combinator("mgda", k=2, tol=None)
    with pytest.raises(TypeError, match="eps .* must be a number, got str"):
        make_combinator("mgda-decoupled", k=2, eps="1e-12")

    comb = make_combinator("mgda-decoupled", k=3)
    with pytest.raises(ValueError, match=r"gram must have shape \(3, 3\)"):
        comb.weights(torch.rand(3), torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\)"):
        comb.weights(torch.rand(1, 3), torch.rand(3, 3))
    with pytest.raises(TypeError, match="losses must be a floating-point tensor"):
        comb.weights(torch.ones(3, dtype=torch.int64), torch.rand(3, 3))
    with pytest.raises(TypeError, match="gram must be a torch.Tensor"):
        comb.weights(torch.rand(3), [[1.0] * 3] * 3)
    with pytest.raises(ValueError, match="one device"):
        comb.weights(torch.rand(3, device="meta"), torch.rand(3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_never_synchronise_with_the_host(dtype):
    k = 4
    grads = torch.randn(k, 17, dtype=dtype)
    gram = (grads @ grads.T).contiguous()
    losses = (0.3 + torch.rand(k)).to(dtype)
    combs = [make_combinator(name, k=k) for name in NAMES]

    with forbid_host_sync():
        weights = [comb.weights(losses, gram) for comb in combs]
        weights.append(combs[1].weights(losses, gram))

    for c in weights:
        assert c.dtype == dtype and torch.isfinite(c).all()


@requires_cuda
def test_cuda_weights_match_the_cpu_and_stay_on_the_device():
    k = 5
    grads = torch.randn(k, 301)
    gram = grads @ grads.T
    losses = 0.3 + torch.rand(k)

    for name in NAMES:
        expected = make_combinator(name, k=k).weights(losses, gram)
        with forbid_host_sync():
            c = make_combinator(name, k=k).weights(losses.cuda(), gram.cuda())
        assert c.device.type == "cuda" and c.dtype == torch.float32
        torch.testing.assert_close(c.cpu(), expected, rtol=1e-5, atol=1e-7)


def test_groupdro_defaults_to_the_training_eta():
    assert make_combinator("groupdro", k=2).eta == 0.1
    assert math.isclose(make_combinator("groupdro", k=2, eta=0.01).eta, 0.01)
