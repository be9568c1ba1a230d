"""mofast: multi-objective DPO with fused Gram, min-norm and log-prob kernels."""

__version__ = "0.1.0"
