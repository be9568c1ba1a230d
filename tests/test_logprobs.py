"""sequence_logprobs: the chunked CPU path and the Triton kernels (through the interpreter
here) against the materialised computation, log_softmax in float64 of the same logits.

fp32 must agree within 1e-5 relative; bf16 may be at most twice as far from the float64
reference as torch's own bf16 materialised path (logits in bf16, log-softmax in float32).
Gradient errors are normwise, max |g - r| / max |r|, so near-zero entries do not make the
measure meaningless; log-probabilities are compared row by row.
"""

import dataclasses
import gzip
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from mofast.kernels import sequence_logprobs
from mofast.kernels.logprobs import (
    CPU_TILING,
    Tiling,
    _backward_triton,
    _forward_torch,
    _forward_triton,
    _sequence_logprobs,
)
from offline_compile import run_without_interpreter
from sync_guard import forbid_host_sync
from torch.utils._python_dispatch import TorchDispatchMode

from mofast.assets import DEFAULT_OBJECTIVES, STORIES260K

IGNORE = -100
# Tiny tiles and chunks so the interpreter stays quick and every partial block shows.
TRITON_TILING = Tiling(
    chunk_elements=1500, block_m=16, block_v=32, block_k=16, block_h=16, splits=3
)
# CPU chunks that divide neither the counted tokens nor the vocabulary, and several
# vocabulary chunks even at the property tests' few hundred entries.
SMALL_CPU_TILING = Tiling(token_chunk=7, vocab_chunk=113)


def _make(N, T, H, V, dtype=torch.float32, bias=False, ignored=0.3, scale=1.0):
    """Fresh random inputs: hidden [N, T, H], weight [V, H], labels [N, T], bias [V]."""
    hidden = torch.randn(N, T, H).mul(scale).to(dtype).requires_grad_()
    weight = torch.randn(V, H).mul(scale / H**0.25).to(dtype).requires_grad_()
    b = torch.randn(V).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N, T))
    labels[torch.rand(N, T) < ignored] = IGNORE
    # A leading prompt span, as DPO batches have.
    labels[:, : T // 4] = IGNORE
    return hidden, weight, labels, b


def _materialised(hidden, weight, labels, bias, softcap, dtype):
    """logits -> log_softmax -> gather -> sum, with the logits in `dtype`'s matmul and the
    log-softmax in max(float32, dtype), as torch does it."""
    z = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    z = z.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = z.log_softmax(dim=-1)
    counted = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, picked, 0.0).sum(dim=1)


