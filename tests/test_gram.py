"""gram: the native CPU op and the Triton kernels (through the interpreter here) against a
float64 reference, on odd sizes, strided rows, shards, bf16, non-finite input and bad input.

Errors are measured normwise, max |G - R| / max |R| (the diagonal holds max |R|), so
near-zero off-diagonal entries do not make the measure meaningless.
"""

import importlib

import pytest
import torch
import triton
from conftest import requires_cuda
from mofast.kernels import gram
from mofast.kernels.gram import _TILES_MMA, MAX_K, _gram_triton
from offline_compile import run_without_interpreter
from sync_guard import forbid_host_sync
from torch.utils._python_dispatch import TorchDispatchMode

KS = [1, 2, 3, 5, 8, 17]
# Not a multiple of any block: native blocks are 256..4096 elements, Triton tiles 64..256
# and groups 8192.
P_NATIVE = 100_003
P_TRITON = 3_001
# A few fp32 roundings of the largest entry: the floor under which two correct fp32
# results cannot be told apart.
FP32_FLOOR = 2.0**-21


def _rel_err(G: torch.Tensor, ref: torch.Tensor) -> float:
    return ((G.double() - ref).abs().max() / ref.abs().max()).item()


def _ref(shards: list[torch.Tensor]) -> torch.Tensor:
    return sum(s.double() @ s.double().T for s in shards)


def _layout(k: int, P: int, dtype: torch.dtype, layout: str) -> list[torch.Tensor]:
    """Fresh random gradients as the shards that gram sees for `layout`."""
    if layout == "contiguous":
        return [torch.randn(k, P).to(dtype)]
    if layout == "strided":
        # Rows of a wider buffer: row stride P + 13, column stride 1, never copied.
        return [torch.randn(k, P + 13).to(dtype)[:, 5 : P + 5]]
    # Three parameter groups of unequal, odd sizes, one of them strided.
    a, b = P // 3, P // 5
    return [
        torch.randn(k, a).to(dtype),
        torch.randn(k, b + 7).to(dtype)[:, 7:],
        torch.randn(k, P - a - b).to(dtype),
    ]


def _torch_err(shards: list[torch.Tensor], ref: torch.Tensor) -> float:
    """Plain torch on the same inputs, in their dtype: the baseline error."""
    G = sum(s @ s.T for s in shards)
    return _rel_err(G, ref)


def _run(path: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if path == "native":
        arg = shards[0] if len(shards) == 1 else shards
        return gram(arg)
    return _gram_triton(shards)


@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "shards"])
@pytest.mark.parametrize("k", KS)
def test_fp32_matches_fp64_reference(path, layout, k):
    P = P_NATIVE if path == "native" else P_TRITON
    shards = _layout(k, P, torch.float32, layout)
    ref = _ref(shards)

    G = _run(path, shards)

    assert G.dtype == torch.float32 and G.shape == (k, k)
    assert torch.equal(G, G.T)
    # No further from float64 than torch's own fp32 product (or the fp32 floor).
    assert _rel_err(G, ref) <= max(2 * _torch_err(shards, ref), FP32_FLOOR)


@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "shards"])
@pytest.mark.parametrize("k", KS)
def test_bf16_within_twice_torch_bf16_error(path, layout, k):
    P = P_NATIVE if path == "native" else P_TRITON
    exact = _layout(k, P, torch.float64, layout)
    shards = [s.to(torch.bfloat16) for s in exact]
    # The reference is the Gram of the unrounded gradients; the baseline is torch's bf16
    # matmul of the same bf16 inputs, which rounds its result to bf16.
    ref = _ref(exact)

    G = _run(path, shards)

    assert _rel_err(G, ref) <= 2 * _torch_err(shards, ref)
    # Against the bf16 values themselves only fp32 summation error is left.
    assert _rel_err(G, _ref(shards)) <= 1e-6


