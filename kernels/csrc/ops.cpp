// The `mofast` operator library: schemas of the standalone ops, and the Python module
// whose import registers them. The CPU implementations live beside this file (one
// TORCH_LIBRARY_IMPL block each); the CUDA implementations are Triton kernels that
// mofast.kernels registers from Python under the same names.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mofast, m) {
  // grads: [k, P_j] shards whose Gram matrices add up -> float32 [k, k]
  m.def("gram(Tensor[] shards) -> Tensor");
  // grads: [k, P], weights: float32 [k], out: [P] (any float dtype) <- sum_i w_i grads[i]
  m.def("combine(Tensor grads, Tensor weights, Tensor(a!) out) -> ()");
  // gram: [B, k, k] float32/float64 -> (weights [B, k] on the simplex, iterations int32 [B],
  // converged bool [B])
  m.def("min_norm(Tensor gram, int max_iters, float tol, str method) -> (Tensor, Tensor, Tensor)");
}

static struct PyModuleDef mofast_native_module = {
    PyModuleDef_HEAD_INIT, "_C", "mofast native CPU kernels (registered with torch.library)",
    -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mofast_native_module); }