def _grads(fn, hidden, weight, bias, grad_lp):
    """Values and gradients of fn() against the upstream gradient grad_lp."""
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    lp = fn()
    lp.backward(grad_lp.to(lp.dtype))
    out = [lp.detach()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


def _reference(hidden, weight, labels, bias, softcap, grad_lp):
    """float64 values and gradients of the materialised computation, on the same inputs."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    fn = lambda: _materialised(h64, w64, labels, b64, softcap, torch.float64)
    return _grads(fn, h64, w64, b64, grad_lp)


def _normwise(x, ref):
    scale = ref.abs().max()
    return ((x.double() - ref).abs().max() / scale).item() if scale > 0 else x.abs().max().item()


def _rowwise(lp, ref):
    return ((lp.double() - ref).abs() / ref.abs().clamp(min=1e-30)).max().item()


def _check_fp32(ours, ref):
    lp, *grads = ours
    ref_lp, *ref_grads = ref
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp).all()
    assert _rowwise(lp, ref_lp) <= 1e-5, (lp, ref_lp)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        assert _normwise(g, r) <= 1e-5


def _check_against_torch(ours, torch_own, ref):
    """Each of our errors is at most twice torch's own error in the same dtype."""
    for mine, theirs, r in zip(ours, torch_own, ref, strict=True):
        assert torch.isfinite(mine).all()
        ours_err, torch_err = _normwise(mine, r), _normwise(theirs, r)
        assert ours_err <= 2 * torch_err, (ours_err, torch_err)


# ---------------------------------------------------------------------------------------
#  The CPU path at real vocabulary sizes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [50257, 65537, 151936])
@pytest.mark.parametrize(
    "N, bias, softcap", [(1, False, None), (3, True, None), (1, True, 30.0), (5, False, 2.5)]
)
def test_cpu_fp32_matches_float64_reference(V, N, bias, softcap):
    hidden, weight, labels, b = _make(N, 13, 8, V, bias=bias, scale=2.0)
    grad_lp = torch.randn(N)
    ref = _reference(hidden, weight, labels, b, softcap, grad_lp)

    for tiling in (None, SMALL_CPU_TILING):
        fn = lambda tiling=tiling: (
            sequence_logprobs(hidden, weight, labels, bias=b, softcap=softcap)
            if tiling is None
            else _sequence_logprobs(
                hidden, weight, labels, b, softcap=softcap, backend="torch", tiling=tiling
            )
        )
        _check_fp32(_grads(fn, hidden, weight, b, grad_lp), ref)


@pytest.mark.parametrize("seed", range(3))
def test_cpu_log_sum_exp_within_an_ulp_and_a_half(seed):
    # Logits that float32 holds exactly (multiples of 1/64 below 2^8), so the product's
    # rounding drops out and what remains is the sum over 75 vocabulary chunks. One running
    # maximum and sum stays within 0.9 ulp of the float64 log-sum-exp (10 seeds: 0.61-0.83
    # ulp). Adding each chunk's log-sum-exp to the running one (logaddexp) instead rounds
    # at the size of the result once a chunk: measured 2.5-4.0 ulps off.
    torch.manual_seed(seed)
    N, T, H, V = 3, 13, 64, 151936
    hidden = torch.randint(-4, 5, (N, T, H)) / 4.0
    weight = torch.randint(-4, 5, (V, H)) / 16.0
    labels = torch.randint(0, V, (N, T))
    _, lse = _forward_torch(hidden, weight, None, labels, IGNORE, None, CPU_TILING)

    ref = (hidden.reshape(-1, H).double() @ weight.double().T).logsumexp(dim=1)
    ulp = (ref.float().abs().nextafter(torch.tensor(float("inf"))) - ref.float().abs()).double()
    assert ((lse.double() - ref).abs() / ulp).max().item() <= 1.5


@pytest.mark.parametrize(
    "V, bias, softcap",
    [(50257, False, None), (65537, True, 30.0), (151936, False, None), (151936, True, 30.0)],
)
def test_cpu_bf16_within_twice_torch_error(V, bias, softcap):
    N = 3
    hidden, weight, labels, b = _make(N, 11, 16, V, dtype=torch.bfloat16, bias=bias, scale=2.0)
    grad_lp = torch.randn(N)
    ref = _reference(hidden, weight, labels, b, softcap, grad_lp)
    torch_own = _grads(
        lambda: _materialised(hidden, weight, labels, b, softcap, torch.bfloat16),
        hidden, weight, b, grad_lp,
    )  # fmt: skip
    ours = _grads(
        lambda: _sequence_logprobs(
            hidden, weight, labels, b, softcap=softcap, backend="torch", tiling=SMALL_CPU_TILING
        ),
        hidden, weight, b, grad_lp,
    )  # fmt: skip

    assert ours[0].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in ours[1:])
    _check_against_torch(ours, torch_own, ref)


# ---------------------------------------------------------------------------------------
#  The Triton kernels, through the interpreter on the CPU
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N, T, H, V, bias, softcap",
    [
        (1, 9, 21, 1000, False, None),
        (3, 11, 21, 517, True, None),
        (3, 7, 19, 517, False, 3.0),
        (5, 5, 33, 1000, True, 30.0),
    ],
)
def test_triton_fp32_matches_float64_reference(N, T, H, V, bias, softcap):
    hidden, weight, labels, b = _make(N, T, H, V, bias=bias, scale=2.0)
    grad_lp = torch.randn(N)
    ref = _reference(hidden, weight, labels, b, softcap, grad_lp)
    fn = lambda: _sequence_logprobs(
        hidden, weight, labels, b, softcap=softcap, backend="triton", tiling=TRITON_TILING
    )
    _check_fp32(_grads(fn, hidden, weight, b, grad_lp), ref)