@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_float_dtypes(path, dtype):
    P = P_NATIVE if path == "native" else P_TRITON
    shards = _layout(5, P, dtype, "strided")
    ref = _ref(shards)

    G = _run(path, shards)

    # fp16 products are exact in fp32; fp64 input is rounded to fp32 on the Triton path.
    assert _rel_err(G, ref) <= 1e-6


@pytest.mark.parametrize("k", [33, MAX_K])
def test_triton_largest_k(k):
    shards = _layout(k, 1_003, torch.bfloat16, "strided")
    assert _rel_err(_gram_triton(shards), _ref(shards)) <= 1e-6


def test_triton_programs_walk_several_groups():
    # With two programs and six groups of 8192 columns, each program sums three groups
    # into its float64 partial.
    X = torch.randn(5, 6 * 8192 - 37)
    G = _gram_triton(X, max_programs=2)
    assert _rel_err(G, _ref([X])) <= FP32_FLOOR


def test_native_matches_triton_on_many_small_shards():
    shards = [torch.randn(3, n) for n in (1, 2, 17, 255, 257, 1000)]
    ref = _ref(shards)
    assert _rel_err(gram(shards), ref) <= FP32_FLOOR
    assert _rel_err(_gram_triton(shards), ref) <= FP32_FLOOR


@pytest.mark.parametrize("path", ["native", "triton"])
def test_empty_shard_adds_nothing(path):
    X = torch.randn(4, 999)
    shards = [X, torch.randn(4, 0)]
    G = _run(path, shards)
    assert _rel_err(G, _ref([X])) <= FP32_FLOOR
    assert torch.equal(_run(path, [torch.randn(4, 0)]), torch.zeros(4, 4))


# numpy, under the interpreter, warns about inf * 0 in the masked (zero) padding.
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_gives_non_finite_entries(path, bad):
    X = torch.randn(5, 2_001)
    X[2, 1_234] = bad

    G = _run(path, [X])

    assert not torch.isfinite(G[2, 2])
    clean = [0, 1, 3, 4]
    assert torch.isfinite(G[clean][:, clean]).all()


def test_result_never_requires_grad():
    # G once carried a grad_fn whose backward warned and left x.grad unset: a silent zero.
    X = torch.randn(3, 1_001, requires_grad=True)
    G = gram([X, X[:, :77]])
    assert not G.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        G.sum().backward()


def test_native_is_deterministic():
    X = torch.randn(8, P_NATIVE)
    assert torch.equal(gram(X), gram(X))


def test_cpu_call_goes_through_native_op(monkeypatch):
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    # The Triton launcher must not run for CPU tensors.
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran for CPU tensors")

    # The package attribute `gram` is the function, so fetch the module itself.
    monkeypatch.setattr(importlib.import_module("mofast.kernels.gram"), "_gram_triton", fail)
    X = torch.randn(3, 101)
    with Record():
        gram(X)

    assert seen == [torch.ops.mofast.gram.default]
    table = torch._C._dispatch_dump_table("mofast::gram")
    assert "gram.cpp" in table.split("CPU: registered at")[1].splitlines()[0]


def test_no_host_sync():
    X = torch.randn(8, 10_007)
    with forbid_host_sync():
        gram(X)
        gram([X, X[:, :77]])
        _gram_triton([X[:, :1_001]])


def test_opcheck():
    X = torch.randn(3, 1_001)
    torch.library.opcheck(torch.ops.mofast.gram.default, ([X, X[:, :10]],))


@pytest.mark.parametrize(
    "grads, error, match",
    [
        (torch.randn(40, 5).T, ValueError, "column stride"),
        (torch.randint(0, 3, (3, 10)), TypeError, "dtype"),
        (torch.randn(30), ValueError, "2-D"),
        ([torch.randn(3, 10), torch.randn(4, 10)], ValueError, "same k"),
        ([], ValueError, "at least one"),
        (torch.randn(0, 10), ValueError, "k >= 1"),
        ("x", TypeError, "tensor"),
    ],
)
def test_bad_input_raises_a_clear_error(grads, error, match):
    with pytest.raises(error, match=match):
        gram(grads)
    with pytest.raises(error, match=match):
        _gram_triton(grads)


