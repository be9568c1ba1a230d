"""`mofast eval`: generate on held-out prompts, then judge each response against the golden one.

SPEC section 6. For every model (and the untouched starting model, labelled REFERENCE):

1. one sampled response per held-out prompt (nucleus sampling, temperature 0.75, top-p
   0.9, repetition penalty 1.05, up to 1024 new tokens, batches of 64), through HF
   `generate` or vLLM when it is installed;
2. five pairwise questions per prompt to a judge (overall, then one per objective),
   response and golden response shown in a seeded random order that is recorded.

The output folder holds `eval.json` (what was run), `generations/<model>.jsonl` (cached
per model and prompt), `verdicts.jsonl` (the verdict cache: appended and fsynced as each
verdict arrives) and `results.jsonl` (one outcome per model, prompt and question, read by
`mofast report`). Running the same command again resumes: nothing is generated or asked
twice.

Held-out data: a JSONL file (optionally gzipped), a JSON list, a Parquet file or a hub
dataset, in one of three schemas:
- {prompt, chosen, rejected}: the golden response is `chosen`, the better of the pair and
  the best response available (the embedded default, overall_score_eval.jsonl.gz);
- openbmb/UltraFeedback records {instruction, completions}: the golden response follows
  SPEC section 4 (`mofast.data.golden_response`), and by default only the test side of
  the seeded split by prompt is used;
- {prompt, golden}.

A trained run folder (`--model runs/NAME`) holds its final model in `model/`, where
`mofast train` writes it (`final/` or the folder's top level are read too), and its
resolved config (`config.yaml`) names the starting model, which is evaluated as
REFERENCE (`model: null` means the shipped stories260K).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import yaml

from mofast.assets import (
    DEFAULT_EVAL,
    STORIES260K,
    find_local_model,
    shadow_hint,
    shipped_models,
)
from mofast.judges import (
    MAX_COMPLETION_TOKENS,
    QUESTIONS,
    Comparison,
    JudgeFatalError,
    LocalJudge,
    OpenAIJudge,
    VerdictCache,
    judge_comparisons,
    load_prompts,
    make_comparison,
    text_hash,
)

logger = logging.getLogger(__name__)

REFERENCE = "REFERENCE"
ORDERS = ("model_first", "golden_first")

# Files a Hugging Face model folder holds next to a run's own config; never a run config.
_MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "model.safetensors.index.json",
    "vocab.json",
}

# Keys of a run config that name the starting model, the most specific first.
_STARTING_MODEL_KEYS = ("reference_model", "ref_model", "base_model", "model_name_or_path", "model")


# ---------------------------------------------------------------------------------------
# Held-out prompts
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeldOutPrompt:
    id: str
    prompt: str
    golden: str


def _message_text(value) -> str | None:
    """A response given as text, or as a chat (the last assistant turn's content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for message in reversed(value):
            if message.get("role") == "assistant":
                return str(message.get("content", ""))
    return None


def _prompt_text(value) -> str | None:
    """A prompt given as text, or as a chat (its last user turn)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for message in reversed(value):
            if message.get("role") == "user":
                return str(message.get("content", ""))
    return None


def load_heldout(
    source: str | os.PathLike = DEFAULT_EVAL,
    *,
    limit: int | None = None,
    split: str = "train",
    part: str = "test",
    split_seed: int = 0,
    ultrafeedback_mode: str = "aspects",
    test_fraction: float | None = None,
) -> tuple[list[HeldOutPrompt], dict]:
    """The held-out prompts with their golden responses, and a note on where they came from.

    Prompts are kept in file order, a repeated prompt only once; `limit` keeps the first N.
    For UltraFeedback-schema records, `part="test"` keeps the prompts the trainer holds
    out: the test side of `mofast.data.split_objectives` over the pairs of
    `ultrafeedback_objectives(records, mode=ultrafeedback_mode)` with `split_seed` and
    `test_fraction` (the trainer's; None: the recipe's), so evaluation never sees a
    training prompt.
    """
    if part not in ("test", "all"):
        raise ValueError(f"part must be 'test' or 'all', got {part!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    from mofast import data as mofast_data

    records = mofast_data.load_rows(source, split=split)
    if not records:
        raise ValueError(f"held-out data {source} holds no records")

    schemas = set()
    if all("instruction" in r and "completions" in r for r in records):
        schemas.add("ultrafeedback")
        if part == "test":
            fraction = mofast_data.DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
            records = _test_side(mofast_data, records, split_seed, ultrafeedback_mode, fraction)

    prompts: list[HeldOutPrompt] = []
    seen: set[str] = set()
    skipped = 0
    for index, record in enumerate(records):
        if "instruction" in record and "completions" in record:
            prompt, schema = record["instruction"], "ultrafeedback"
            try:
                golden = mofast_data.golden_response(record)
            except ValueError:
                # No rated, non-empty completion: there is nothing to compare against.
                golden = None
        elif "prompt" in record and "golden" in record:
            prompt, golden, schema = record["prompt"], _message_text(record["golden"]), "golden"
        elif "prompt" in record and "chosen" in record:
            prompt, golden, schema = record["prompt"], _message_text(record["chosen"]), "chosen"
        else:
            raise ValueError(
                f"{source}: record {index} has keys {sorted(record)}; expected {{prompt, "
                "golden}, {prompt, chosen, rejected} or UltraFeedback's {instruction, completions}"
            )
        prompt = _prompt_text(prompt)
        schemas.add(schema)
        if not prompt or not prompt.strip() or not golden or not golden.strip():
            skipped += 1
            continue
        pid = text_hash(prompt)
        if pid in seen:
            continue
        seen.add(pid)
        prompts.append(HeldOutPrompt(pid, prompt, golden))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"held-out data {source}: no record has a prompt and a golden response")

    notes = {
        "chosen": "golden = the `chosen` response of each pair (the best one available)",
        "golden": "golden = the record's `golden` field",
        "ultrafeedback": "golden = the completion with the highest summed rating (SPEC 4)",
    }
    note = {
        "source": str(source),
        "schemas": sorted(schemas),
        "golden": "; ".join(notes[s] for s in sorted(schemas)),
        "part": part if "ultrafeedback" in schemas else "all",
        "prompts": len(prompts),
        "skipped_without_prompt_or_golden": skipped,
    }
    return prompts, note


def _test_side(
    mofast_data, records: list[dict], seed: int, mode: str, test_fraction: float
) -> list[dict]:
    """The records whose prompt the trainer held out (SPEC section 4's split by prompt).

    The trainer splits the union of its objectives' pair prompts, so the same pairs are
    derived here and split the same way: a prompt without pairs was never trained on.
    """
    objectives = mofast_data.ultrafeedback_objectives(records, mode=mode)
    _, held_out = mofast_data.split_objectives(objectives, test_fraction, seed=seed)
    test = {item["prompt"] for items in held_out.values() for item in items}
    return [r for r in records if str(r["instruction"]) in test]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    label: str
    path: str
    run_dir: str | None = None


# Sub-folders where a run folder may keep its final model, in the order they are tried.
FINAL_MODEL_DIRS = ("model", "final")


def locate_model(name_or_path: str, option: str) -> str:
    """A local path as given, a shipped model's folder for its name, or a checked hub id.

    Done before anything is generated, so a model that cannot be loaded stops the run at
    once with an error naming `option` (the command-line option that gave it).
    """
    local = find_local_model(name_or_path)
    if local is not None:
        return str(local)

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    names = ", ".join(shipped_models())
    try:
        # The config is what loading reads first; fetching it now costs one small file.
        hf_hub_download(name_or_path, "config.json")
    except HFValidationError:
        raise ValueError(
            f"{option} {name_or_path}: no such file or folder (relative paths start at "
            f"{Path.cwd()}), not a shipped model ({names}) and not a hub id"
        ) from None
    except (OSError, ValueError, EntryNotFoundError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{option} {name_or_path}: not a local folder or a shipped model ({names}), and "
            f"no model config on the hub for it ({reason})"
        ) from None
    return name_or_path


def resolve_model(name_or_path: str, option: str = "--model") -> tuple[str, str | None]:
    """(model folder or hub id, the run folder it came from or None).

    A trained run folder holds its final model in Hugging Face format at its top level or
    in one of FINAL_MODEL_DIRS: whichever has a config.json (a sub-folder first). A name
    that is no local path is a shipped model's (`stories260K`) or a hub id.
    """
    located = locate_model(name_or_path, option)
    path = Path(located)
    if not path.exists():
        return located, None
    if not path.is_dir():
        raise ValueError(
            f"{option} {path} is a file; give a model folder, a run folder or a hub id"
        )
    for sub in FINAL_MODEL_DIRS:
        if (path / sub / "config.json").is_file():
            return str(path / sub), str(path)
    if (path / "config.json").is_file():
        parent = path.parent
        if path.name in FINAL_MODEL_DIRS and _run_configs(parent):
            return str(path), str(parent)
        return str(path), str(path) if _run_configs(path) else None
    tried = ", ".join(str(path / sub) for sub in FINAL_MODEL_DIRS)
    raise ValueError(
        f"{path} holds no model: no config.json there or in {tried}{shadow_hint(name_or_path)}"
    )


def _run_configs(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.glob("*.yaml")) + sorted(run_dir.glob("*.yml"))
    files += [p for p in sorted(run_dir.glob("*.json")) if p.name not in _MODEL_FILES]
    preferred = [p for p in files if p.stem == "config"]
    return preferred + [p for p in files if p.stem != "config"]


def run_config(run_dir: str | os.PathLike) -> dict | None:
    """The run's own config (the first YAML/JSON mapping beside the model), or None."""
    for path in _run_configs(Path(run_dir)):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and any(k in data for k in _STARTING_MODEL_KEYS):
            return data
    return None


def starting_model(run_dir: str | os.PathLike) -> str | None:
    """The model a run started from, as its config names it (null = the shipped model)."""
    config = run_config(run_dir)
    if config is None:
        return None
    for key in _STARTING_MODEL_KEYS:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, dict):
            value = value.get("name_or_path") or value.get("path")
        if value is None:
            # The trainer's convention: no model means the shipped stories260K.
            return str(STORIES260K) if key == "model" else None
        value = str(value)
        relative = Path(run_dir) / value
        if not Path(value).exists() and relative.exists():
            return str(relative)
        return value
    return None


def _default_label(path: str, run_dir: str | None) -> str:
    if run_dir is not None:
        return Path(run_dir).resolve().name
    resolved = Path(path)
    if resolved.exists():
        return resolved.resolve().name
    return path.rstrip("/").split("/")[-1]


def plan_models(
    models: list[str],
    names: list[str] | None = None,
    reference: str | None = None,
    no_reference: bool = False,
) -> list[ModelEntry]:
    """The models to evaluate, REFERENCE (the starting model) first unless excluded."""
    if not models:
        raise ValueError("give at least one --model")
    names = list(names or [])
    if len(names) > len(models):
        raise ValueError(f"{len(names)} --model-name values for {len(models)} --model values")

    entries = []
    for i, name_or_path in enumerate(models):
        path, run_dir = resolve_model(name_or_path)
        label = names[i] if i < len(names) else _default_label(path, run_dir)
        entries.append(ModelEntry(label, path, run_dir))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}; use --model-name")

    if no_reference or REFERENCE in labels:
        return sorted(entries, key=lambda e: e.label != REFERENCE)
    if reference is None:
        found = {starting_model(e.run_dir) for e in entries if e.run_dir is not None}
        found.discard(None)
        if len(found) > 1:
            raise ValueError(f"the runs start from different models {sorted(found)}: --reference")
        if not found:
            raise ValueError(
                "cannot tell the starting model: no run config names it; pass --reference "
                "MODEL, label one --model as REFERENCE, or pass --no-reference"
            )
        reference = found.pop()
        try:
            path, run_dir = resolve_model(reference, "REFERENCE (the starting model of the run)")
        except ValueError as err:
            raise ValueError(
                f"{err}; pass --reference MODEL (e.g. a Hugging Face folder of the same model) "
                "or --no-reference"
            ) from None
    else:
        path, run_dir = resolve_model(reference, "--reference")
    return [ModelEntry(REFERENCE, path, run_dir), *entries]


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """SPEC section 6 defaults. temperature 0 means greedy decoding."""

    temperature: float = 0.75
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    max_new_tokens: int = 1024
    batch_size: int = 64
    seed: int = 0
    engine: str = "auto"
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(
                "need temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0; got "
                f"{self.temperature}, {self.top_p}, {self.repetition_penalty}"
            )
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.engine not in ("auto", "hf", "vllm"):
            raise ValueError(f"engine must be auto, hf or vllm, got {self.engine!r}")
        if self.engine == "vllm" and not has_vllm():
            raise ValueError("engine vllm asked for, but vllm is not installed")

    def sampling(self) -> dict:
        """What decides the distribution of a response (the cache reuses across the rest)."""
        keys = ("temperature", "top_p", "repetition_penalty", "max_new_tokens")
        return {k: getattr(self, k) for k in keys}


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _weights_signature(path: str) -> list:
    folder = Path(path)
    if not folder.is_dir():
        return [path]
    patterns = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
    files = sorted(p for pattern in patterns for p in folder.glob(pattern))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def generation_fingerprint(model_path: str, settings: GenerationSettings) -> str:
    blob = json.dumps(
        [str(Path(model_path).resolve()) if Path(model_path).exists() else model_path]
        + [_weights_signature(model_path), settings.sampling()],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class GenerationCache:
    """Per-model JSONL of responses keyed by prompt id, appended and fsynced per batch."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.responses: dict[str, dict] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("fingerprint") == fingerprint:
                    self.responses.setdefault(record["prompt_id"], record)
        raw = path.read_bytes() if path.exists() else b""
        self._file = open(path, "a", encoding="utf-8")
        if raw and not raw.endswith(b"\n"):
            self._file.write("\n")

    def add(self, records: list[dict]) -> None:
        for record in records:
            record["fingerprint"] = self.fingerprint
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.responses[record["prompt_id"]] = record
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _context_limit(config, tokenizer) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def render_prompt(tokenizer, prompt: str, budget: int | None) -> tuple[list[int], bool]:
    """Token ids of a prompt ready for the answer (the chat template when there is one).

    A prompt over `budget` tokens is cut from the left, inside the template, so the
    template's own tokens survive.
    """
    from mofast.data import PLAIN_SEPARATOR

    def render(text: str) -> list[int]:
        # As the trainer renders a prompt (mofast.data): stripped, in the chat template, or
        # else BOS + prompt + PLAIN_SEPARATOR, where the response starts.
        text = text.strip()
        if tokenizer.chat_template:
            chat = [{"role": "user", "content": text}]
            rendered = tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=False
            )
            return tokenizer(rendered, add_special_tokens=False).input_ids
        return tokenizer(text + PLAIN_SEPARATOR, split_special_tokens=True).input_ids

    ids = render(prompt)
    if budget is None or len(ids) <= budget:
        return ids, False
    content = tokenizer(prompt, add_special_tokens=False).input_ids
    overflow = len(ids) - budget
    # Decoding a cut and encoding it again can shift the count by a token or two.
    for _ in range(4):
        ids = render(tokenizer.decode(content[overflow:]))
        if len(ids) <= budget:
            return ids, True
        overflow += len(ids) - budget
    return ids[-budget:], True


def _budgets(limit: int | None, max_new_tokens: int) -> tuple[int | None, int]:
    """(prompt token budget, new-token cap) that fit a context of `limit` tokens."""
    if limit is None:
        return None, max_new_tokens
    new = min(max_new_tokens, limit // 2)
    return limit - new, new


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _device_and_dtype(settings: GenerationSettings):
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif settings.dtype in dtypes:
        dtype = dtypes[settings.dtype]
    else:
        raise ValueError(f"dtype must be auto or one of {sorted(dtypes)}, got {settings.dtype!r}")
    return torch.device(device), dtype


def _generate_hf(path: str, prompts: list[HeldOutPrompt], settings: GenerationSettings, sink):
    import torch
    from transformers import AutoModelForCausalLM

    device, dtype = _device_and_dtype(settings)
    tokenizer = _load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    limit = _context_limit(model.config, tokenizer)
    budget, new_cap = _budgets(limit, settings.max_new_tokens)
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    rendered = [(p, *render_prompt(tokenizer, p.prompt, budget)) for p in prompts]
    # Similar lengths in a batch waste less compute on padding.
    rendered.sort(key=lambda item: len(item[1]))
    for start in range(0, len(rendered), settings.batch_size):
        batch = rendered[start : start + settings.batch_size]
        encoded = tokenizer.pad({"input_ids": [ids for _, ids, _ in batch]}, return_tensors="pt")
        width = encoded["input_ids"].shape[1]
        max_new = new_cap if limit is None else max(1, min(new_cap, limit - width))
        sampling = (
            {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
            if settings.temperature > 0
            else {"do_sample": False}
        )
        torch.manual_seed(settings.seed + start)
        with torch.inference_mode():
            out = model.generate(
                input_ids=encoded["input_ids"].to(device),
                attention_mask=encoded["attention_mask"].to(device),
                max_new_tokens=max_new,
                repetition_penalty=settings.repetition_penalty,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=list(eos_ids),
                **sampling,
            )
        new_tokens = out[:, width:].tolist()

        records = []
        for (item, ids, truncated), tokens in zip(batch, new_tokens, strict=True):
            stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
            kept = tokens if stop is None else tokens[:stop]
            records.append(
                {
                    "prompt_id": item.id,
                    "response": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    "prompt_tokens": len(ids),
                    "prompt_truncated": truncated,
                    "new_tokens": len(kept),
                    "finished": stop is not None,
                    "engine": "hf",
                }
            )
        sink(records)

    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _generate_vllm(path: str, prompts: list[HeldOutPrompt], settings: GenerationSettings, sink):
    from vllm import LLM, SamplingParams

    tokenizer = _load_tokenizer(path)
    _, dtype = _device_and_dtype(settings)
    llm = LLM(model=path, tokenizer=path, seed=settings.seed, dtype=str(dtype).split(".")[-1])
    engine = llm.llm_engine
    model_config = getattr(engine, "model_config", None) or engine.vllm_config.model_config
    limit = model_config.max_model_len
    budget, new_cap = _budgets(limit, settings.max_new_tokens)

    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start : start + settings.batch_size]
        rendered = [render_prompt(tokenizer, p.prompt, budget) for p in batch]
        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature,
                top_p=settings.top_p if settings.temperature > 0 else 1.0,
                repetition_penalty=settings.repetition_penalty,
                max_tokens=max(1, min(new_cap, limit - len(ids))),
                seed=settings.seed + start + i,
            )
            for i, (ids, _) in enumerate(rendered)
        ]
        # Token ids, not text: the chat template already placed the BOS.
        inputs = [{"prompt_token_ids": ids} for ids, _ in rendered]
        outputs = llm.generate(inputs, params, use_tqdm=False)
        records = []
        for item, (ids, truncated), output in zip(batch, rendered, outputs, strict=True):
            completion = output.outputs[0]
            records.append(
                {
                    "prompt_id": item.id,
                    "response": completion.text.strip(),
                    "prompt_tokens": len(ids),
                    "prompt_truncated": truncated,
                    "new_tokens": len(completion.token_ids),
                    "finished": completion.finish_reason == "stop",
                    "engine": "vllm",
                }
            )
        sink(records)
    del llm
    gc.collect()


def generate_responses(
    entry: ModelEntry,
    prompts: list[HeldOutPrompt],
    settings: GenerationSettings,
    out_dir: Path,
    progress=None,
) -> dict[str, dict]:
    """A response per prompt for one model, from the cache where it has them."""
    settings.validate()
    fingerprint = generation_fingerprint(entry.path, settings)
    cache = GenerationCache(out_dir / "generations" / f"{_slug(entry.label)}.jsonl", fingerprint)
    try:
        pending = [p for p in prompts if p.id not in cache.responses]
        if pending:
            engine = settings.engine
            if engine == "auto":
                import torch

                engine = "vllm" if has_vllm() and torch.cuda.is_available() else "hf"
            generate = _generate_vllm if engine == "vllm" else _generate_hf

            def sink(records: list[dict]) -> None:
                cache.add(records)
                if progress is not None:
                    progress(len(records))

            generate(entry.path, pending, settings, sink)
        return {p.id: cache.responses[p.id] for p in prompts}
    finally:
        cache.close()


def _slug(label: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return f"{safe[:60]}-{text_hash(label)[:8]}"


# ---------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------


def order_for(seed: int, prompt_id: str, question: str) -> str:
    """The seeded random order of a comparison, the same for every model (a paired design)."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{question}".encode()).digest()
    return ORDERS[digest[0] & 1]


