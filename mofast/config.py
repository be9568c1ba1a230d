"""The training configuration: one dataclass, YAML in and out, a command-line flag per field.

Precedence, lowest first: the dataclass defaults (SPEC section 5), a YAML file (`--config`),
then the command-line flags. Every field has a flag, so a YAML file is never required.
"""

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DATA_MODES = ("pairs", "ultrafeedback", "cdpo")
REFERENCE_MODES = ("auto", "precompute", "online")
GRAD_DTYPES = ("float32", "bfloat16")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")
SWITCHES = ("auto", "on", "off")
PARALLEL = ("none", "ddp", "fsdp")


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; the defaults are the published recipe (SPEC section 5)."""

    # The policy, which is also the frozen reference: a local Hugging Face folder, a hub
    # id, or a .gguf file. None means the shipped stories260K model.
    model: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    # CPU threads for torch (None: torch's default, one per core).
    threads: int | None = None
    # The model's compute dtype (auto: bfloat16 on CUDA, float32 elsewhere). With float32
    # `grad_dtype` a lower one runs under autocast over float32 weights (trainer.select_backend).
    dtype: str = "auto"
    attn_implementation: str = "auto"
    liger: str = "auto"
    gradient_checkpointing: bool = False
    # Several processes launched by torchrun: `ddp` (replicated weights, gradients averaged
    # per objective) or `fsdp` (FSDP2 shards; the Gram matrix is summed over shards with one
    # all-reduce of k*k floats). `micro_batch` is then per rank (mofast/distributed.py).
    parallel: str = "none"

    # Data. `pairs`: one {prompt, chosen, rejected} dataset per objective (`objectives`
    # maps a name to a local JSON/JSONL/Parquet file or a hub name; None means the shipped
    # default). `ultrafeedback`: one objective per aspect from UltraFeedback-schema records
    # in `dataset`; `cdpo`: a single objective on the summed aspect scores of `dataset`.
    data_mode: str = "pairs"
    objectives: dict[str, str] | None = None
    dataset: str | None = None
    max_length: int = 1024
    max_pairs: int | None = None
    test_fraction: float = 15 / 64
    split_seed: int = 0

    # The objective and its combination (SPEC sections 1 and 2).
    combinator: str = "mgda-decoupled"
    beta: float = 0.5
    eta: float = 0.1
    solver_method: str = "frank-wolfe"
    solver_max_iters: int = 20
    solver_tol: float = 1e-8
    eps: float = 1e-12

    # Optimisation (SPEC section 5).
    lr: float = 1e-7
    warmup_ratio: float = 0.03
    epochs: int = 1
    # The run's optimiser steps when set, in place of `epochs` (as in TRL / Hugging Face).
    max_steps: int | None = None
    micro_batch: int = 8
    grad_accum: int = 4
    grad_dtype: str = "float32"
    seed: int = 0

    # Reference log-probabilities: `precompute` computes them once for every pair and caches
    # them on disk (keyed by the reference weights and the tokenised data); `online` keeps a
    # frozen copy of the model and computes them with each micro-batch; `auto` uses the cache
    # when it exists, else whichever costs fewer forward passes for this run. `cache_dir`
    # holds the tokenised pairs and the reference log-probs (default: `datasets`' cache for
    # the pairs, ~/.cache/mofast for the log-probs).
    reference: str = "auto"
    cache_dir: str | None = None

    # Outputs.
    output_dir: str | None = None
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    save_model: bool = True
    plots: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""
        for name, allowed in field_choices().items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

        # Comparisons with NaN are false, so a NaN would slip past the range checks below.
        for name, annotation in _field_types().items():
            value = getattr(self, name)
            if annotation is float and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")

        positive = ("max_length", "micro_batch", "grad_accum", "epochs", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_pairs", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 or null, got {getattr(self, name)}")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("save_every must be >= 0 and keep_checkpoints >= 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.objectives is not None and not self.objectives:
            raise ValueError("objectives must name at least one objective, or be null")
        if self.data_mode != "pairs" and not self.dataset:
            raise ValueError(f"data_mode {self.data_mode!r} needs `dataset` (a file or hub name)")
        # A field the chosen mode does not read would be ignored without a word.
        if self.data_mode != "pairs" and self.objectives is not None:
            raise ValueError(
                f"objectives is read only with data_mode 'pairs'; data_mode {self.data_mode!r} "
                "takes its objectives from the UltraFeedback aspects of `dataset` "
                "(--objectives null clears one that a config file sets)"
            )
        if self.data_mode == "pairs" and self.dataset is not None:
            raise ValueError(
                "dataset is read only with data_mode 'ultrafeedback' or 'cdpo'; with 'pairs' "
                "name one file or hub dataset per objective in `objectives` (--dataset null "
                "clears one that a config file sets)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: object, annotation: object) -> object:
    """Check a YAML-parsed value against a field's annotation, converting int -> float."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{name} may not be null")

    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option)
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):
            # PyYAML reads `1e-7` (no dot) as text.
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if origin is dict and isinstance(value, dict):
            # The values are file paths or hub names: null, lists or mappings are mistakes.
            texts = (str, int, float)
            if all(isinstance(v, texts) and not isinstance(v, bool) for v in value.values()):
                return {str(k): str(v) for k, v in value.items()}
    raise ValueError(f"{name} expects {_describe(annotation)}, got {value!r}")