def test_native_op_checks_its_input():
    with pytest.raises(RuntimeError, match="column stride"):
        torch.ops.mofast.gram([torch.randn(40, 5).T])
    with pytest.raises(RuntimeError, match="same k"):
        torch.ops.mofast.gram([torch.randn(3, 10), torch.randn(4, 10)])


def test_triton_refuses_k_past_its_limit():
    with pytest.raises(ValueError, match=f"k <= {MAX_K}"):
        _gram_triton(torch.randn(MAX_K + 1, 100))


def test_tensor_core_tiles_keep_truncating_chains_short():
    # The tensor cores truncate every fp32 partial sum of a dot; a tile's chain is BLOCK / 16
    # steps, and test_cuda_matches_fp64_reference's bound grows with it.
    assert all(block // 16 <= 8 for block, _ in _TILES_MMA.values())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [*KS, 33, MAX_K])
def test_cuda_matches_fp64_reference(dtype, k):
    P = 1_000_003
    exact = torch.randn(k, P + 13, device="cuda", dtype=torch.float64)[:, :P]
    X = exact.to(dtype)
    ref = _ref([exact])

    G = gram([X[:, :12_345], X[:, 12_345:]])

    assert torch.equal(G, G.T)
    assert _rel_err(G, ref) <= max(2 * _torch_err([X], ref), FP32_FLOOR)
    # fp32 products round to nearest on the CUDA cores. The tensor cores truncate each of
    # the BLOCK / 16 partial sums of a tile's dot (a few ulps each, all towards zero), so
    # the diagonal may sit that far low; chained over a whole group it sat ~1e-5 low.
    limit = 1e-6
    if dtype != torch.float32:
        block, _ = _TILES_MMA[max(16, triton.next_power_of_2(k))]
        limit = max(limit, block // 16 * 2.0**-21)
    assert _rel_err(G, _ref([X])) <= limit


@requires_cuda
def test_cuda_no_sync():
    X = torch.randn(8, 1_000_003, device="cuda", dtype=torch.bfloat16)
    gram(X)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        G = gram([X, X[:, :999]])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert _rel_err(G, _ref([X, X[:, :999]])) <= 1e-6


# Compiles every launch configuration of the Triton kernels for an sm_90 GPU with the
# compiler and ptxas that ship in the triton wheel, so a kernel that the interpreter runs but
# the GPU compiler rejects fails here too, without a GPU. A fresh interpreter is needed
# because conftest has already made these kernels interpreted functions.
_COMPILE_GRAM = """
import importlib, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
g = importlib.import_module("mofast.kernels.gram")

def build(fn, signature, constexprs, num_warps):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

sizes = {"k": "i32", "P": "i64", "num_groups": "i32", "stride_row": "i64"}
for dtype, table, dot in [
    ("*bf16", g._TILES_MMA, True),
    ("*fp32", g._TILES_FMA, True),
    ("*fp32", g._TILES_BROADCAST, False),
]:
    for k_pad, (block, num_warps) in table.items():
        signature = {"x_ptr": dtype, "partial_ptr": "*fp64", **sizes}
        signature.update(dict.fromkeys(["K_PAD", "BLOCK", "TILES", "DOT", "UPCAST"], "constexpr"))
        constexprs = {"K_PAD": k_pad, "BLOCK": block, "TILES": g._GROUP_ELEMS // block,
                      "DOT": dot, "UPCAST": dtype != "*bf16"}
        build(g._gram_partial_kernel, signature, constexprs, num_warps)
for k_pad in (1, 16, 64):
    signature = {"partial_ptr": "*fp64", "out_ptr": "*fp32", "k": "i32", "num_partials": "i32",
                 "K_PAD": "constexpr", "ROWS": "constexpr"}
    build(g._gram_reduce_kernel, signature, {"K_PAD": k_pad, "ROWS": g._REDUCE_ROWS}, 4)
print("compiled")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    assert "compiled" in run_without_interpreter(_COMPILE_GRAM)