@pytest.mark.parametrize("splits", [1, 2, None])
def test_triton_splits_and_default_tiles(splits):
    hidden, weight, labels, _ = _make(3, 13, 24, 1000, scale=2.0)
    grad_lp = torch.randn(3)
    ref = _reference(hidden, weight, labels, None, None, grad_lp)
    tiling = Tiling(chunk_elements=3000, block_m=16, block_v=64, splits=splits)
    fn = lambda: _sequence_logprobs(hidden, weight, labels, backend="triton", tiling=tiling)
    _check_fp32(_grads(fn, hidden, weight, None, grad_lp), ref)


def test_triton_bf16_within_twice_torch_error():
    N, V = 3, 517
    hidden, weight, labels, b = _make(N, 9, 24, V, dtype=torch.bfloat16, bias=True, scale=2.0)
    grad_lp = torch.randn(N)
    ref = _reference(hidden, weight, labels, b, 5.0, grad_lp)
    torch_own = _grads(
        lambda: _materialised(hidden, weight, labels, b, 5.0, torch.bfloat16),
        hidden, weight, b, grad_lp,
    )  # fmt: skip
    ours = _grads(
        lambda: _sequence_logprobs(
            hidden, weight, labels, b, softcap=5.0, backend="triton", tiling=TRITON_TILING
        ),
        hidden, weight, b, grad_lp,
    )  # fmt: skip
    _check_against_torch(ours, torch_own, ref)


def test_triton_writes_every_weight_gradient_element():
    N, T, H, V = 3, 9, 21, 517
    hidden, weight, labels, b = _make(N, T, H, V, bias=True)
    hidden, weight, b = hidden.detach(), weight.detach(), b.detach()
    grad_lp = torch.randn(N)
    ref = _reference(hidden, weight, labels, b, None, grad_lp)

    lp, lse, order, count = _forward_triton(hidden, weight, b, labels, IGNORE, None, TRITON_TILING)
    poisoned = torch.full_like(weight, float("nan"))
    grad_h, grad_w, grad_b = _backward_triton(
        hidden, weight, b, labels, None, lse, order, count, grad_lp,
        (True, True, True), TRITON_TILING, grad_weight=poisoned,
    )  # fmt: skip

    assert grad_w is poisoned
    _check_fp32([lp, grad_h, grad_w, grad_b], ref)


def test_triton_label_outside_vocabulary_gives_nan_row():
    # The device-side assertion is what reports it; the kernel itself must not make up a
    # value for a target it never saw.
    hidden, weight, labels, _ = _make(2, 6, 16, 100)
    labels[1, -1] = 100
    lp, *_ = _forward_triton(
        hidden.detach(), weight.detach(), None, labels, IGNORE, None, TRITON_TILING
    )
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1])


# ---------------------------------------------------------------------------------------
#  Properties both paths share
# ---------------------------------------------------------------------------------------

PATHS = [
    pytest.param("torch", SMALL_CPU_TILING, id="torch"),
    pytest.param("triton", TRITON_TILING, id="triton"),
]


