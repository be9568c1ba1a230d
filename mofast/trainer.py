"""The multi-objective DPO training loop (SPEC sections 1, 2, 4 and 5).

One optimiser step:
  1. for each objective i, every micro-batch of its window runs forward and backward with
     the parameters' `.grad` pointing at views of row i of one [k, P] gradient buffer, so
     autograd accumulates objective i's gradient in place (the window's loss is the mean
     over all its pairs: each micro-batch's summed loss is scaled by 1 / pairs in window);
  2. G = gram(buffer), c = combinator.weights(losses, G), combine(buffer, c, out=flat)
     where `flat` is the parameters' own flat gradient;
  3. fused AdamW steps, skipping the update on the device when a loss, a gradient or a
     coefficient is not finite (its `found_inf` input); the lr schedule, a device tensor,
     advances only with an applied update.
Nothing in a step reads a device value on the host: per-step losses, coefficients and Gram
matrices stay on the device and are flushed to metrics.jsonl every `log_every` steps.

With several ranks (`parallel` ddp or fsdp, launched by torchrun) each rank trains on its
slice of every micro-batch, and step 2 starts with one all-reduce of the partial Gram matrix
(fsdp) and the window statistics; see mofast/distributed.py.
"""

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mofast import checkpoint, distributed, dpo
from mofast.assets import STORIES260K, find_local_model, shadow_hint, shipped_models
from mofast.config import TrainConfig, dump_yaml
from mofast.kernels import combine, gram

logger = logging.getLogger(__name__)

_GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Device, precision and kernel selection


@dataclasses.dataclass(frozen=True)
class Backend:
    """How the model runs: its weights' dtype, the forward's autocast dtype (None: the
    weights' own), its attention implementation and whether Liger patches it."""

    device: str
    dtype: torch.dtype
    attn_implementation: str
    liger: bool
    autocast: torch.dtype | None = None


def select_backend(
    device_type: str,
    *,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    liger: str = "auto",
    model_type: str | None = None,
    attn_softcap: bool = False,
    flash_attn_installed: bool = False,
    liger_model_types: frozenset[str] = frozenset(),
    float32_master: bool = False,
) -> Backend:
    """The backend for a device (a pure function of its arguments).

    CUDA: bfloat16, Flash Attention 2 when installed (else SDPA), Liger-Kernel's layer
    kernels (RMS norm, RoPE, SwiGLU; never its loss, which our fused log-prob replaces) when
    it patches `model_type`. Elsewhere: float32 and SDPA, no Liger (its kernels are
    Triton-only). A model that soft-caps its attention logits (Gemma-2) gets Flash Attention
    (which soft-caps) or eager attention, never SDPA. An explicit request that cannot be met
    raises ValueError naming the reason.

    With `float32_master` a lower-precision dtype becomes the forward's autocast dtype and the
    weights stay float32: an AdamW step is about lr (1e-7 in the recipe), far below half the
    spacing of bfloat16 numbers near a typical weight (~6e-5 at 0.02), so bfloat16 weights
    would round every update away.
    """
    cuda = device_type == "cuda"

    if dtype == "auto":
        chosen_dtype = torch.bfloat16 if cuda else torch.float32
    elif dtype in _MODEL_DTYPES:
        chosen_dtype = _MODEL_DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {list(_MODEL_DTYPES)}")

    if attn_implementation == "auto":
        if cuda and flash_attn_installed:
            attn = "flash_attention_2"
        else:
            attn = "eager" if attn_softcap else "sdpa"
    elif attn_implementation == "flash_attention_2":
        if not cuda:
            raise ValueError("flash_attention_2 needs a CUDA device")
        if not flash_attn_installed:
            raise ValueError("flash_attention_2 requested but flash-attn is not installed")
        attn = attn_implementation
    elif attn_implementation == "sdpa" and attn_softcap:
        raise ValueError("SDPA cannot soft-cap attention logits, which this model needs")
    elif attn_implementation in ("sdpa", "eager"):
        attn = attn_implementation
    else:
        raise ValueError(f"unknown attention implementation {attn_implementation!r}")

    supported = model_type in liger_model_types
    if liger == "auto":
        use_liger = cuda and supported
    elif liger == "on":
        if not cuda:
            raise ValueError("Liger-Kernel's kernels need a CUDA device")
        if not supported:
            raise ValueError(f"Liger-Kernel does not patch model type {model_type!r}")
        use_liger = True
    elif liger == "off":
        use_liger = False
    else:
        raise ValueError(f"liger must be auto, on or off, got {liger!r}")

    autocast = None
    if float32_master and chosen_dtype != torch.float32:
        chosen_dtype, autocast = torch.float32, chosen_dtype
    return Backend(device_type, chosen_dtype, dpo.causal_attention(attn), use_liger, autocast)


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _liger_model_types() -> frozenset[str]:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return frozenset()
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


# ---------------------------------------------------------------------------------------------
# Model and tokenizer


