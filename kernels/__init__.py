"""mofast's standalone ops: Gram matrix, batched min-norm solver, fused combine, and the
fused DPO sequence log-probabilities.

Importing this package needs only torch, triton (for the CUDA path) and the native
extension; it never imports transformers or datasets. Every public function picks its
device path itself: Triton kernels for CUDA tensors, the native C++ code (or a chunked
torch path) for CPU tensors.
"""

__all__ = ["gram", "min_norm", "combine", "sequence_logprobs"]

# This folder is installed as `mofast.kernels`. When the repository root is on sys.path
# (`python -m pytest` or `python -m mofast` run from it) it is also visible as a top-level
# `kernels`, the import name of Hugging Face's `kernels` package that transformers imports.
# Imported under that name, it loads that package in its own place when it is installed
# and otherwise stays an empty module, so transformers behaves as it would elsewhere.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _repo_root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)

if __name__ == "mofast.kernels":
    from mofast.kernels import _native  # noqa: F401  (registers the mofast::* ops)
    from mofast.kernels.combine import combine
    from mofast.kernels.gram import gram
    from mofast.kernels.logprobs import sequence_logprobs
    from mofast.kernels.min_norm import min_norm