@pytest.mark.parametrize("backend, tiling", PATHS)
def test_fully_ignored_rows_give_zero_and_zero_gradient(backend, tiling):
    N, T, H, V = 3, 8, 16, 300
    hidden, weight, labels, b = _make(N, T, H, V, bias=True)
    labels[1] = IGNORE
    grad_lp = torch.randn(N)
    fn = lambda: _sequence_logprobs(hidden, weight, labels, b, backend=backend, tiling=tiling)
    lp, grad_h, grad_w, grad_b = _grads(fn, hidden, weight, b, grad_lp)

    assert lp[1].item() == 0.0 and torch.isfinite(lp).all()
    assert torch.equal(grad_h[1], torch.zeros_like(grad_h[1]))
    assert torch.isfinite(grad_w).all() and torch.isfinite(grad_b).all()
    _check_fp32([lp, grad_h, grad_w, grad_b], _reference(hidden, weight, labels, b, None, grad_lp))

    # Nothing counted anywhere: zeros throughout, never NaN.
    labels[:] = IGNORE
    lp, grad_h, grad_w, grad_b = _grads(fn, hidden, weight, b, grad_lp)
    for t in (lp, grad_h, grad_w, grad_b):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend, tiling", PATHS)
def test_gradient_accumulates_like_autograd_with_tied_embeddings(backend, tiling):
    # The head is the embedding matrix: the weight's gradient comes through the lookup and
    # through the head, on top of a gradient already there from an earlier micro-batch.
    N, T, H, V = 3, 9, 16, 257
    embed = torch.nn.Embedding(V, H)
    mix = torch.randn(H, H) / H**0.5
    ids = torch.randint(0, V, (N, T))
    _, _, labels, _ = _make(N, T, H, V)
    earlier = torch.randn(V, H)
    grad_lp = torch.randn(N)

    def run(head):
        embed.weight.grad = earlier.clone()
        hidden = torch.tanh(embed(ids) @ mix)
        head(hidden, embed.weight).backward(grad_lp)
        return embed.weight.grad.clone()

    ours = run(lambda h, w: _sequence_logprobs(h, w, labels, backend=backend, tiling=tiling))
    plain = run(lambda h, w: _materialised(h, w, labels, None, None, torch.float32))
    assert _normwise(ours - earlier, (plain - earlier).double()) <= 1e-5


@pytest.mark.parametrize("backend, tiling", PATHS)
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_leaves_the_internal_precision_alone(backend, tiling, bias):
    # Under an enclosing autocast (the trainer's bf16 forward over float32 weights) the
    # chunk products must stay float32: autocast would run them, and the log-sum-exp after
    # them, in bfloat16.
    hidden, weight, labels, b = _make(3, 11, 24, 301, bias=bias)
    grad_lp = torch.randn(3)

    def run(enabled):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            lp = _sequence_logprobs(hidden, weight, labels, b, backend=backend, tiling=tiling)
            return _grads(lambda: lp, hidden, weight, b, grad_lp)

    for plain, under in zip(run(False), run(True), strict=True):
        if plain is not None:
            assert torch.equal(plain, under)


@pytest.mark.parametrize("backend, tiling", PATHS)
def test_strided_inputs_and_frozen_head(backend, tiling):
    # hidden[:, :-1] of a longer sequence and a head that takes no gradient (the reference
    # model's): strided views are read in place, and only the hidden gradient is formed.
    N, T, H, V = 3, 10, 20, 333
    full = torch.randn(N, T + 1, H + 3)
    hidden = full[:, :-1, 3:].requires_grad_()
    weight = torch.randn(H, V).T  # [V, H] with unit stride along V
    labels = torch.randint(0, V, (N, T + 1))[:, 1:]
    labels[0, :4] = IGNORE
    grad_lp = torch.randn(N)

    fn = lambda: _sequence_logprobs(hidden, weight, labels, backend=backend, tiling=tiling)
    lp, grad_h = _grads(fn, hidden, weight, None, grad_lp)
    ref_lp, ref_h, _ = _reference(hidden, weight, labels, None, None, grad_lp)
    _check_fp32([lp, grad_h], [ref_lp, ref_h])


