"""combine: the native CPU op and the Triton kernel (through the interpreter here) against a
float64 reference, with outputs poisoned by NaN, strided rows, shards, mixed dtypes, an
output that aliases a gradient row, and bad input. On a GPU also: no host sync, and a
CUDA-graph capture of gram -> min_norm -> combine.

Errors are max |d - r| over the scale of the sum, max_p sum_i |c_i g_i[p]|.
"""

import importlib
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda
from mofast.kernels import combine, gram
from mofast.kernels.combine import _combine_triton
from offline_compile import run_without_interpreter
from sync_guard import forbid_host_sync
from torch.utils._python_dispatch import TorchDispatchMode

KS = [1, 2, 3, 5, 8, 17]
# Not a multiple of the blocks (native 4096, Triton 1024 columns and 8 rows).
P_NATIVE = 100_003
P_TRITON = 3_001
FP32_FLOOR = 2.0**-21
DTYPES = [torch.float32, torch.bfloat16]


def _ref(grads: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The float64 result, and the scale of any rounding error: max_p sum_i |c_i g_i[p]|.

    Measuring against that scale rather than |d| keeps cancellation in a sum from passing
    for a kernel error.
    """
    terms = c.double()[:, None] * grads.double()
    return terms.sum(0), terms.abs().sum(0).max().item()


def _rel_err(d: torch.Tensor, ref: tuple[torch.Tensor, float]) -> float:
    value, scale = ref
    return ((d.double() - value).abs().max() / scale).item()


def _grads(k: int, P: int, dtype: torch.dtype, strided: bool) -> torch.Tensor:
    if strided:
        return torch.randn(k, P + 13).to(dtype)[:, 3 : P + 3]
    return torch.randn(k, P).to(dtype)


def _poisoned(P: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((P,), float("nan"), dtype=dtype)


def _run(path: str, grads: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if path == "native":
        return combine(grads, c, out=out)
    _combine_triton(grads, c, out)
    return out


def _torch_baseline(grads: torch.Tensor, c: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Plain torch computing in the output's dtype: the error a kernel is judged against."""
    return (c.to(out_dtype)[:, None] * grads.to(out_dtype)).sum(0)


@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_matches_fp64_reference(path, strided, out_dtype, grad_dtype, k):
    P = P_NATIVE if path == "native" else P_TRITON
    grads = _grads(k, P, grad_dtype, strided)
    c = torch.rand(k) + 0.1
    ref = _ref(grads, c)
    out = _poisoned(P, out_dtype)

    d = _run(path, grads, c, out)

    assert d is out and not d.isnan().any()
    baseline = _rel_err(_torch_baseline(grads, c, out_dtype), ref)
    assert _rel_err(d, ref) <= max(2 * baseline, FP32_FLOOR)
    if out_dtype == torch.bfloat16:
        # Accumulated in fp32 and rounded once: within half a bf16 ulp (at most 2^-8 of the
        # value) of the reference, give or take the fp32 sum.
        value, scale = ref
        assert ((d.double() - value).abs() <= value.abs() * 2.0**-8 + 1e-6 * scale).all()


@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float64, torch.float32])
def test_other_dtypes(path, grad_dtype, out_dtype):
    P = P_NATIVE if path == "native" else P_TRITON
    grads = _grads(5, P, grad_dtype, strided=True)
    c = torch.rand(5)
    ref = _ref(grads, c)

    d = _run(path, grads, c, _poisoned(P, out_dtype))

    tol = 2.0**-11 if out_dtype == torch.float16 else FP32_FLOOR
    if grad_dtype == out_dtype == torch.float64:
        tol = 1e-14
    assert _rel_err(d, ref) <= tol


def test_default_out_is_new_and_in_grads_dtype():
    grads = _grads(3, P_NATIVE, torch.bfloat16, strided=True)
    c = torch.rand(3, dtype=torch.float64)
    d = combine(grads, c)
    assert d.dtype == torch.bfloat16 and d.shape == (P_NATIVE,)
    assert _rel_err(d, _ref(grads, c)) <= 2.0**-8


