"""Loads the native extension that registers the `mofast::*` ops and their CPU code."""

import torch

try:
    from mofast.kernels import _C  # noqa: F401  (importing registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "mofast's native extension (mofast.kernels._C) is missing or was built against "
        f"another torch release (torch {torch.__version__} is installed). Rebuild it with "
        "`pip install --no-build-isolation -e .` in the repository."
    ) from exc

NATIVE_LIBRARY = _C.__file__