@pytest.mark.parametrize("backend, tiling", PATHS)
# The interpreter does the kernels' arithmetic on infinities (log 0, exp(inf), inf - inf)
# in numpy, which warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_leading_vocabulary_masked_by_minus_infinity(backend, tiling):
    # A -inf bias over the first ranges of the vocabulary (tokens a model must never emit):
    # whole chunks and tiles have no finite logit, which must not turn the sum into NaN, nor
    # leave a running maximum of 0 under which the logits near -120 after them underflow.
    N, T, H, V, masked = 3, 9, 16, 300, 170
    hidden, weight, labels, b = _make(N, T, H, V, bias=True)
    with torch.no_grad():
        b[:masked] = float("-inf")
        b[masked:] -= 120.0
    labels[labels != IGNORE] = labels[labels != IGNORE] % (V - masked) + masked
    tiling = dataclasses.replace(tiling, vocab_chunk=64)
    grad_lp = torch.randn(N)
    fn = lambda: _sequence_logprobs(hidden, weight, labels, b, backend=backend, tiling=tiling)
    lp, grad_h, grad_w, grad_b = _grads(fn, hidden, weight, b, grad_lp)
    _check_fp32([lp, grad_h, grad_w], _reference(hidden, weight, labels, b, None, grad_lp)[:3])
    assert torch.equal(grad_b[:masked], torch.zeros(masked))

    # A label on a masked token has probability 0: its row is -inf, not NaN.
    labels[1, -1] = 0
    lp = _sequence_logprobs(hidden, weight, labels, b, backend=backend, tiling=tiling)
    assert lp[1].item() == float("-inf") and torch.isfinite(lp[[0, 2]]).all()

    # A +inf logit has no probabilities to give: NaN, as log_softmax gives, not -inf.
    with torch.no_grad():
        b[V - 1] = float("inf")
    lp = _sequence_logprobs(hidden, weight, labels, b, backend=backend, tiling=tiling)
    assert torch.isnan(lp).all(), lp


class _LargestTensor(TorchDispatchMode):
    """Records the most bytes of any tensor an op returns (the interpreter views buffers as
    bytes, so bytes are what compare across both paths)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_never_holds_more_than_a_chunk_of_logits(backend):
    N, T, H, V = 3, 16, 4, 2003
    hidden, weight, labels, _ = _make(N, T, H, V)
    budget = 1024
    tiling = Tiling(chunk_elements=budget, token_chunk=9, block_m=16, block_v=64, block_k=16)
    lp_grad = torch.randn(N)
    with _LargestTensor() as seen:
        lp = _sequence_logprobs(hidden, weight, labels, backend=backend, tiling=tiling)
        lp.backward(lp_grad)

    # The logits would be N * T * V = 96,144 elements; the weight and its gradient V * H.
    assert seen.largest <= 4 * max(budget, V * H)
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("backend, tiling", PATHS)
def test_no_host_synchronisation(backend, tiling):
    hidden, weight, labels, b = _make(3, 9, 16, 300, bias=True)
    with forbid_host_sync():
        lp = _sequence_logprobs(
            hidden, weight, labels, b, softcap=4.0, backend=backend, tiling=tiling
        )
        lp.backward(torch.ones(3))


# ---------------------------------------------------------------------------------------
#  Bad input
# ---------------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_problem():
    hidden, weight, labels, b = _make(2, 5, 8, 50, bias=True)
    cases = [
        ((hidden[0], weight, labels), {}, "hidden must be"),
        ((hidden, weight[:, :7], labels), {}, "weight must be"),
        ((hidden, weight, labels[:, :4]), {}, "labels must be"),
        ((hidden, weight, labels.float()), {}, "integer"),
        ((hidden, weight.double(), labels), {}, "share one floating dtype"),
        ((hidden, weight, labels), {"bias": b[:7]}, "bias must be"),
        ((hidden, weight, labels), {"softcap": 0.0}, "softcap"),
        ((hidden, weight, labels), {"softcap": float("inf")}, "softcap"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sequence_logprobs(*args, **kwargs)

    bad = labels.clone()
    bad[1, 2] = 50
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 50\)"):
        sequence_logprobs(hidden, weight, bad)

    with pytest.raises(ValueError, match="block_v must be a power of two"):
        _sequence_logprobs(hidden, weight, labels, backend="triton", tiling=Tiling(block_v=48))


def test_bad_argument_types_raise_a_type_error():
    hidden, weight, labels, _ = _make(2, 5, 8, 50)
    cases = [
        ((hidden.detach().numpy(), weight, labels), {}, "hidden must be a torch.Tensor"),
        ((hidden, weight, labels.tolist()), {}, "labels must be a torch.Tensor"),
        ((hidden, weight, labels), {"bias": [0.0] * 50}, "bias must be a torch.Tensor"),
        ((hidden, weight, labels), {"ignore_index": None}, "ignore_index must be an int"),
        ((hidden, weight, labels), {"softcap": "30"}, "softcap must be None or a number"),
        ((hidden, weight, labels), {"softcap": torch.tensor(30.0)}, "softcap must be None"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(TypeError, match=message):
            sequence_logprobs(*args, **kwargs)


@pytest.mark.parametrize("backend, tiling", PATHS)
@pytest.mark.parametrize("dtype, ignore_index", [(torch.uint8, 255), (torch.int16, IGNORE)])
def test_narrow_integer_labels(backend, tiling, dtype, ignore_index):
    # Once an unclear error from torch's gather on the CPU, which takes int32/int64 only.
    N, T, H, V = 3, 7, 16, 201
    hidden, weight, labels, _ = _make(N, T, H, V)
    labels[labels == IGNORE] = ignore_index
    fn = lambda y: _sequence_logprobs(
        hidden, weight, y, ignore_index=ignore_index, backend=backend, tiling=tiling
    )
    narrow = fn(labels.to(dtype))
    wide = fn(labels)
    assert torch.isfinite(narrow).all()
    assert torch.equal(narrow, wide)


# Compiles the four Triton kernels for an sm_90 GPU with the compiler in the triton wheel,
# at the CUDA tiling (warps and pipeline stages too): float64, where the interpreter ran while
# the GPU compiler rejected its tl.dot, and the dtypes a GPU run uses, bfloat16 (tensor
# cores) and float32 (IEEE dots), whose tiles must fit sm_90's 227 KiB of shared memory per
# block. A fresh interpreter is needed because conftest has made the kernels interpreted
# functions. DTYPE is filled in per test.
_COMPILE = """
import importlib, os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
L = importlib.import_module("mofast.kernels.logprobs")