def model_location(source: str | None) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) of a model given as in the config: a
    local folder, a .gguf file, a shipped model's name (`stories260K`) or a hub id."""
    if source is None:
        return str(STORIES260K), {}
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    local = find_local_model(source)
    if local is not None:
        hint = shadow_hint(source)
        if hint and local.is_dir() and not (local / "config.json").is_file():
            raise FileNotFoundError(f"{source} holds no model (no config.json){hint}")
        return str(local), {}

    # A hub id is "name" or "namespace/name"; anything else was meant as a path (transformers
    # would report it as a malformed hub id, deep in a traceback). A namespace that is also a
    # local folder stays a hub id (`Qwen/...` beside a folder `Qwen`): `_pretrained` names
    # the missing folder if the hub has no such model either.
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(
            f"no model folder at {source} (expected a local folder, a .gguf file, a shipped "
            f"model ({', '.join(shipped_models())}) or a hub id such as Qwen/Qwen2.5-0.5B-Instruct)"
        )
    return source, {}


def _pretrained(load, source: str | None, **options):
    """`load(location, ...)` (a from_pretrained) of a model given as in the config. A hub id
    whose first part is a local folder may be a mistyped path under it (`runs/typo`): when
    loading it fails, the error names the missing folder, not only the failed download."""
    location, kwargs = model_location(source)
    try:
        return load(location, **kwargs, **options)
    except OSError as error:
        parts = Path(location).parts
        under_local = len(parts) > 1 and Path(parts[0]).is_dir() and not Path(location).exists()
        if location != source or not under_local:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"no model folder at {source} ({parts[0]} is a local folder), and loading it "
            f"as a hub id failed: {reason}"
        ) from error


def load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    return _pretrained(AutoTokenizer.from_pretrained, config.tokenizer or config.model)


def load_model(config: TrainConfig, device: torch.device, *, move: bool = True):
    """The policy model with the backend selected for `device`, moved there unless `move` is
    False (FSDP moves only each rank's shards); returns (model, backend)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dpo.register_causal_attention()
    model_config = _pretrained(AutoConfig.from_pretrained, config.model)
    backend = select_backend(
        device.type,
        dtype=config.dtype,
        attn_implementation=config.attn_implementation,
        liger=config.liger,
        model_type=model_config.model_type,
        attn_softcap=getattr(model_config, "attn_logit_softcapping", None) is not None,
        flash_attn_installed=_flash_attn_installed(),
        liger_model_types=_liger_model_types() if device.type == "cuda" else frozenset(),
        # FSDP2 keeps float32 master shards itself (distributed.wrap); float32 gradient
        # buffers mean float32 weights elsewhere.
        float32_master=config.grad_dtype == "float32" and config.parallel != "fsdp",
    )

    model = _pretrained(
        AutoModelForCausalLM.from_pretrained,
        config.model,
        dtype=backend.dtype,
        attn_implementation=backend.attn_implementation,
    )
    if move:
        model.to(device)
    if backend.liger:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=model,
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _disable_dropout(model)
    return model, backend


def _disable_dropout(model: torch.nn.Module) -> None:
    # As TRL does for DPO: with dropout the policy at step 0 would not equal the reference.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's class, configuration and every weight's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model).__name__.encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_final_model(model, tokenizer, out_dir: Path, weights: dict | None = None) -> None:
    """Hugging Face format (safetensors) with the tokenizer; `weights` (a full state dict,
    e.g. gathered from FSDP shards) replaces the model's own state dict when given.

    transformers cannot save a model loaded from GGUF directly; its weights are copied into a
    freshly built model of the same configuration first (done for every model: it is cheap
    next to training and keeps one code path).
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attribute in ("_attn_implementation", "_attn_implementation_internal"):
        if hasattr(config, attribute):
            setattr(config, attribute, None)
    dtype = model.dtype if not weights else next(iter(weights.values())).dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(model.state_dict() if weights is None else weights)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Per-objective gradient buffers