@pytest.mark.parametrize("path", ["native", "triton"])
def test_list_of_shards(path):
    sizes = [1, 1_000, 17, 2_049]
    shards = [torch.randn(5, n + 3)[:, 3:].to(torch.bfloat16) for n in sizes]
    c = torch.rand(5)
    outs = [_poisoned(n, torch.float32) for n in sizes]

    if path == "native":
        result = combine(shards, c, out=outs)
    else:
        result = [_run(path, g, c, o) for g, o in zip(shards, outs, strict=True)]

    assert all(r is o for r, o in zip(result, outs, strict=True))
    for g, o in zip(shards, outs, strict=True):
        assert _rel_err(o, _ref(g, c)) <= FP32_FLOOR


def test_list_of_shards_without_out():
    shards = [torch.randn(3, 11), torch.randn(3, 1_001)]
    c = torch.tensor([0.2, 0.3, 0.5])
    result = combine(shards, c)
    assert [r.shape for r in result] == [(11,), (1_001,)]
    for g, r in zip(shards, result, strict=True):
        assert _rel_err(r, _ref(g, c)) <= FP32_FLOOR


@pytest.mark.parametrize("path", ["native", "triton"])
def test_out_may_alias_a_gradient_row(path):
    P = P_NATIVE if path == "native" else P_TRITON
    grads = torch.randn(4, P)
    c = torch.rand(4)
    ref = _ref(grads, c)

    _run(path, grads, c, grads[2])

    assert _rel_err(grads[2], ref) <= FP32_FLOOR


@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("shift", [5, -5])
def test_out_partly_over_the_gradients_is_refused(path, shift):
    # Blocks are written as soon as they are summed: an out shifted against a row would
    # overwrite gradients that a later block still reads, so it must be refused.
    k, P = 3, 5_003
    buffer = torch.randn(k * P + 10)
    grads = buffer[5 : 5 + k * P].view(k, P)
    out = buffer[5 + P + shift : 5 + 2 * P + shift]
    with pytest.raises(ValueError, match="overlaps gradient row"):
        _run(path, grads, torch.rand(k), out)


@pytest.mark.parametrize("path", ["native", "triton"])
def test_out_in_another_dtype_over_a_row_is_refused(path):
    grads = torch.randn(3, 2_001)
    out = grads[1].view(torch.bfloat16)[:2_001]
    with pytest.raises(ValueError, match="overlaps gradient row 1"):
        _run(path, grads, torch.rand(3), out)


@pytest.mark.parametrize("path", ["native", "triton"])
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_weights_of_any_stride(path, layout):
    # The Triton kernel once read the weights as if contiguous.
    k = 5
    grads = torch.randn(k, P_TRITON)
    c = torch.rand(3 * k)[::3] if layout == "strided" else torch.rand(1).expand(k)
    out = _poisoned(P_TRITON, torch.float32)

    _run(path, grads, c, out)

    assert _rel_err(out, _ref(grads, c.contiguous())) <= FP32_FLOOR


@pytest.mark.parametrize("path", ["native", "triton"])
def test_non_finite_gradient_stays_local(path):
    grads = torch.randn(3, 2_001)
    grads[1, 77] = float("nan")
    grads[2, 1_500] = float("inf")
    out = _poisoned(2_001, torch.float32)

    _run(path, grads, torch.rand(3) + 0.1, out)

    assert out[77].isnan() and out[1_500].isinf()
    mask = torch.ones(2_001, dtype=torch.bool)
    mask[[77, 1_500]] = False
    assert out[mask].isfinite().all()


def test_weights_as_a_python_list():
    grads = torch.randn(3, 1_001)
    d = combine(grads, [0.25, 0.25, 0.5])
    assert _rel_err(d, _ref(grads, torch.tensor([0.25, 0.25, 0.5]))) <= FP32_FLOOR