dtype = getattr(torch, "DTYPE")
t = L.default_tiling("triton", dtype)

def build(fn, pointers, ints, strides, constexprs):
    signature = {**pointers, **dict.fromkeys(ints, "i32"), **dict.fromkeys(strides, "i64")}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": t.num_warps, "num_stages": t.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, kernel.metadata.shared)

prec = L._dot_precision(dtype)
x = {torch.float64: "*fp64", torch.float32: "*fp32", torch.bfloat16: "*bf16"}[dtype]
i64, f32 = "*i64", "*fp32"
head = {"HAS_BIAS": True, "SOFTCAP": True, "BLOCK_M": t.block_m, "BLOCK_V": t.block_v,
        "BLOCK_K": t.block_k, "PRECISION": prec}
reads = ["stride_hn", "stride_ht", "stride_hh", "stride_wv", "stride_wh", "stride_ln",
         "stride_lt"]
tokens = {"hidden_ptr": x, "weight_ptr": x, "bias_ptr": x, "labels_ptr": i64,
          "order_ptr": i64, "count_ptr": i64}
build(L._logprobs_fwd_kernel,
      {**tokens, "lse_part_ptr": f32, "target_ptr": f32, "softcap": "fp32"},
      ["T", "H", "V", "vocab_per_split", "slots"], reads, head)
build(L._logprobs_bwd_dlogits_kernel,
      {**tokens, "lse_ptr": f32, "grad_lp_ptr": f32, "dlogits_ptr": x, "softcap": "fp32"},
      ["T", "H", "v0", "v_end", "slots"], [*reads, "stride_g", "stride_dm"], head)
