"""mofast's standalone ops: Gram matrix, batched min-norm solver, fused combine, and the
fused DPO sequence log-probabilities.

Importing this package needs only torch, triton (for the CUDA path) and the native
extension; it never imports transformers or datasets. Every public function picks its
device path itself: Triton kernels for CUDA tensors, the native C++ code (or a chunked
torch path) for CPU tensors.
"""

# This folder is installed as `mofast.kernels`. When the repository root is on sys.path it
# is also visible as a top-level `kernels`, the import name of Hugging Face's `kernels`
# package, which transformers probes for; imported under that name it stays empty so the
# probe finds no usable version and nothing is registered twice.
if __name__ == "mofast.kernels":
    from mofast.kernels import _native  # noqa: F401  (registers the mofast::* ops)
    from mofast.kernels.combine import combine
    from mofast.kernels.gram import gram
    from mofast.kernels.logprobs import sequence_logprobs
    from mofast.kernels.min_norm import min_norm

    __all__ = ["gram", "min_norm", "combine", "sequence_logprobs"]