def test_cpu_call_goes_through_native_op(monkeypatch):
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran for CPU tensors")

    # The package attribute `combine` is the function, so fetch the module itself.
    module = importlib.import_module("mofast.kernels.combine")
    monkeypatch.setattr(module, "_combine_triton", fail)
    grads, c, out = torch.randn(3, 101), torch.rand(3), torch.empty(101)
    with Record():
        combine(grads, c, out=out)

    assert seen == [torch.ops.mofast.combine.default]
    table = torch._C._dispatch_dump_table("mofast::combine")
    assert "combine.cpp" in table.split("CPU: registered at")[1].splitlines()[0]


def test_no_host_sync():
    grads = torch.randn(8, 10_007)
    c = torch.rand(8)
    with forbid_host_sync():
        combine(grads, c)
        combine(grads, c, out=torch.empty(10_007, dtype=torch.bfloat16))
        combine([grads, grads[:, :5]], c)
        _combine_triton(grads[:, :1_001], c, torch.empty(1_001))


def test_gram_min_norm_combine_pipeline_without_host_sync():
    from mofast.kernels import min_norm

    grads = torch.randn(5, 10_007, dtype=torch.bfloat16)
    out = _poisoned(10_007, torch.float32)
    with forbid_host_sync():
        c = min_norm(gram(grads), max_iters=20, tol=1e-8, method="frank-wolfe")
        combine(grads, c, out=out)

    assert _rel_err(out, _ref(grads, c)) <= FP32_FLOOR


def test_public_names_are_the_functions_in_any_import_order():
    # Importing a submodule binds it on the package under the op's own name, so a module
    # of one op importing another op's module would shadow that op's function.
    for names in ("combine, gram", "gram, combine"):
        code = f"from mofast.kernels import {names}; assert callable(gram) and callable(combine)"
        subprocess.run([sys.executable, "-c", code], check=True)


def test_opcheck():
    grads = torch.randn(3, 1_001)
    args = (grads, torch.rand(3), torch.empty(1_001))
    torch.library.opcheck(torch.ops.mofast.combine.default, args)


def _bad_cases():
    g = torch.randn(3, 10)
    c = torch.rand(3)
    return [
        ((g, torch.rand(4)), {}, ValueError, "shape \\[k\\]"),
        ((g, c), {"out": torch.empty(11)}, ValueError, "shape \\[P\\]"),
        ((g, c), {"out": torch.empty(20)[::2]}, ValueError, "contiguous"),
        ((g, c), {"out": torch.empty(10, dtype=torch.int32)}, TypeError, "dtype"),
        ((torch.randn(30, 3).T, c), {}, ValueError, "column stride"),
        ((g.to(torch.int64), c), {}, TypeError, "dtype"),
        ((g, torch.tensor([1, 2, 3])), {}, TypeError, "floating point"),
        ((g, c.to("meta")), {}, ValueError, "on meta"),
        (([g, g], c), {"out": torch.empty(10)}, TypeError, "list of 2 shards"),
        ((g, c), {"out": [torch.empty(10)]}, TypeError, "out must be a tensor"),
        ((g, 1.0), {}, ValueError, "c must have shape \\[k\\]"),
        ((g, c), {"out": torch.zeros(10, requires_grad=True)}, ValueError, "requires grad"),
    ]