build(L._logprobs_bwd_dhidden_kernel,
      {"dlogits_ptr": x, "weight_ptr": x, "count_ptr": i64, "grad_h_ptr": f32},
      ["H", "v0", "width"], ["stride_dm", "stride_wv", "stride_wh", "stride_gm"],
      {"BLOCK_M": t.block_m, "BLOCK_H": t.block_h, "BLOCK_K": t.block_k, "PRECISION": prec})
build(L._logprobs_bwd_dweight_kernel,
      {"dlogits_ptr": x, "hidden_ptr": x, "order_ptr": i64, "count_ptr": i64,
       "grad_w_ptr": x, "grad_b_ptr": f32},
      ["T", "H", "v0", "width"],
      ["stride_dm", "stride_hn", "stride_ht", "stride_hh", "stride_gv", "stride_gh"],
      {"HAS_BIAS": True, "BLOCK_V": t.block_v, "BLOCK_H": t.block_h, "BLOCK_K": t.block_k,
       "PRECISION": prec})
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float32"])
def test_triton_kernels_compile_for_sm90(dtype):
    assert "compiled" in run_without_interpreter(_COMPILE.replace("DTYPE", dtype))


# ---------------------------------------------------------------------------------------
#  The shipped real model on real UltraFeedback text
# ---------------------------------------------------------------------------------------


def test_real_model_matches_its_own_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES260K)
    model = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    with gzip.open(DEFAULT_OBJECTIVES["overall_score"], "rt") as f:
        rows = [json.loads(next(f)) for _ in range(5)]

    # Prompt then response, the prompt masked out, right-padded to one length.
    sequences, prompt_lengths = [], []
    for row in rows:
        prompt = tok(row["prompt"]).input_ids[:40]
        response = tok(row["chosen"], add_special_tokens=False).input_ids[: 17 + 9 * len(sequences)]
        sequences.append(prompt + response)
        prompt_lengths.append(len(prompt))
    width = max(map(len, sequences))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE)[:, 1:].clone()
    for i, n in enumerate(prompt_lengths):
        labels[i, : n - 1] = IGNORE

    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1]
    ours = sequence_logprobs(hidden, model.lm_head.weight, labels)
    theirs = _materialised_from_logits(out.logits[:, :-1], labels)
    assert _rowwise(ours.detach(), theirs.detach().double()) <= 1e-5

    # The same gradient reaches the head and the layers below as through the model's logits.
    params = [
        model.lm_head.weight,
        model.model.norm.weight,
        model.model.layers[0].mlp.up_proj.weight,
    ]
    g_ours = torch.autograd.grad(ours.sum(), params, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs.sum(), params)
    for a, r in zip(g_ours, g_theirs, strict=True):
        assert _normwise(a, r.double()) <= 1e-5


def _materialised_from_logits(logits, labels):
    logp = logits.float().log_softmax(dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE, picked, 0.0).sum(dim=1)


# ---------------------------------------------------------------------------------------
#  On a GPU: the Triton kernels compiled, bf16, a real-ish size
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
def test_cuda_bf16_real_size_within_twice_torch_error():
    N, T, H, V = 4, 512, 896, 151936
    dev = "cuda"
    hidden = torch.randn(N, T, H, device=dev).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device=dev) / H**0.5).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N, T), device=dev)
    labels[:, :150] = IGNORE
    grad_lp = torch.randn(N, device=dev)

    ref = _reference(hidden, weight, labels, None, None, grad_lp)
    torch_own = _grads(
        lambda: _materialised(hidden, weight, labels, None, None, torch.bfloat16),
        hidden, weight, None, grad_lp,
    )  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours = _grads(lambda: sequence_logprobs(hidden, weight, labels), hidden, weight, None, grad_lp)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    _check_against_torch(ours, torch_own, ref)

    # The gradients plus a chunk of the logits' gradient (128 MiB at the default tiling), far
    # under the 0.6 GB of bf16 logits and 1.2 GB of float32 log-softmax of the plain path.
    grad_bytes = (weight.numel() + hidden.numel()) * 2
    assert extra < grad_bytes + 320 * 2**20