def _describe(annotation: object) -> str:
    """A field's type in words: 'a number', 'an integer or null', ..."""
    words = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a text",
        type(None): "null",
    }
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    named = [
        "a mapping of names to files or hub names"
        if typing.get_origin(option) is dict
        else words.get(option, str(option))
        for option in options
    ]
    return " or ".join(named)


def _is_union(annotation: object) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A config from `base` (or the defaults) with `values` replacing fields by name."""
    types_of = _field_types()
    unknown = sorted(set(values) - set(types_of))
    if unknown:
        raise ValueError(f"unknown config fields: {', '.join(unknown)}")

    merged = (base or TrainConfig()).to_dict()
    for name, value in values.items():
        merged[name] = _coerce(name, value, types_of[name])
    return TrainConfig(**merged)


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or the name of a config shipped in mofast/configs/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file {name_or_path!r} (shipped configs: {shipped})")


def load_yaml(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    with open(resolve_config_path(str(path))) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds a mapping of field names to values")
    return from_dict(values, base)


def dump_yaml(config: TrainConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every field that takes one of a few names."""
    from mofast.combinators import COMBINATORS, SOLVER_METHODS

    return {
        "data_mode": DATA_MODES,
        "reference": REFERENCE_MODES,
        "grad_dtype": GRAD_DTYPES,
        "dtype": MODEL_DTYPES,
        "attn_implementation": ATTENTION,
        "liger": SWITCHES,
        "parallel": PARALLEL,
        "combinator": tuple(COMBINATORS),
        "solver_method": tuple(SOLVER_METHODS),
    }


# One line per field for `mofast train --help`; the comments in TrainConfig say more.
FIELD_HELP = {
    "model": "policy (and frozen reference): local folder, hub id, .gguf file or a shipped "
    "model's name; null: the shipped stories260K",
    "tokenizer": "tokenizer if not the model's",
    "device": "auto, cpu, cuda or cuda:N",
    "threads": "CPU threads for torch",
    "dtype": "the model's compute dtype (auto: bfloat16 on CUDA, float32 elsewhere)",
    "attn_implementation": "attention kernel (auto: Flash Attention 2 where installed, else SDPA)",
    "liger": "Liger-Kernel's layer kernels on CUDA",
    "gradient_checkpointing": "recompute activations in the backward",
    "parallel": "under torchrun: ddp or fsdp (FSDP2)",
    "data_mode": "pairs: one preference dataset per objective; ultrafeedback: one objective "
    "per aspect of `dataset`; cdpo: one objective on the summed aspects",
    "objectives": "pairs mode: {name: file or hub dataset}; null: the embedded default",
    "dataset": "ultrafeedback / cdpo mode: UltraFeedback-schema file or hub dataset",
    "max_length": "tokens per row (prompt cut from the left first)",
    "max_pairs": "use the first N pairs of each objective",
    "test_fraction": "share of prompts held out (ultrafeedback / cdpo)",
    "split_seed": "seed of the split by prompt",
    "combinator": "how the objectives' gradients are mixed",
    "beta": "DPO beta",
    "eta": "groupdro step size",
    "solver_method": "min-norm solver of the mgda family",
    "solver_max_iters": "Frank-Wolfe iterations",
    "solver_tol": "Frank-Wolfe tolerance",
    "eps": "guard for zero losses or gradient norms",
    "lr": "AdamW learning rate (peak of the cosine schedule)",
    "warmup_ratio": "share of the steps in linear warm-up",
    "epochs": "passes over the largest objective's pairs",
    "max_steps": "optimiser steps, in place of epochs",
    "micro_batch": "pairs per objective and micro-batch (per rank under torchrun)",
    "grad_accum": "micro-batches per optimiser step",
    "grad_dtype": "dtype of the [k, P] gradient buffer (float32 keeps float32 weights)",
    "seed": "sampling seed",
    "reference": "reference log-probs: precomputed and cached, online, or auto",
    "cache_dir": "tokenised pairs and reference log-probs",
    "output_dir": "run folder (default runs/<time>-<combinator>)",
    "log_every": "steps between metric flushes (the one host synchronisation)",
    "save_every": "steps between checkpoints (0: the last step only)",
    "keep_checkpoints": "newest checkpoints kept",
    "save_model": "write the final model",
    "plots": "write plots at the end",
    "tensorboard": "write TensorBoard scalars",
}


def add_field_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--field-name VALUE` flag per field; a value is read as YAML (null, true, 1e-7)."""
    group = parser.add_argument_group("config fields (override the YAML file)")
    choices = field_choices()
    for field in dataclasses.fields(TrainConfig):
        allowed = f"; one of {', '.join(choices[field.name])}" if field.name in choices else ""
        group.add_argument(
            flag_of(field.name),
            dest=field.name,
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=f"{FIELD_HELP[field.name]}{allowed} (recipe default {field.default!r})",
        )


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The fields given on the command line, each value parsed as YAML."""
    types_of = _field_types()
    overrides = {}
    for field in dataclasses.fields(TrainConfig):
        if not hasattr(args, field.name):
            continue
        raw = getattr(args, field.name)
        options = typing.get_args(types_of[field.name]) or (types_of[field.name],)
        if not isinstance(raw, str):
            overrides[field.name] = raw
        elif str in options:
            # YAML would read `on`, `off` or `1e-7` as other types; a text field stays text.
            null = type(None) in options and raw.lower() in ("null", "none", "~")
            overrides[field.name] = None if null else raw
        else:
            overrides[field.name] = yaml.safe_load(raw)
    return overrides