class GradientBuffers:
    """One [k, P] buffer of per-objective flat gradients plus the parameters' flat gradient.

    While objective i runs its backward passes, each parameter's `.grad` is a view of row i
    (same dtype as the parameters), and autograd accumulates into it in place. When the
    buffer's dtype differs from the parameters', `.grad` cannot be such a view; then a
    post-accumulate-grad hook adds each parameter's fresh gradient into row i (converting
    the dtype) and frees it, which costs one temporary gradient per parameter.

    Parameters sharded by FSDP2 (DTensors) contribute their local shards: P is this rank's
    share, and each `.grad` is a DTensor over a view of the buffer, which FSDP's
    reduce-scatter accumulates into in place.
    """

    def __init__(self, params: list[torch.nn.Parameter], k: int, dtype: torch.dtype):
        if not params:
            raise ValueError("the model has no trainable parameters")
        local = [_local_tensor(p) for p in params]
        dtypes = {t.dtype for t in local}
        devices = {t.device for t in local}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"parameters must share one dtype and device, got {dtypes} {devices}")

        self.params = params
        self.k = k
        self.numel = sum(t.numel() for t in local)
        device, param_dtype = local[0].device, local[0].dtype
        sharded = any(t is not p for t, p in zip(local, params, strict=True))
        if sharded and dtype != param_dtype:
            raise ValueError(
                f"sharded parameters need gradient buffers in their own dtype ({param_dtype}), "
                f"got grad_dtype {dtype}: set grad_dtype to match the model's dtype"
            )
        self.rows = torch.zeros(k, self.numel, dtype=dtype, device=device)
        # combine writes the mixture over row 0 in place (each element is read before it is
        # written), so the parameters' flat gradient costs no memory of its own unless the
        # buffer dtype differs from theirs; the next step zeroes the rows anyway.
        self.shares_row0 = dtype == param_dtype
        if self.shares_row0:
            self.flat = self.rows[0]
        else:
            self.flat = torch.zeros(self.numel, dtype=param_dtype, device=device)

        offsets = [0]
        for t in local:
            offsets.append(offsets[-1] + t.numel())
        spans = list(zip(offsets[:-1], offsets[1:], strict=True))
        triples = list(zip(params, local, spans, strict=True))
        self._row_views = [
            [_as_grad(p, self.rows[i, a:b].view_as(t)) for p, t, (a, b) in triples]
            for i in range(k)
        ]
        self._flat_views = [_as_grad(p, self.flat[a:b].view_as(t)) for p, t, (a, b) in triples]

        self.uses_hooks = dtype != param_dtype
        self._active: int | None = None
        self._hooks = []
        if self.uses_hooks:
            for index, p in enumerate(params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, index: int):
        def accumulate(param: torch.Tensor) -> None:
            if self._active is None:
                raise RuntimeError("a backward pass ran outside GradientBuffers.accumulate_into")
            self._row_views[self._active][index].add_(param.grad)
            param.grad = None

        return accumulate

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + (0 if self.shares_row0 else self.flat.nbytes)

    def zero_(self) -> None:
        self.rows.zero_()

    def accumulate_into(self, i: int) -> None:
        """Route the next backward passes' gradients into row i."""
        self._active = i
        for p, view in zip(self.params, self._row_views[i], strict=True):
            p.grad = None if self.uses_hooks else view

    def point_at_flat(self) -> None:
        """Make every `.grad` a view of the flat gradient the optimiser reads."""
        self._active = None
        for p, view in zip(self.params, self._flat_views, strict=True):
            p.grad = view

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _as_grad(param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """`view` as a gradient for `param`: a DTensor with the parameter's layout if it is one."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return view
    return DTensor.from_local(
        view,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


# ---------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class MicroBatch:
    """Chosen rows then rejected rows of `pairs` pairs, right-padded, on the device."""

    input_ids: torch.Tensor  # [2 * pairs, T]
    labels: torch.Tensor  # [2 * pairs, T]
    reference: torch.Tensor | None  # [2 * pairs] precomputed reference log-probs, or None
    pairs: int
    tokens: int  # non-padding tokens (counted on the host)


def build_objectives(config: TrainConfig, tokenizer) -> tuple[dict, dict[str, Counter]]:
    """{objective: tokenised datasets.Dataset} and {objective: Counter of dropped pairs}."""
    from mofast import data

    stats: dict[str, Counter] = {}
    if config.data_mode == "pairs":
        if config.objectives is None:
            pairs = data.default_objectives(stats)
        else:
            pairs = {
                name: data.load_preferences(source, stats.setdefault(name, Counter()))
                for name, source in config.objectives.items()
            }
    else:
        mode = "aspects" if config.data_mode == "ultrafeedback" else "cdpo"
        records = data.load_rows(config.dataset)
        try:
            everything = data.ultrafeedback_objectives(records, stats, mode=mode)
        except ValueError as error:
            raise ValueError(f"{config.dataset}: {error}") from None
        pairs, _ = data.split_objectives(
            everything, test_fraction=config.test_fraction, seed=config.split_seed
        )

    if config.max_pairs is not None:
        pairs = {name: rows[: config.max_pairs] for name, rows in pairs.items()}
    cache = Path(config.cache_dir) / "pairs" if config.cache_dir else None
    encoded = {
        name: data.tokenize_objective(
            tokenizer,
            rows,
            max_length=config.max_length,
            stats=stats.setdefault(name, Counter()),
            cache_dir=cache,
        )
        for name, rows in pairs.items()
    }
    empty = [name for name, dataset in encoded.items() if len(dataset) == 0]
    if empty:
        raise ValueError(f"objectives with no pair left to train on: {', '.join(empty)}")
    return encoded, stats


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Multi-objective DPO on one device, or on several ranks under DDP or FSDP2
    (mofast/distributed.py); `fit()` runs to the end and writes the run folder (rank 0)."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, *, resume: bool = False):
        from mofast import data
        from mofast.combinators import make_combinator

        self.config = config
        self.context = distributed.setup(config.parallel)
        if not self.context.is_main:
            # Every rank would repeat rank 0's progress messages; warnings still show.
            logging.getLogger("mofast").setLevel(logging.WARNING)
        self.run_dir = Path(run_dir)
        if not resume and checkpoint.list_checkpoints(self.run_dir):
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints of a run: resume it with "
                "--resume, or choose another --output-dir"
            )
        torch.manual_seed(config.seed)
        if config.threads is not None:
            torch.set_num_threads(config.threads)

        self.device = distributed.device_of(self.context, resolve_device(config.device))
        self.tokenizer = load_tokenizer(config)
        self.model, self.backend = load_model(config, self.device, move=not self.context.sharded)
        logger.info(
            "model %s on %s: %s weights%s, attention %s, liger %s, %.1fM parameters",
            config.model or "stories260K (shipped)",
            self.device,
            self.backend.dtype,
            f" under {self.backend.autocast} autocast" if self.backend.autocast else "",
            self.backend.attn_implementation,
            self.backend.liger,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
        )

        self.datasets, self.drop_counts = build_objectives(config, self.tokenizer)
        self.names = list(self.datasets)
        self.k = len(self.names)
        for name in self.names:
            dropped = dict(self.drop_counts.get(name, {}))
            logger.info(
                "objective %s: %d pairs kept, dropped %d %s",
                name,
                len(self.datasets[name]),
                sum(dropped.values()),
                dropped or "",
            )

        self.pair_tokens = {name: _pair_tokens(ds) for name, ds in self.datasets.items()}
        self.collator = data.PairCollator.for_tokenizer(self.tokenizer)
        # With several ranks `micro_batch` is per rank: the sampler draws global micro-batches
        # and each rank takes its slice (`prepare`), so every rank runs the same step count.
        self.sampler = data.MultiObjectiveSampler(
            {name: len(ds) for name, ds in self.datasets.items()},
            micro_batch=config.micro_batch * self.context.world_size,
            grad_accum=config.grad_accum,
            seed=config.seed,
        )
        # As in Hugging Face's TrainingArguments, max_steps (when set) replaces the epochs.
        self.total_steps = config.max_steps or config.epochs * self.sampler.steps_per_epoch

        self.reference_forwards = 0
        self.reference_model = None
        self.reference_table: dict[str, torch.Tensor] = {}
        self.policy = None
        grad_dtype = _GRAD_DTYPES[config.grad_dtype]
        self.reference_mode = self._setup_reference(config.reference)

        self.model.train()
        self.comm_bytes = 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.buffers = GradientBuffers(params, self.k, grad_dtype)
        if self.buffers.uses_hooks and self.context.parallel != "none":
            # DDP reduces the `.grad` autograd leaves behind, which the hooks have moved away.
            raise ValueError(
                f"parallel {config.parallel!r} needs gradient buffers in the model's dtype "
                f"({self.backend.dtype}), got grad_dtype {config.grad_dtype}: set grad_dtype "
                "to match (e.g. --grad-dtype bfloat16 with a bfloat16 model)"
            )
        logger.info(
            "gradient buffers: k = %d x %d parameters in %s = %.1f MiB (%s)%s",
            self.k,
            self.buffers.numel,
            config.grad_dtype,
            self.buffers.rows.nbytes / 2**20,
            "the flat gradient is row 0"
            if self.buffers.shares_row0
            else f"+ {self.buffers.flat.nbytes / 2**20:.1f} MiB flat gradient",
            "; accumulated by post-accumulate-grad hooks (dtype differs from the weights')"
            if self.buffers.uses_hooks
            else "; .grad are views of the rows (no copy)",
        )
        self.buffers.point_at_flat()

        # The lr lives on the device (fused AdamW reads a tensor lr there) and follows the
        # schedule at the count of applied updates, so a skipped step does not advance it and
        # nothing is read on the host.
        self.lr_factor = cosine_with_warmup(config.warmup_ratio, self.total_steps)
        self.updates = torch.zeros((), dtype=torch.float64, device=self.device)
        self.lr = (config.lr * self.lr_factor(self.updates)).float()
        self.optimizer = torch.optim.AdamW(
            params,
            lr=self.lr,
            betas=(0.9, 0.999),
            weight_decay=0.0,
            fused=self.device.type in ("cuda", "cpu"),
        )
        self.combinator = make_combinator(
            config.combinator,
            k=self.k,
            eta=config.eta,
            max_iters=config.solver_max_iters,
            tol=config.solver_tol,
            method=config.solver_method,
            eps=config.eps,
        )

        self.step = 0
        self.skipped_total = 0
        self._pending: list[tuple[int, int, torch.Tensor]] = []
        self._interval_start = time.perf_counter()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # Only now that the model, the data and the settings have all loaded: bad input
        # leaves no run folder behind.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        elif self.context.is_main:
            self.metrics_path.write_text("")
        if self.context.is_main:
            dump_yaml(config, self.run_dir / "config.yaml")

        self._writer = None
        if config.tensorboard and self.context.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # Events of the steps after the checkpoint are dropped, they will be redone; the
            # checkpoint's own step was logged before it was saved and is kept.
            self._writer = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=self.step + 1
            )

    # -- reference log-probabilities ------------------------------------------------------------

    def _reference_cache_file(self, name: str, model_hash: str) -> Path:
        dataset = self.datasets[name]
        # Everything that changes the reference's rounding is part of the key, so a cached
        # table always equals the policy's own log-probs at step 0 (the ln 2 check).
        backend = [
            repr(self.backend.dtype),
            repr(self.backend.autocast),
            self.backend.attn_implementation,
            self.backend.liger,
            self.device.type,
        ]
        key = hashlib.blake2b(
            json.dumps([model_hash, dataset._fingerprint, len(dataset), *backend]).encode(),
            digest_size=16,
        ).hexdigest()
        root = Path(self.config.cache_dir) if self.config.cache_dir else _default_cache()
        return root / "reference" / f"{key}.pt"

    def _setup_reference(self, mode: str) -> str:
        """Load, compute or skip the reference log-prob tables; returns the mode in use.

        `auto` loads a cached table when every objective has one, computes the tables when
        the run reads at least as many pairs as they hold, and otherwise (a short run on a
        large dataset) keeps a frozen copy of the model and computes them online.
        """
        model_hash = weights_fingerprint(self.model) if mode != "online" else ""
        paths = {name: self._reference_cache_file(name, model_hash) for name in self.names}
        # Rank 0 decides for every rank: under fsdp the computation is collective, so all
        # ranks must compute the same tables (a cache written meanwhile must not split them).
        present = {name: path.is_file() for name, path in paths.items()}
        present = distributed.broadcast_object(present, self.context)
        if mode == "auto":
            cached = all(present.values())
            window = self.sampler.window_size
            online_pairs = self.k * self.total_steps * window
            table_pairs = sum(len(dataset) for dataset in self.datasets.values())
            mode = "precompute" if cached or table_pairs <= online_pairs else "online"
            logger.info(
                "reference log-probs: %s (cached: %s; the run reads %d pairs, the data holds %d)",
                mode,
                cached,
                online_pairs,
                table_pairs,
            )

        if mode == "online":
            self.reference_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            if self.context.sharded:
                self.reference_model = distributed.wrap(
                    self.reference_model, self.context, self.device, frozen=True
                )
            self._wrap_policy()
            return mode

        # With several ranks the tables come from the wrapped policy (under fsdp the full
        # model never sits on one device); every rank computes them in lockstep.
        self._wrap_policy()
        self.model.eval()
        for name, dataset in self.datasets.items():
            path = paths[name]
            if present[name]:
                table = torch.load(path, map_location="cpu", weights_only=True)
                logger.info("objective %s: reference log-probs from cache %s", name, path)
            else:
                table = self._compute_reference(dataset)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                torch.save(table, tmp)
                os.replace(tmp, path)
                logger.info("objective %s: reference log-probs cached in %s", name, path)
            if tuple(table.shape) != (len(dataset), 2):
                raise ValueError(f"reference cache {path} has shape {tuple(table.shape)}")
            self.reference_table[name] = table.to(self.device)
        distributed.reshard(self.policy, self.context)
        return mode

    def _wrap_policy(self) -> None:
        """Put the model under DDP or FSDP (several ranks only); sets `self.policy`."""
        if self.context.parallel == "none":
            return
        # FSDP can keep float32 master shards of a lower-precision model, so its gradient
        # shards (and buffers) are float32 views, as the recipe's float32 buffers want.
        master = self.context.sharded and self.config.grad_dtype == "float32"
        master = master and self.backend.dtype != torch.float32
        self.policy = distributed.wrap(
            self.model, self.context, self.device, torch.float32 if master else None
        )
        logger.info(
            "%s on %d ranks (this is rank %d): %d pairs per objective and micro-batch, %d "
            "of them on each rank",
            self.context.parallel,
            self.context.world_size,
            self.context.rank,
            self.sampler.micro_batch,
            self.config.micro_batch,
        )

    @torch.no_grad()
    def _compute_reference(self, dataset) -> torch.Tensor:
        """[pairs, 2] float32 (chosen, rejected) reference log-probs of every pair."""
        from tqdm.auto import tqdm

        rows = []
        size = 2 * self.config.micro_batch
        starts = range(0, len(dataset), size)
        for start in tqdm(starts, desc="reference log-probs", unit="batch", leave=False):
            batch = self._collate(dataset[start : start + size], None)
            logps = self._logps(self._policy, batch)
            self.reference_forwards += 1
            rows.append(torch.stack(logps.float().chunk(2), dim=1).cpu())
        return torch.cat(rows)

    # -- batches ----------------------------------------------------------------------------------

    def _collate(self, columns: dict, reference: torch.Tensor | None) -> MicroBatch:
        batch = self.collator(columns)
        ids, labels, mask = dpo.to_right_padding(
            batch["input_ids"], batch["labels"], batch["attention_mask"]
        )
        pairs = ids.shape[0] // 2
        if reference is not None:
            # [pairs, 2] -> chosen rows then rejected rows, like the batch.
            reference = reference.t().reshape(-1)
        return MicroBatch(
            input_ids=self._to_device(ids),
            labels=self._to_device(labels),
            reference=reference,
            pairs=pairs,
            tokens=int(mask.sum()),
        )

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without waiting for the GPU: a blocking copy drains
        its queue, and CUDA stages a copy from pageable memory synchronously, so on CUDA the
        tensor is pinned first (the caching host allocator keeps it until the copy is done)."""
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def window_tokens(self, window: dict[str, list[list[int]]]) -> int:
        """Non-padding tokens of a whole (global) window: the step's throughput on all ranks,
        counted on the host from the tokenised lengths, so no rank needs to ask the others."""
        return sum(
            int(self.pair_tokens[name][indices].sum())
            for name, micro in window.items()
            for indices in micro
        )

    def prepare(self, window: dict[str, list[list[int]]]) -> list[list[MicroBatch]]:
        """The micro-batches of one optimiser step, per objective (host work, then copies)."""
        batches = []
        rank, share = self.context.rank, self.config.micro_batch
        for name in self.names:
            micro = []
            for indices in window[name]:
                if self.context.world_size > 1:
                    indices = indices[rank * share : (rank + 1) * share]
                reference = None
                if self.reference_table:
                    index = self._to_device(torch.tensor(indices, dtype=torch.long))
                    reference = self.reference_table[name].index_select(0, index)
                micro.append(self._collate(self.datasets[name][indices], reference))
            batches.append(micro)
        return batches

    # -- one step -------------------------------------------------------------------------------

    @property
    def _policy(self):
        """What runs the policy's forward: its DDP/FSDP wrapper with several ranks, else the
        model itself."""
        return self.model if self.policy is None else self.policy

    def _logps(self, model, batch: MicroBatch) -> torch.Tensor:
        """Sequence log-probs of a causal LM, or of a log-prob module (distributed.PolicyLogps,
        under DDP or FSDP with several ranks), under the backend's autocast."""
        autocast = self.backend.autocast
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            if hasattr(model, "get_decoder"):
                return dpo.sequence_logps(model, batch.input_ids, batch.labels)
            return model(batch.input_ids, batch.labels)

    def _pair_logps(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        policy = self._logps(self._policy, batch)
        if batch.reference is not None:
            return policy, batch.reference
        with torch.no_grad():
            reference = self._logps(self.reference_model, batch)
        self.reference_forwards += 1
        return policy, reference

    def accumulate_gradients(self, batches: list[list[MicroBatch]]) -> torch.Tensor:
        """Fill buffer row i with objective i's window gradient; returns [k, 3] float32
        (window loss, mean margin, reward accuracy) per objective, on the device.

        With several ranks these are this rank's own pairs: the gradient reduction averages
        the rows over ranks (equal shares, so the mean over the global window), and
        `apply_update` averages the statistics.
        """
        self.buffers.zero_()
        stats = []
        for i, micro_batches in enumerate(batches):
            self.buffers.accumulate_into(i)
            window_pairs = sum(mb.pairs for mb in micro_batches)
            totals = torch.zeros(3, dtype=torch.float32, device=self.device)

            for index, mb in enumerate(micro_batches):
                # DDP decides at the forward whether the backward reduces: both go inside.
                last = index == len(micro_batches) - 1
                with distributed.gradient_sync(self.policy, self.context, last):
                    policy, reference = self._pair_logps(mb)
                    b = mb.pairs
                    losses, margins = dpo.dpo_losses(
                        policy[:b], policy[b:], reference[:b], reference[b:], self.config.beta
                    )
                    (losses.sum() / window_pairs).backward()
                with torch.no_grad():
                    totals += torch.stack(
                        [losses.sum(), margins.sum(), (margins > 0).float().sum()]
                    )
            stats.append(totals / window_pairs)
        self.buffers.point_at_flat()
        return torch.stack(stats)

    def apply_update(self, losses: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """gram -> combinator -> combine -> AdamW (skipped on the device when not finite).

        Returns the step's record: float32 [k + k + k*k + 2] = losses, coefficients, Gram,
        skipped flag, the step's lr, then `extra` ([k, s] further per-objective statistics)
        flattened.
        With several ranks the partial Gram (fsdp), the losses and `extra` are all-reduced in
        one call before the combinator (distributed.reduce_combine_inputs).
        """
        rows = self.buffers.rows
        G = gram(rows)
        if self.context.parallel != "none":
            stats = losses[:, None] if extra is None else torch.cat([losses[:, None], extra], 1)
            G, stats, self.comm_bytes = distributed.reduce_combine_inputs(G, stats, self.context)
            losses, extra = stats[:, 0], (None if extra is None else stats[:, 1:])
        c = self.combinator.weights(losses, G)
        combine(rows, c, out=self.buffers.flat)

        finite = torch.isfinite(torch.cat([losses.float(), G.diagonal().float(), c.float()]))
        skipped = (~finite.all()).float()
        self.optimizer.found_inf = skipped
        lr = self.lr.clone()
        self.optimizer.step()
        self.updates += 1 - skipped.double()
        self.lr.copy_(self.config.lr * self.lr_factor(self.updates))
        record = [losses.float(), c.float(), G.float().flatten(), skipped[None], lr[None]]
        if extra is not None:
            record.append(extra.float().flatten())
        return torch.cat(record)

    def train_step(self, batches: list[list[MicroBatch]]) -> torch.Tensor:
        """One optimiser step; returns the device-side record (see `_decode`)."""
        stats = self.accumulate_gradients(batches)
        return self.apply_update(stats[:, 0], stats[:, 1:])

    def _decode(self, row: list[float]) -> dict:
        k = self.k
        losses, weights = row[:k], row[k : 2 * k]
        gram = [row[2 * k + i * k : 2 * k + (i + 1) * k] for i in range(k)]
        skipped = row[2 * k + k * k] > 0
        lr = row[2 * k + k * k + 1]
        extra = row[2 * k + k * k + 2 :]
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
        cosines = [
            [
                gram[i][j] / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0
                for j in range(k)
            ]
            for i in range(k)
        ]
        return {
            "lr": lr,
            "losses": dict(zip(self.names, losses, strict=True)),
            "weights": dict(zip(self.names, weights, strict=True)),
            "skipped": skipped,
            "grad_norms": dict(zip(self.names, norms, strict=True)),
            "gram_cosines": cosines,
            "margins": dict(zip(self.names, extra[0::2], strict=True)),
            "accuracies": dict(zip(self.names, extra[1::2], strict=True)),
        }

    # -- metrics, checkpoints, the loop ---------------------------------------------------------

    def flush_metrics(self) -> list[dict]:
        """Bring the pending steps' records to the host (the one synchronisation) and log them."""
        if not self._pending:
            return []
        rows = torch.stack([record for *_, record in self._pending]).cpu().tolist()
        elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
        tokens_per_s = sum(tokens for _, tokens, _ in self._pending) / elapsed

        written = []
        for (step, tokens, _), row in zip(self._pending, rows, strict=True):
            entry = {"step": step, "tokens": tokens, "tokens_per_s": tokens_per_s}
            if self.context.parallel != "none":
                entry["comm_bytes"] = self.comm_bytes
            entry.update(self._decode(row))
            self.skipped_total += int(entry["skipped"])
            entry["skipped_total"] = self.skipped_total
            written.append(entry)

        # Every rank decodes (the skip counter is part of the checkpoint); rank 0 writes.
        if self.context.is_main:
            with open(self.metrics_path, "a") as f:
                f.writelines(json.dumps(entry) + "\n" for entry in written)
            for entry in written:
                if entry["skipped"]:
                    logger.warning(
                        "step %d skipped: non-finite loss, gradient or coefficient "
                        "(%d skipped so far)",
                        entry["step"],
                        entry["skipped_total"],
                    )
                self._log_tensorboard(entry)

        self._pending = []
        self._interval_start = time.perf_counter()
        return written

    def _log_tensorboard(self, entry: dict) -> None:
        if self._writer is None:
            return
        step = entry["step"]
        for group in ("losses", "weights", "grad_norms", "margins", "accuracies"):
            for name, value in entry[group].items():
                self._writer.add_scalar(f"{group}/{name}", value, step)
        self._writer.add_scalar("train/lr", entry["lr"], step)
        self._writer.add_scalar("train/tokens_per_s", entry["tokens_per_s"], step)
        self._writer.add_scalar("train/skipped_total", entry["skipped_total"], step)

    def save(self) -> Path:
        """Write a checkpoint (rank 0, with FSDP's shards gathered first); returns its folder."""
        self.flush_metrics()
        weights, optimizer_state = distributed.full_state(self.model, self.optimizer, self.context)
        state = {
            "step": self.step,
            "skipped_total": self.skipped_total,
            "optimizer": optimizer_state,
            "updates": self.updates.cpu(),
            "combinator": self.combinator.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": checkpoint.rng_state(),
            "names": self.names,
        }
        path = checkpoint.checkpoint_dir(self.run_dir) / checkpoint.step_name(self.step)
        if self.context.is_main:
            source = weights if self.context.sharded else self.model
            path = checkpoint.save_checkpoint(
                self.run_dir, self.step, source, state, keep=self.config.keep_checkpoints
            )
        distributed.barrier(self.context)
        return path

    def _resume(self) -> None:
        path = checkpoint.latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.run_dir}")
        if self.context.sharded:
            state = _checked_state(path, checkpoint.load_checkpoint(path, None))
            weights = checkpoint.load_weights(path)
            distributed.load_full_state(
                self.model, self.optimizer, weights, state["optimizer"], self.context
            )
            self.buffers.point_at_flat()
        else:
            state = _checked_state(path, checkpoint.load_checkpoint(path, self.model))
            self.optimizer.load_state_dict(state["optimizer"])
        if state["names"] != self.names:
            raise ValueError(f"checkpoint objectives {state['names']} differ from {self.names}")

        # The saved lr belongs to the interrupted run's schedule; a resume with another
        # max_steps continues on this run's schedule from the same count of updates.
        self.updates.copy_(state["updates"])
        self.lr.copy_(self.config.lr * self.lr_factor(self.updates))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.combinator.load_state_dict(state["combinator"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_total = int(state["skipped_total"])

        # Steps after the checkpoint were lost with the process; they will be redone. A line
        # cut by the kill is one of them: the checkpoint was written after its own steps'
        # lines were complete (`save` flushes the metrics first).
        kept = []
        if self.context.is_main and self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    step = json.loads(line)["step"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                if step <= self.step:
                    kept.append(line + "\n")
        if self.context.is_main:
            self.metrics_path.write_text("".join(kept))
        logger.info("resumed from %s at step %d", path, self.step)

    def fit(self) -> Path:
        """Train to `total_steps`, then write the plots and the final model; returns run_dir."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        config = self.config
        logger.info(
            "%s on k = %d: %d steps (%d per epoch), %d pairs per objective and step "
            "(%d micro-batches of %d), lr %g",
            config.combinator,
            self.k,
            self.total_steps,
            self.sampler.steps_per_epoch,
            self.sampler.micro_batch * config.grad_accum,
            config.grad_accum,
            self.sampler.micro_batch,
            config.lr,
        )
        small = {n: s for n, s in self.sampler.sizes.items() if s < self.sampler.window_size}
        if small:
            logger.warning(
                "%s: fewer pairs than a step draws (%d per objective), so a step repeats them",
                ", ".join(f"{name} has {size}" for name, size in small.items()),
                self.sampler.window_size,
            )
        start_step = self.step
        if start_step >= self.total_steps:
            # A run killed after its last checkpoint may lack its plots or final model.
            logger.info(
                "the run is already at step %d of %d: nothing to train; writing its plots and "
                "final model",
                start_step,
                self.total_steps,
            )
        started = time.perf_counter()
        self._interval_start = started
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.context.is_main,
        )

        with logging_redirect_tqdm():
            while self.step < self.total_steps:
                for window in self.sampler:
                    batches = self.prepare(window)
                    record = self.train_step(batches)
                    self.step += 1
                    self._pending.append((self.step, self.window_tokens(window), record))

                    if self.step % config.log_every == 0 or self.step == self.total_steps:
                        last = self.flush_metrics()[-1]
                        bar.set_postfix(
                            {n: f"{v:.4f}" for n, v in last["losses"].items()}, refresh=False
                        )
                    if self.step == self.total_steps or (
                        config.save_every and self.step % config.save_every == 0
                    ):
                        self.save()
                    bar.update(1)
                    if self.step >= self.total_steps:
                        break
            self.flush_metrics()
        bar.close()

        seconds = time.perf_counter() - started
        done = self.step - start_step
        logger.info(
            "trained %d steps in %.1f s (%.2f s per step), %d skipped",
            done,
            seconds,
            seconds / max(done, 1),
            self.skipped_total,
        )
        self.finish()
        return self.run_dir

    def finish(self) -> None:
        """Plots and the final model, written by rank 0 (FSDP's shards gathered first)."""
        if self._writer is not None:
            self._writer.close()
        weights = None
        if self.config.save_model and self.context.sharded:
            weights, _ = distributed.full_state(self.model, None, self.context)
            # Float32 master shards (distributed.wrap) are saved in the model's own dtype.
            weights = {name: t.to(self.backend.dtype) for name, t in weights.items()}
        if not self.context.is_main:
            distributed.barrier(self.context)
            return

        if self.config.plots and self.metrics_path.stat().st_size:
            from mofast.plots import plot_run

            written = plot_run(self.metrics_path, self.run_dir / "plots")
            logger.info("plots: %s", ", ".join(str(p) for p in written))
        if self.config.save_model:
            save_final_model(self.model, self.tokenizer, self.run_dir / "model", weights)
            logger.info("final model saved in %s", self.run_dir / "model")
        distributed.barrier(self.context)


_STATE_KEYS = (
    "step",
    "skipped_total",
    "optimizer",
    "updates",
    "combinator",
    "sampler",
    "rng",
    "names",
)


def _checked_state(path: Path, state: dict) -> dict:
    """A checkpoint's state.pt, refused with its missing entries named when another version
    of mofast wrote it (one from before the lr schedule counted updates has no `updates`)."""
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {', '.join(missing)}: another version of mofast wrote "
            "it, and this one cannot resume it; start a new run (another --output-dir)"
        )
    return state


def _pair_tokens(dataset) -> np.ndarray:
    """Tokens of each encoded pair (chosen row + rejected row), read from the Arrow lengths."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    lengths = [pc.list_value_length(table[f"{side}_input_ids"]) for side in ("chosen", "rejected")]
    return pc.add(*lengths).to_numpy()


def cosine_with_warmup(warmup_ratio: float, total_steps: int):
    """The lr factor of step s: a linear warm-up over ceil(ratio * total) steps that starts
    above zero (step 0 gets 1 / (warmup + 1), so no step is spent at lr 0), then a cosine
    decay to zero at `total_steps`. `s` is a number or a float64 tensor on any device (the
    result is one there: the trainer's schedule never reads the host)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    decay = max(1, total_steps - warmup)

    def factor(step: torch.Tensor | float) -> torch.Tensor:
        step = torch.as_tensor(step, dtype=torch.float64)
        rising = (step + 1) / (warmup + 1)
        progress = ((step - warmup) / decay).clamp(max=1.0)
        return torch.where(step < warmup, rising, 0.5 * (1.0 + torch.cos(math.pi * progress)))

    return factor


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mofast"