def outcome_of(order: str, verdict: int | None) -> str:
    """win / tie / loss for the model (not the golden response), or invalid."""
    if verdict is None:
        return "invalid"
    if verdict == 0:
        return "tie"
    model_won = (verdict == 1) == (order == "model_first")
    return "win" if model_won else "loss"


def plan_comparisons(
    prompts_config,
    judge_id: str,
    models: list[ModelEntry],
    heldout: list[HeldOutPrompt],
    responses: dict[str, dict[str, dict]],
    questions: tuple[str, ...],
    seed: int,
) -> list[tuple[str, HeldOutPrompt, Comparison]]:
    """Every (model, prompt, question) comparison, with its recorded order."""
    plan = []
    for entry in models:
        for item in heldout:
            response = responses[entry.label][item.id]["response"]
            for question in questions:
                order = order_for(seed, item.id, question)
                first, second = (
                    (response, item.golden) if order == "model_first" else (item.golden, response)
                )
                comparison = make_comparison(
                    prompts_config, judge_id, question, order, item.prompt, first, second
                )
                plan.append((entry.label, item, comparison))
    return plan


def build_judge(args: argparse.Namespace):
    if args.judge == "openai":
        if not args.judge_model:
            raise ValueError("--judge openai needs --judge-model NAME")
        api_key = os.environ.get(args.judge_api_key_env)
        if api_key is None:
            logger.warning("%s is not set: requests go without a key", args.judge_api_key_env)
        return OpenAIJudge(
            args.judge_base_url,
            args.judge_model,
            api_key,
            max_in_flight=args.judge_concurrency,
            max_retries=args.judge_max_retries,
            backoff_s=args.judge_backoff,
            timeout_s=args.judge_timeout,
            max_tokens=args.judge_max_tokens,
        )
    if not args.judge_model:
        raise ValueError(
            f"--judge local needs --judge-model: a model folder, a shipped model "
            f"({', '.join(shipped_models())}) or a hub id"
        )
    model = locate_model(args.judge_model, "--judge-model")
    if Path(model).exists() and not (Path(model) / "config.json").is_file():
        raise ValueError(
            f"--judge-model {args.judge_model}: {model} holds no config.json"
            f"{shadow_hint(args.judge_model)}"
        )
    return LocalJudge(
        model,
        device=None if args.judge_device == "auto" else args.judge_device,
        dtype=args.judge_dtype,
        batch_size=args.judge_batch_size,
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trainer_split(configs: list[dict], split_seed: int | None) -> tuple[int, float | None]:
    """The seed and test fraction the trainer split its prompts with: the first run config's
    `split_seed` and `test_fraction` (its `seed` seeds sampling, not the split), the seed
    overridden by --split-seed; (0, None) without a run config (None: the recipe's)."""
    if split_seed is None:
        seeds = [c["split_seed"] for c in configs if isinstance(c.get("split_seed"), int)]
        split_seed = seeds[0] if seeds else 0
    fractions = [c.get("test_fraction") for c in configs]
    fractions = [f for f in fractions if isinstance(f, int | float) and not isinstance(f, bool)]
    return split_seed, float(fractions[0]) if fractions else None


def default_heldout(configs: list[dict]) -> str:
    """The held-out data when --heldout is not given: the UltraFeedback dataset a run
    trained on in `ultrafeedback` or `cdpo` mode (its test side is held out), else the
    embedded evaluation set (held out from the embedded default's training pairs)."""
    for config in configs:
        if config.get("data_mode") in ("ultrafeedback", "cdpo") and config.get("dataset"):
            source = str(config["dataset"])
            # A data file the run named relative to the folder it was trained from.
            is_file = source.lower().endswith((".json", ".jsonl", ".gz", ".parquet"))
            if is_file and not Path(source).expanduser().exists():
                raise FileNotFoundError(
                    f"the default held-out set is the test side of {source}, which a run "
                    f"trained on, but there is no such file from {Path.cwd()}: run eval from "
                    "where the run was trained, or give --heldout with the file's path"
                )
            return source
    return str(DEFAULT_EVAL)


def heldout_split(
    configs: list[dict], source: str, split_seed: int | None
) -> tuple[int, float | None, str]:
    """(split seed, test fraction, ultrafeedback mode) that held `source`'s test side out:
    those of the runs that trained on `source` in ultrafeedback or cdpo mode, else of all the
    runs (trainer_split). A run of another mode listed first has split settings of its own
    that never touched `source`."""
    trained_on = [
        c
        for c in configs
        if c.get("data_mode") in ("ultrafeedback", "cdpo") and str(c.get("dataset")) == source
    ]
    chosen = trained_on or configs
    seed, fraction = trainer_split(chosen, split_seed)
    cdpo = any(c.get("data_mode") == "cdpo" for c in chosen)
    return seed, fraction, "cdpo" if cdpo else "aspects"


def evaluate(args: argparse.Namespace) -> int:
    """The whole `mofast eval` path; returns the exit status."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = tuple(q.strip() for q in args.questions.split(",") if q.strip())
    unknown = [q for q in questions if q not in QUESTIONS]
    if unknown or not questions:
        raise ValueError(f"unknown question(s) {unknown}; choose from {', '.join(QUESTIONS)}")
    prompts_config = load_prompts(args.prompts)
    settings = GenerationSettings(
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        engine=args.engine,
        device=args.device,
        dtype=args.dtype,
    )
    settings.validate()

    # Every model and the judge are found first: a bad name stops the run before hours of
    # generation, not after.
    models = plan_models(args.model, args.model_name, args.reference, args.no_reference)
    judge = build_judge(args)
    configs = [c for c in (run_config(e.run_dir) for e in models if e.run_dir) if c]
    source = args.heldout or default_heldout(configs)
    split_seed, test_fraction, mode = heldout_split(configs, source, args.split_seed)
    heldout, heldout_note = load_heldout(
        source,
        limit=args.limit,
        split=args.heldout_split,
        part=args.heldout_part,
        split_seed=split_seed,
        ultrafeedback_mode=mode,
        test_fraction=test_fraction,
    )
    logger.info("%d held-out prompts from %s (%s)", len(heldout), source, heldout_note["golden"])
    logger.info("models: %s", ", ".join(f"{m.label}={m.path}" for m in models))

    from tqdm.auto import tqdm

    responses = {}
    for entry in models:
        with tqdm(total=len(heldout), desc=f"generate {entry.label}", unit="prompt") as bar:
            responses[entry.label] = generate_responses(
                entry, heldout, settings, out_dir, progress=bar.update
            )

    plan = plan_comparisons(
        prompts_config, judge.identity, models, heldout, responses, questions, args.seed
    )
    metadata = {
        "models": [dataclasses.asdict(m) for m in models],
        "reference": REFERENCE if any(m.label == REFERENCE for m in models) else None,
        "heldout": heldout_note,
        "split_seed": split_seed,
        "test_fraction": test_fraction,
        "questions": list(questions),
        "judge": judge.identity,
        "judge_max_tokens": MAX_COMPLETION_TOKENS,
        "prompts_file": prompts_config.source,
        "seed": args.seed,
        "generation": dataclasses.asdict(settings),
    }
    _write_atomic(out_dir / "eval.json", json.dumps(metadata, indent=2) + "\n")

    cache = VerdictCache(out_dir / "verdicts.jsonl")
    if cache.torn_lines:
        logger.warning("verdict cache: skipped %d torn line(s) left by a crash", cache.torn_lines)
    try:
        pending = len({c.key for _, _, c in plan if c.key not in cache})
        with tqdm(total=pending, desc="judge", unit="verdict") as bar:
            summary = judge_comparisons(
                judge, (c for _, _, c in plan), cache, on_verdict=lambda _: bar.update(1)
            )
    except JudgeFatalError as err:
        cache.close()
        logger.error("%s", err)
        return 2
    logger.info(
        "judge: %d comparisons: %d with a verdict cached by an earlier run, %d identical to "
        "another comparison of this run (asked once), %d asked: %d answered (%d invalid "
        "replies), %d failed",
        summary.total,
        summary.cached,
        summary.duplicates,
        summary.asked,
        summary.answered,
        summary.invalid,
        len(summary.failed),
    )

    records = [cache.get(comparison.key) for _, _, comparison in plan]
    cut = sum(1 for record in records if record and record.get("truncated"))
    if cut:
        logger.warning(
            "judge: %d of %d comparisons had a prompt longer than the judge's context, cut to "
            "its end (`truncated` in verdicts.jsonl); a judge that cannot read the whole "
            "comparison answers from what is left, often by position alone",
            cut,
            len(records),
        )

    rows = []
    for (label, item, comparison), record in zip(plan, records, strict=True):
        rows.append(
            {
                "model": label,
                "prompt_id": item.id,
                "question": comparison.question,
                "order": comparison.order,
                "key": comparison.key,
                "reply": record["reply"] if record else None,
                "verdict": record["verdict"] if record else None,
                "outcome": outcome_of(comparison.order, record["verdict"]) if record else "missing",
            }
        )
    cache.close()
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _write_atomic(out_dir / "results.jsonl", body)

    for entry in models:
        mine = [r["outcome"] for r in rows if r["model"] == entry.label]
        counts = {k: mine.count(k) for k in ("win", "tie", "loss", "invalid", "missing")}
        logger.info("%s: %s", entry.label, counts)
    if summary.failed:
        logger.error(
            "%d of %d comparisons have no verdict: %d judge requests failed after their "
            "retries (first: %s); run the same command again to ask only those",
            summary.missing,
            summary.total,
            len(summary.failed),
            summary.failed[0][1],
        )
        return 1
    return 0


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationSettings()
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="a trained run folder (`mofast train` writes its final model to model/ in "
        "it), a model folder, a shipped model (stories260K) or a hub id; repeat for several "
        "models",
    )
    parser.add_argument(
        "--model-name", action="append", help="label of each --model, in order (repeatable)"
    )
    parser.add_argument(
        "--reference",
        help="the starting model, evaluated as REFERENCE (default: the model named by the "
        "run folder's config)",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="do not evaluate a REFERENCE model"
    )
    parser.add_argument("--output-dir", required=True, help="folder for caches and results")

    data = parser.add_argument_group("held-out data")
    data.add_argument(
        "--heldout",
        help="JSONL[.gz]/JSON/Parquet file or hub dataset (default: the `dataset` of a run "
        "trained in ultrafeedback or cdpo mode, its test side; else the embedded "
        "overall_score_eval.jsonl.gz, whose golden response is `chosen`)",
    )
    data.add_argument("--heldout-split", default="train", help="hub split (default train)")
    data.add_argument(
        "--heldout-part",
        choices=("test", "all"),
        default="test",
        help="UltraFeedback records: the test side of the split by prompt, or all",
    )
    data.add_argument(
        "--split-seed", type=int, help="seed of the split by prompt (default: the run's split_seed)"
    )
    data.add_argument("--limit", type=int, help="use the first N held-out prompts")

    gen = parser.add_argument_group("generation (SPEC section 6 defaults)")
    gen.add_argument("--temperature", type=float, default=defaults.temperature)
    gen.add_argument("--top-p", type=float, default=defaults.top_p)
    gen.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    gen.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    gen.add_argument("--batch-size", type=int, default=defaults.batch_size)
    gen.add_argument(
        "--engine",
        choices=("auto", "hf", "vllm"),
        default="auto",
        help="auto: vLLM when installed and a GPU is present, else HF generate",
    )
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), ...")
    gen.add_argument(
        "--seed", type=int, default=0, help="seed of sampling and of the comparison order"
    )

    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge", choices=("openai", "local"), required=True)
    judge.add_argument(
        "--judge-model",
        help="model name at the endpoint; for --judge local a model folder, a shipped model "
        "(stories260K) or a hub id",
    )
    judge.add_argument(
        "--judge-base-url",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help="OpenAI-compatible base URL (default $OPENAI_BASE_URL or api.openai.com/v1)",
    )
    judge.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    judge.add_argument("--judge-concurrency", type=int, default=20, help="requests in flight")
    judge.add_argument("--judge-max-retries", type=int, default=6)
    judge.add_argument(
        "--judge-backoff", type=float, default=1.0, help="first retry delay, doubled each time"
    )
    judge.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    judge.add_argument(
        "--judge-max-tokens",
        type=int,
        default=MAX_COMPLETION_TOKENS,
        help=f"completion-token cap per request, at most {MAX_COMPLETION_TOKENS}",
    )
    judge.add_argument("--judge-batch-size", type=int, default=4, help="local judge batch")
    judge.add_argument("--judge-device", default="auto")
    judge.add_argument("--judge-dtype", default="auto")
    judge.add_argument("--prompts", help="judge prompts YAML (default: mofast/prompts/judge.yaml)")
    judge.add_argument(
        "--questions",
        default=",".join(QUESTIONS),
        help=f"comma-separated subset of {','.join(QUESTIONS)}",
    )


def run(args: argparse.Namespace) -> int:
    try:
        return evaluate(args)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