@pytest.mark.parametrize("args, kwargs, error, match", _bad_cases())
def test_bad_input_raises_a_clear_error(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        combine(*args, **kwargs)


def test_native_op_checks_its_input():
    buffer = torch.randn(3 * 101 + 10)
    grads = buffer[5 : 5 + 303].view(3, 101)
    with pytest.raises(RuntimeError, match="overlaps gradient row 1"):
        torch.ops.mofast.combine(grads, torch.rand(3), buffer[5 + 104 : 5 + 205])
    with pytest.raises(RuntimeError, match="shape \\[P\\]"):
        torch.ops.mofast.combine(torch.randn(3, 10), torch.rand(3), torch.empty(9))
    with pytest.raises(RuntimeError, match="column stride"):
        torch.ops.mofast.combine(torch.randn(30, 3).T, torch.rand(3), torch.empty(30))


# Compiles the Triton kernel for an sm_90 GPU with the compiler and ptxas that ship in the
# triton wheel, for every pair of gradient and output dtypes, so a kernel that the
# interpreter runs but the GPU compiler rejects fails here too. A fresh interpreter is
# needed because conftest has already made the kernel an interpreted function.
_COMPILE_COMBINE = """
import importlib, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
c = importlib.import_module("mofast.kernels.combine")

pointers = ["*fp32", "*bf16", "*fp16", "*fp64"]
for grads in pointers:
    for out in pointers:
        signature = {"grads_ptr": grads, "weights_ptr": "*fp32", "out_ptr": out, "k": "i32",
                     "P": "i64", "stride_row": "i64", "stride_w": "i64"}
        signature.update(
            dict.fromkeys(["ROWS", "BLOCK", "ACC_DTYPE", "BF16_BY_BITS"], "constexpr")
        )
        constexprs = {"ROWS": c._MAX_ROWS, "BLOCK": c._BLOCK, "BF16_BY_BITS": False,
                      "ACC_DTYPE": tl.float64 if grads == "*fp64" else tl.float32}
        src = ASTSource(fn=c._combine_kernel, signature=signature, constexprs=constexprs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


@pytest.mark.slow
def test_triton_kernel_compiles_for_sm90():
    assert "compiled" in run_without_interpreter(_COMPILE_COMBINE)


@requires_cuda
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [*KS, 64])
def test_cuda_matches_fp64_reference(k, grad_dtype, out_dtype):
    P = 1_000_003
    grads = torch.randn(k, P + 13, device="cuda").to(grad_dtype)[:, :P]
    c = torch.rand(k, device="cuda") + 0.1
    ref = _ref(grads, c)
    out = torch.full((P,), float("nan"), device="cuda", dtype=out_dtype)

    combine(grads, c, out=out)

    baseline = _rel_err(_torch_baseline(grads, c, out_dtype), ref)
    assert _rel_err(out, ref) <= max(2 * baseline, FP32_FLOOR)


@requires_cuda
def test_cuda_no_sync():
    grads = torch.randn(8, 1_000_003, device="cuda", dtype=torch.bfloat16)
    c = torch.rand(8, device="cuda")
    out = torch.empty(1_000_003, device="cuda")
    gram(grads)
    combine(grads, c, out=out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        G = gram(grads)
        combine(grads, G[0] / G[0].sum(), out=out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    w = G[0] / G[0].sum()
    assert _rel_err(out, _ref(grads, w)) <= FP32_FLOOR


@requires_cuda
def test_cuda_weights_from_a_python_list_upload_without_a_sync():
    # From pageable memory the upload would synchronise the stream; it goes through pinned
    # memory instead.
    grads = torch.randn(5, 100_003, device="cuda")
    c = (torch.rand(5) + 0.1).tolist()
    out = torch.empty(100_003, device="cuda")
    combine(grads, c, out=out)
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        combine(grads, c, out=out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert _rel_err(out, _ref(grads, torch.tensor(c, device="cuda"))) <= FP32_FLOOR


@requires_cuda
def test_cuda_graph_gram_min_norm_combine():
    from mofast.kernels import min_norm

    k, P = 5, 1_000_003
    grads = torch.randn(k, P, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(P, device="cuda", dtype=torch.float32)

    def step():
        c = min_norm(gram(grads), max_iters=20, tol=1e-8, method="frank-wolfe")
        combine(grads, c, out=out)
        return c

    # Compile the kernels and warm the allocator on a side stream before capturing.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c_graph = step()

    grads.copy_(torch.randn(k, P, device="cuda"))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()

    c_eager = min_norm(gram(grads), max_iters=20, tol=1e-8, method="frank-wolfe")
    assert torch.allclose(c_graph, c_eager, atol=1e-6)
    assert _rel_err(out, _ref(grads, c_eager)) <= FP32_FLOOR
