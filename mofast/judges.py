"""Pairwise judges for the evaluation protocol of SPEC section 6, and their verdict cache.

A judge reads a query and two responses and answers 1 (the first is better), 2 (the
second is better) or 0 (a tie). Two judges are offered:

- `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint, with a fixed number
  of requests in flight, retries with exponential backoff, and a hard cap of
  `MAX_COMPLETION_TOKENS` completion tokens.
- `LocalJudge`: a local transformers model whose verdict is a constrained choice: the
  answer among "1", "2" and "0" with the highest log-probability after the prompt, so
  even a tiny model always gives a valid answer.

Every verdict goes to a `VerdictCache` (append-only JSONL, fsync per line) the moment
it arrives, keyed by a stable hash of what was asked, so a rerun asks nothing twice and
a crash loses at most the requests in flight.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The comparison asked about overall quality first, then one per objective (SPEC 6).
QUESTIONS = ("overall", "instruction_following", "honesty", "helpfulness", "truthfulness")

# The only valid answers, in the order LocalJudge scores them.
VERDICTS = ("1", "2", "0")

# SPEC section 6: the judge answers in at most 10 completion tokens.
MAX_COMPLETION_TOKENS = 10

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "judge.yaml"

TEMPLATE_FIELDS = frozenset({"prompt", "first", "second", "criterion"})

# Statuses worth another try: the server is busy, overloaded or briefly broken.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})

# A bare answer, allowing the decorations models add anyway: quotes, brackets, a period.
_VERDICT_RE = re.compile(r"""^\s*["'`(\[]?\s*([012])\s*["'`)\]]?\s*\.?\s*$""")


class JudgeError(RuntimeError):
    """A request that failed for good after its retries; rerunning may succeed."""


class JudgeFatalError(JudgeError):
    """A request the server refuses (bad key, unknown model, bad request): retrying is futile."""


# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompts:
    """The system prompt, the user template and one criterion sentence per question."""

    system: str
    template: str
    criteria: dict[str, str]
    source: str = ""

    def messages(self, question: str, prompt: str, first: str, second: str) -> list[dict]:
        if question not in self.criteria:
            raise KeyError(f"no judge prompt for question {question!r}")
        user = self.template.format(
            prompt=prompt, first=first, second=second, criterion=self.criteria[question]
        )
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def fingerprint(self, question: str) -> str:
        """A hash of everything but the texts, so edited prompts never reuse old verdicts."""
        return _sha256([self.system, self.template, self.criteria[question]])


def load_prompts(path: str | os.PathLike | None = None) -> JudgePrompts:
    """Read the judge prompts from YAML (default: the packaged `prompts/judge.yaml`)."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise FileNotFoundError(f"judge prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with system, template and questions")

    missing = [k for k in ("system", "template", "questions") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")

    template = str(data["template"])
    used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if used - TEMPLATE_FIELDS or TEMPLATE_FIELDS - used:
        raise ValueError(
            f"{path}: the template must use exactly the fields {sorted(TEMPLATE_FIELDS)}; "
            f"it uses {sorted(used)}"
        )

    questions = data["questions"]
    if not isinstance(questions, dict):
        raise ValueError(f"{path}: `questions` must map each question to its criterion")
    absent = [q for q in QUESTIONS if q not in questions]
    if absent:
        raise ValueError(f"{path}: no criterion for question(s) {', '.join(absent)}")
    criteria = {}
    for name, entry in questions.items():
        criterion = entry.get("criterion") if isinstance(entry, dict) else entry
        if not isinstance(criterion, str) or not criterion.strip():
            raise ValueError(f"{path}: question {name!r} needs a non-empty `criterion`")
        criteria[name] = criterion.strip()
    return JudgePrompts(str(data["system"]), template, criteria, source=str(path))


def parse_verdict(reply: str | None) -> int | None:
    """1, 2 or 0 when the reply is one of the three answers, else None (invalid).

    A reply is never turned into a tie: "1 because...", "Response 1", "" and None are
    all invalid.
    """
    if reply is None:
        return None
    match = _VERDICT_RE.match(reply)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------
# Comparisons and the verdict cache
# ---------------------------------------------------------------------------------------


def _sha256(parts: Sequence[str]) -> str:
    blob = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Comparison:
    """One question put to the judge: a query and two responses in a recorded order."""

    key: str
    question: str
    order: str
    messages: list[dict] = field(hash=False, compare=False)


def make_comparison(
    prompts: JudgePrompts,
    judge_id: str,
    question: str,
    order: str,
    prompt: str,
    first: str,
    second: str,
) -> Comparison:
    """The comparison and its cache key: (judge, question, order, prompt, both responses)."""
    key = _sha256([judge_id, question, order, prompt, first, second, prompts.fingerprint(question)])
    return Comparison(key, question, order, prompts.messages(question, prompt, first, second))


class VerdictCache:
    """Append-only JSONL of verdicts keyed by comparison; safe to use from many threads.

    Each record is written, flushed and fsynced as it arrives. A line torn by a crash is
    skipped on load (and counted in `torn_lines`); the next write starts a fresh line.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_lines = 0
        self._records: dict[str, dict] = {}
        self._lock = threading.Lock()

        needs_newline = False
        if self.path.exists():
            raw = self.path.read_bytes()
            needs_newline = bool(raw) and not raw.endswith(b"\n")
            for line in raw.decode("utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.torn_lines += 1
                    continue
                if isinstance(record, dict) and "key" in record:
                    self._records.setdefault(record["key"], record)
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def add(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if record["key"] in self._records:
                return
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._records[record["key"]] = record

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> VerdictCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


VerdictCallback = Callable[[Comparison, "str | None", dict], None]


@dataclass
class JudgingSummary:
    """What one pass over a list of comparisons did, each comparison counted once.

    total = cached + duplicates + asked: `cached` found their verdict in the cache before
    the pass (an earlier run's), `duplicates` repeat the key of another comparison of
    this pass (two models wrote the same response) and share its request, `asked` are
    the requests sent. Of those, `answered` came back (`invalid` of them not a verdict)
    and `failed` did not; `missing` counts the comparisons left without a verdict.
    """

    total: int = 0
    cached: int = 0
    duplicates: int = 0
    asked: int = 0
    answered: int = 0
    invalid: int = 0
    missing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def judge_comparisons(
    judge,
    comparisons: Iterable[Comparison],
    cache: VerdictCache,
    on_verdict: Callable[[dict], None] | None = None,
) -> JudgingSummary:
    """Ask the judge every comparison not yet in the cache; cache each verdict on arrival.

    Comparisons with the same key are asked once. Requests that fail for good are
    listed in `failed` (key, reason) and not cached, so a rerun asks them again.
    """
    summary = JudgingSummary()
    keys: list[str] = []
    pending: dict[str, Comparison] = {}
    for comparison in comparisons:
        keys.append(comparison.key)
        if comparison.key in cache:
            summary.cached += 1
        elif comparison.key in pending:
            summary.duplicates += 1
        else:
            pending[comparison.key] = comparison
    summary.total = len(keys)
    summary.asked = len(pending)
    lock = threading.Lock()

    def record(comparison: Comparison, reply: str | None, extra: dict) -> None:
        verdict = parse_verdict(reply)
        entry = {
            "key": comparison.key,
            "judge": judge.identity,
            "question": comparison.question,
            "order": comparison.order,
            "reply": reply,
            "verdict": verdict,
            "valid": verdict is not None,
            "time": time.time(),
            **extra,
        }
        cache.add(entry)
        with lock:
            summary.answered += 1
            summary.invalid += verdict is None
        if on_verdict is not None:
            on_verdict(entry)

    summary.failed = judge.judge(list(pending.values()), record)
    summary.missing = sum(key not in cache for key in keys)
    return summary


# ---------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# ---------------------------------------------------------------------------------------


@dataclass
class JudgeReply:
    text: str | None
    attempts: int


class OpenAIJudge:
    """A chat-completions endpoint (`POST {base_url}/chat/completions`) used as the judge.

    Args:
        base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
        model: the model name sent in each request.
        api_key: sent as a bearer token when given.
        max_in_flight: requests running at once (SPEC: 20).
        max_retries: further attempts after a transient failure (connection error,
            timeout, 408/429/5xx), waiting backoff_s * 2**attempt (with jitter, capped
            at max_backoff_s, or the server's Retry-After when it sends one).
        max_tokens: completion-token cap sent with each request; at most 10.
    """

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        max_in_flight: int = 20,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 120.0,
        max_tokens: int = MAX_COMPLETION_TOKENS,
        temperature: float = 0.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base URL must start with http:// or https://: {base_url!r}")
        if not model:
            raise ValueError("the OpenAI-compatible judge needs a model name (--judge-model)")
        if not 1 <= max_tokens <= MAX_COMPLETION_TOKENS:
            raise ValueError(
                f"judge max_tokens must be in 1..{MAX_COMPLETION_TOKENS}, got {max_tokens}"
            )
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError("max_retries and backoff_s must not be negative")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature

    @property
    def identity(self) -> str:
        return f"openai:{self.model}@{self.url}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        # Jitter spreads the retries of 20 concurrent requests hit by the same 429.
        base = min(self.backoff_s * 2.0**attempt, self.max_backoff_s)
        return base * (0.5 + 0.5 * random.random())

    def ask(self, messages: list[dict]) -> JudgeReply:
        """One request with its retries; the reply text (None when the server gave none)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "n": 1,
            }
        ).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            request = urllib.request.Request(
                self.url, data=body, headers=self._headers(), method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return JudgeReply(_reply_text(payload), attempt + 1)
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", errors="replace")
                if err.code not in RETRYABLE_STATUS:
                    raise JudgeFatalError(
                        f"judge endpoint {self.url} refused the request: HTTP {err.code} "
                        f"{err.reason}: {detail}"
                    ) from err
                retry_after = err.headers.get("Retry-After") if err.headers else None
                last = f"HTTP {err.code} {err.reason}"
            except (
                urllib.error.URLError,
                http.client.HTTPException,
                ConnectionError,
                TimeoutError,
                ValueError,
            ) as err:
                # ValueError covers a body that is not JSON or not a chat completion.
                last = f"{type(err).__name__}: {err}"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise JudgeError(f"judge request failed after {self.max_retries + 1} attempts: {last}")

    def judge(self, comparisons: Sequence[Comparison], on_verdict: VerdictCallback) -> list:
        """Ask all comparisons, `max_in_flight` at a time; call on_verdict as each arrives.

        Returns the (key, reason) of requests that failed after their retries. A request
        the server refuses outright stops the pass (nothing more is sent) and raises
        JudgeFatalError once the requests in flight have finished and been recorded.
        """
        stop = threading.Event()
        fatal: list[JudgeFatalError] = []
        failures: list[tuple[str, str]] = []

        def work(comparison: Comparison) -> None:
            if stop.is_set():
                return
            try:
                reply = self.ask(comparison.messages)
            except JudgeFatalError as err:
                stop.set()
                fatal.append(err)
                return
            except JudgeError as err:
                failures.append((comparison.key, str(err)))
                return
            on_verdict(comparison, reply.text, {"attempts": reply.attempts})

        with ThreadPoolExecutor(max_workers=self.max_in_flight) as pool:
            futures = [pool.submit(work, c) for c in comparisons]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                stop.set()
                raise
        if fatal:
            raise fatal[0]
        return failures


def _reply_text(payload: dict) -> str | None:
    try:
        message = payload["choices"][0]["message"]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"not a chat-completions response: {str(payload)[:200]}") from err
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        # Some servers return content as a list of typed parts.
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


# ---------------------------------------------------------------------------------------
# Local transformers model
# ---------------------------------------------------------------------------------------


class LocalJudge:
    """A local causal LM whose verdict is the most likely of the answers "1", "2", "0".

    Each answer is scored by the summed log-probability of its tokens after the rendered
    prompt (the model's chat template when it has one, else plain text ending in
    "Answer:"). A prompt longer than the model's context is cut from the left, keeping the
    question at its end; `truncated` in the verdict record says when that happened.
    """

    kind = "local"

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 4,
        max_length: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"judge batch size must be at least 1, got {batch_size}")
        self.name = str(model)
        self.batch_size = batch_size
        self._device = device
        self._dtype = dtype
        self._max_length = max_length
        self.model = None

    def load(self) -> None:
        """Load the model; done on first use, so a fully cached rerun never loads it."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = _torch_dtype(self._dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        model = AutoModelForCausalLM.from_pretrained(self.name, dtype=torch_dtype)
        self.model = model.to(self.device).eval()

        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.answer_ids = [self.tokenizer.encode(v, add_special_tokens=False) for v in VERDICTS]
        if any(not ids for ids in self.answer_ids):
            raise ValueError(f"tokenizer of {self.name} encodes an answer to no tokens")
        prefix = self.answer_ids[0][:-1]
        last = [ids[-1] for ids in self.answer_ids]
        same_prefix = all(ids[:-1] == prefix for ids in self.answer_ids)
        self.shared_prefix = (prefix, last) if same_prefix and len(set(last)) == 3 else None

        limit = self._max_length or getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(limit) if limit else 4096
        self.prompt_budget = self.max_length - max(len(ids) for ids in self.answer_ids)
        if self.prompt_budget < 8:
            raise ValueError(f"context of {self.max_length} tokens is too short to judge")

    @property
    def identity(self) -> str:
        return f"local:{self.name}"

    def render(self, messages: list[dict]) -> list[int]:
        """Token ids of the judge prompt, ready for an answer to follow."""
        self.load()
        tok = self.tokenizer
        if tok.chat_template:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception:
                # Templates such as Gemma's reject a system turn: fold it into the user's.
                merged = [
                    {
                        "role": "user",
                        "content": messages[0]["content"] + "\n\n" + messages[1]["content"],
                    }
                ]
                text = tok.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False).input_ids
        text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
        return tok(text).input_ids

    def _tail_logprobs(self, rows: list[list[int]], keep: int):
        """Log-softmax of the last `keep` positions of left-padded rows: [rows, keep, vocab].

        Left padding puts every row's end at the same column, so only `keep` logits per
        row go through the vocabulary projection.
        """
        import torch

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, mask, positions = (t.to(self.device) for t in (input_ids, mask, positions))

        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                logits_to_keep=keep,
            ).logits[:, -keep:]
        return torch.log_softmax(logits.float(), dim=-1)

    def score(self, batch: Sequence[list[dict]]) -> tuple[list[list[float]], list[bool]]:
        """Log-probability of each answer (in VERDICTS order) for each prompt of a batch."""
        import torch

        self.load()
        prompts, truncated = [], []
        for messages in batch:
            ids = self.render(messages)
            truncated.append(len(ids) > self.prompt_budget)
            prompts.append(ids[-self.prompt_budget :])

        if self.shared_prefix is not None:
            # The answers differ only in their last token ("1", "2", "0" are one token
            # each in most vocabularies): one row per prompt, the next-token log-probs.
            prefix, last = self.shared_prefix
            logprobs = self._tail_logprobs([ids + prefix for ids in prompts], len(prefix) + 1)
            scores = logprobs[:, -1, torch.tensor(last, device=logprobs.device)]
            if prefix:
                targets = torch.tensor(prefix, device=logprobs.device).expand(len(prompts), -1)
                common = logprobs[:, :-1].gather(-1, targets[..., None]).squeeze(-1).sum(-1)
                scores = scores + common[:, None]
            return scores.tolist(), truncated

        # Otherwise one row per answer; kept logit j predicts the token at row position
        # width - keep + j + 1, so an answer of n tokens is read from logits keep-1-n..keep-2.
        rows = [ids + answer for ids in prompts for answer in self.answer_ids]
        keep = max(len(a) for a in self.answer_ids) + 1
        logprobs = self._tail_logprobs(rows, keep)
        targets = torch.zeros((len(rows), keep - 1), dtype=torch.long)
        target_mask = torch.zeros((len(rows), keep - 1), dtype=torch.float32)
        for i in range(len(rows)):
            answer = self.answer_ids[i % len(VERDICTS)]
            targets[i, keep - 1 - len(answer) :] = torch.tensor(answer)
            target_mask[i, keep - 1 - len(answer) :] = 1.0
        targets, target_mask = targets.to(self.device), target_mask.to(self.device)
        picked = logprobs[:, :-1].gather(-1, targets[..., None]).squeeze(-1)
        scores = (picked * target_mask).sum(-1)
        return scores.view(len(batch), len(VERDICTS)).tolist(), truncated

    def judge(self, comparisons: Sequence[Comparison], on_verdict: VerdictCallback) -> list:
        for start in range(0, len(comparisons), self.batch_size):
            chunk = comparisons[start : start + self.batch_size]
            table, truncated = self.score([c.messages for c in chunk])
            for comparison, scores, cut in zip(chunk, table, truncated, strict=True):
                best = max(range(len(VERDICTS)), key=lambda j: scores[j])
                extra = {"logprobs": dict(zip(VERDICTS, scores, strict=True)), "truncated": cut}
                on_verdict(comparison, VERDICTS[best], extra)
        return []


def _torch_dtype(name: str | None, device):
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(choices)} or auto")
    return choices[name]
