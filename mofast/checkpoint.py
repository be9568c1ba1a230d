"""Atomic training checkpoints: a complete folder appears under its final name or not at all.

A checkpoint is written into a hidden temporary folder beside its destination, every file
flushed to disk, and the folder renamed into place; a rename within one file system is
atomic, so a process killed at any moment leaves either the previous checkpoints or the new
one complete, never a half-written `step-N` that a resume could load. Leftover temporary
folders are ignored and removed by the next save.

Layout of `RUN_DIR/checkpoints/step-00000012/`:
    model.safetensors   the policy's weights (tied weights stored once; a full state dict
                        gathered from FSDP shards is stored as given)
    state.pt            optimiser, lr schedule position, combinator, sampler position, RNG states,
                        trainer counters (plain tensors and containers: weights_only loads)
"""

import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """The random states a resumed run must continue from."""
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module | dict, state: dict, keep: int = 2
) -> Path:
    """Write checkpoint `step` atomically and keep only the `keep` newest; returns its folder.

    `model` is the module, or a full state dict of plain tensors (gathered FSDP shards).
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    final = folder / step_name(step)
    tmp = folder / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    if isinstance(model, dict):
        # Tied weights gathered from shards arrive as separate copies; safetensors refuses
        # tensors that share memory, so any that do are copied apart.
        seen: set[int] = set()
        weights = {}
        for name, tensor in model.items():
            tensor = tensor.detach().contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            weights[name] = tensor.clone() if pointer in seen else tensor
            seen.add(pointer)
        save_file(weights, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    _fsync_tree(tmp)

    if final.exists():
        # Saving the same step twice (a resumed run that saves again) replaces the old one;
        # the new folder is complete before the old one goes.
        old = folder / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(folder)

    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module | None) -> dict:
    """Load the weights of checkpoint folder `path` into `model` (unless None); return its
    state dict."""
    path = Path(path)
    if not _NAME.match(path.name) or not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete mofast checkpoint folder")
    if model is None:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: {missing} {unexpected}")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of checkpoint folder `path` as a state dict of CPU tensors."""
    return load_file(str(Path(path) / "model.safetensors"))
