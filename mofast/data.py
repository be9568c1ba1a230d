"""Preference data for multi-objective DPO: reading, pairing, splitting, tokenising, batching.

The rules are those of SPEC section 4. Every pair that is not trained on is counted by
reason in a `collections.Counter` (one per objective) so the trainer can report it.

Reading
    load_rows(source, split="train") -> list[dict]
        Raw rows of a local .json / .jsonl / .json.gz / .jsonl.gz / .parquet file or of a hub
        dataset (through `datasets.load_dataset`).
    load_preferences(source, stats=None, split="train") -> list[{prompt, chosen, rejected}]
        Rows with `prompt` / `chosen` / `rejected` reduced to text. Chat-format rows (lists of
        {"role", "content"} messages) keep the final assistant turn(s) as the response; a
        missing prompt is taken as the messages chosen and rejected share; a prompt of one
        user message is its text, a longer conversation is rendered as "Role: content"
        paragraphs. Scored pairs (score_chosen/score_rejected, rating_chosen/rating_rejected,
        chosen_score/rejected_score, at top level or under `metadata`) whose scores are equal
        are dropped as "tie"; empty responses as "empty_response", an empty prompt as
        "empty_prompt", equal responses as "identical_responses".
    preference_pair(row) -> (pair, None) or (None, reason): the rule above for one row.
    default_objectives(stats=None) -> {"overall_score": pairs, "rubric_mean": pairs}
        The embedded real data of `mofast.assets.DEFAULT_OBJECTIVES`; `stats` is a dict that
        receives one Counter per objective (overall_score drops 111 ties, 2 empty responses
        and 3 pairs whose two responses are the same text; rubric_mean drops the 5 pairs
        whose prompt is in the embedded evaluation set, as "held_out_prompt").

UltraFeedback (openbmb/UltraFeedback schema: `instruction` and `completions`)
    ultrafeedback_objectives(records, stats=None, mode="aspects") -> {objective: pairs}
        mode="aspects": one objective per aspect (ASPECTS); mode="cdpo": {"cdpo": pairs} on
        the sum of the four ratings. Drop reasons: "empty_prompt", "empty_response",
        "missing_rating", "tie", "identical_responses".
    golden_response(record) -> str
    aspect_rating(completion, aspect) -> float | None

    A rating is a string "1".."5" (numbers are accepted too); "N/A", a missing `Rating`, a
    value outside 1..5 or anything that does not parse is no rating. An aspect given as a
    list of annotation objects is read as the mean of the list's valid ratings (no rating when
    none is valid).
    The golden response is the non-empty completion with the highest mean of its valid
    aspect ratings (the summed rating divided by 4 when all four exist, so sums and partial
    sums compare fairly); ties go to the completion with more valid ratings, then to the one
    that comes first in the record.

Splitting
    split_by_prompt(items, test_fraction=15/64, seed=0, key="prompt") -> (train, test)
    split_objectives(objectives, test_fraction=15/64, seed=0, key="prompt")
        -> ({objective: train}, {objective: test})
        The prompts are ranked by a seeded BLAKE2 hash of (seed, prompt) and the first
        round(test_fraction * number of prompts) go to the test side, so the split is the
        same whatever the order of the items and the same prompt lands on the same side in
        every objective. `key` is a field name or a function of the item.

Tokenising
    encode_pair(tokenizer, prompt, chosen, rejected, max_length=1024, *,
                max_prompt_length=None, stats=None)
        -> {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
           or None (the reason counted in `stats`: "empty_prompt", "empty_response",
           "identical_responses", "identical_after_truncation", "no_room_for_response").
        Whitespace around the prompt and responses is dropped, as most chat templates trim
        message content. Labels are aligned with input_ids: labels[t] = input_ids[t] on response
        tokens and -100 on the prompt (the trainer shifts). With a chat template, the template
        is rendered once per tokenizer around placeholders; the row is then its text pieces and
        the data text, each tokenised as it tokenises in running text (behind the character
        before it), so the ids equal the template's own tokenisation, except that data text is
        tokenised with `split_special_tokens=True` and can never become a control token. One BOS
        at the start (added when the tokenizer adds one by default and the template does not; a
        doubled BOS is collapsed) and none added after it, exactly one end-of-turn token closing
        each response: the template's first special token after the assistant's text (EOS when
        there is none); what the template writes after it (a newline) is left out. Without a
        chat template: BOS + prompt + PLAIN_SEPARATOR + response + EOS, tokenised as that
        running text. Truncation when a row exceeds max_length: the prompt is cut from the left
        (only the prompt's own text: BOS and template text stay whole), by one cut shared by
        both rows, down to what the longer response leaves but never below min(prompt length,
        max_prompt_length) (default max_length // 2), the prompt length counting BOS and
        template text; then each response is cut on the right to what remains (a cut response
        loses its end-of-turn token).
    tokenize_objective(tokenizer, pairs, max_length=1024, stats=None, *,
                       max_prompt_length=None, cache_dir=None, num_proc=None)
        -> datasets.Dataset
        The encoded pairs (the four columns above), tokenised once: the Dataset is built from
        the pairs and mapped into an Arrow file named by a fingerprint of the pairs' content,
        the tokenizer, the lengths and this encoding, so a second call (in any process) loads
        it from `cache_dir` (default: `datasets`' cache folder / "mofast"). The fingerprint
        is the returned Dataset's `_fingerprint`; it is a stable key for the tokenised data.
    tokenizer_fingerprint(tokenizer) -> str: the tokenizer's part of that key.

Batching
    PairCollator(pad_token_id) / PairCollator.for_tokenizer(tokenizer)
        A list of encoded pairs (or a dict of columns, as `dataset[indices]` returns) ->
        {"input_ids", "labels", "attention_mask"}, each int64 [2B, T]: the B chosen rows then
        the B rejected rows, right-padded with pad_token_id (the tokenizer's pad token, else
        its EOS), labels -100 and attention 0 on padding. pad_token_id_of(tokenizer) gives
        that id.
    MultiObjectiveSampler(sizes, micro_batch=8, grad_accum=4, seed=0)
        Iterating yields, for each remaining optimiser step of the current epoch,
        {objective: [grad_accum lists of micro_batch dataset indices]}. An epoch has
        ceil(max(sizes) / (micro_batch * grad_accum)) steps; each objective reads its own
        stream of passes over its data, each pass a fresh seeded permutation, so smaller
        objectives are oversampled and every step has a full window for every objective.
        `state_dict()` / `load_state_dict()` hold the position (epoch, step); the position
        advances when a window is handed out, so a checkpoint taken after the step that used
        it resumes with the next window.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher

from mofast.assets import DEFAULT_EVAL, DEFAULT_OBJECTIVES

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 1024
DEFAULT_TEST_FRACTION = 15 / 64
PLAIN_SEPARATOR = "\n\n"

# Score fields of binarised preference datasets, as (chosen, rejected) name pairs.
_SCORE_FIELDS = (
    ("score_chosen", "score_rejected"),
    ("rating_chosen", "rating_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
)
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_PARQUET_SUFFIXES = (".parquet",)

# Bumped whenever the encoding changes, so stale tokenised caches are never reused.
_ENCODING_VERSION = "mofast-pairs-3"


# ---------------------------------------------------------------------------------------------
# Reading


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _JSON_SUFFIXES + _PARQUET_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def load_rows(source: str | Path, split: str = "train") -> list[dict]:
    """The raw rows of a local JSON / JSONL / Parquet file (optionally gzip) or a hub dataset."""
    path = Path(source)
    suffix = _suffix(path)

    if suffix in _JSON_SUFFIXES + _PARQUET_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"preference file not found: {path}")
        builder = "parquet" if suffix in _PARQUET_SUFFIXES else "json"
        return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()

    if path.exists():
        raise ValueError(
            f"{path}: unsupported file type {suffix!r}; expected one of "
            f"{', '.join(_JSON_SUFFIXES + _PARQUET_SUFFIXES)}"
        )
    return datasets.load_dataset(str(source), split=split).to_list()


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    )


def _messages_to_text(messages: Sequence[Mapping]) -> str:
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        parts = [str(m["content"]) for m in messages]
        return PLAIN_SEPARATOR.join(p for p in parts if p)
    return PLAIN_SEPARATOR.join(f"{str(m['role']).capitalize()}: {m['content']}" for m in messages)


def _response_text(messages: Sequence[Mapping]) -> str:
    return PLAIN_SEPARATOR.join(
        str(m["content"]) for m in messages if m["role"] == "assistant" and m["content"]
    )


def _shared_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _scores(row: Mapping) -> tuple[Any, Any] | None:
    places = [row]
    if isinstance(row.get("metadata"), Mapping):
        places.append(row["metadata"])
    for place in places:
        for chosen_key, rejected_key in _SCORE_FIELDS:
            chosen, rejected = place.get(chosen_key), place.get(rejected_key)
            if chosen is not None and rejected is not None:
                return chosen, rejected
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def preference_pair(row: Mapping) -> tuple[dict | None, str | None]:
    """One row -> ({prompt, chosen, rejected}, None), or (None, the reason it is dropped)."""
    if "chosen" not in row or "rejected" not in row:
        if "instruction" in row and "completions" in row:
            raise ValueError(
                "rows in the UltraFeedback schema (instruction, completions): "
                "use ultrafeedback_objectives() to build preference pairs from them"
            )
        raise ValueError(f"a preference row needs 'chosen' and 'rejected'; got {sorted(row)}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")

    if _is_messages(chosen) and _is_messages(rejected):
        shared = _shared_prefix(chosen, rejected)
        if prompt is None:
            prompt = list(chosen[:shared])
        chosen, rejected = _response_text(chosen[shared:]), _response_text(rejected[shared:])
    if _is_messages(prompt):
        prompt = _messages_to_text(prompt)
    if prompt is None:
        raise ValueError(
            "a row without a 'prompt' needs chat-format 'chosen' and 'rejected' "
            "(lists of {'role', 'content'} messages) to take the prompt from"
        )

    prompt, chosen, rejected = _text(prompt), _text(chosen), _text(rejected)
    if not prompt.strip():
        return None, "empty_prompt"
    if not chosen.strip() or not rejected.strip():
        return None, "empty_response"
    scores = _scores(row)
    if scores is not None and scores[0] == scores[1]:
        return None, "tie"
    if chosen == rejected:
        return None, "identical_responses"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def load_preferences(
    source: str | Path, stats: Counter | None = None, split: str = "train"
) -> list[dict]:
    """Preference pairs {prompt, chosen, rejected} from a file or hub dataset; drops counted."""
    stats = Counter() if stats is None else stats
    pairs = []
    for index, row in enumerate(load_rows(source, split=split)):
        try:
            pair, reason = preference_pair(row)
        except ValueError as error:
            raise ValueError(f"{source}: row {index}: {error}") from None
        if pair is None:
            stats[reason] += 1
        else:
            pairs.append(pair)
    return pairs


def default_objectives(stats: dict[str, Counter] | None = None) -> dict[str, list[dict]]:
    """The embedded real data: {"overall_score": pairs, "rubric_mean": pairs}.

    The two files come from different releases, and five rubric_mean prompts are also in the
    embedded evaluation set (DEFAULT_EVAL): their pairs are dropped ("held_out_prompt") so
    that no evaluation prompt is trained on (SPEC section 4: a prompt never crosses the split).
    """
    stats = {} if stats is None else stats
    held_out = {pair["prompt"] for pair in load_preferences(DEFAULT_EVAL)}
    objectives = {}
    for name, path in DEFAULT_OBJECTIVES.items():
        counter = stats.setdefault(name, Counter())
        pairs = load_preferences(path, counter)
        objectives[name] = [pair for pair in pairs if pair["prompt"] not in held_out]
        if len(objectives[name]) < len(pairs):
            counter["held_out_prompt"] += len(pairs) - len(objectives[name])
    return objectives


# ---------------------------------------------------------------------------------------------
# UltraFeedback


def _rating(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    # SPEC section 4: ratings run from 1 to 5; anything else is no rating, as "N/A" is.
    if isinstance(value, int | float) and 1.0 <= value <= 5.0:
        return float(value)
    return None


def aspect_rating(completion: Mapping, aspect: str) -> float | None:
    """The rating of one aspect of one completion, or None where there is no valid rating."""
    annotations = completion.get("annotations")
    if not isinstance(annotations, Mapping):
        return None
    annotation = annotations.get(aspect)

    if isinstance(annotation, Mapping):
        return _rating(annotation.get("Rating"))
    if isinstance(annotation, list):
        ratings = [_rating(a.get("Rating")) for a in annotation if isinstance(a, Mapping)]
        valid = [r for r in ratings if r is not None]
        return sum(valid) / len(valid) if valid else None
    return None


def _cdpo_score(completion: Mapping) -> float | None:
    ratings = [aspect_rating(completion, aspect) for aspect in ASPECTS]
    return None if any(r is None for r in ratings) else sum(ratings)


def _pairs_of_record(
    record: Mapping, score: Callable[[Mapping], float | None], stats: Counter
) -> list[dict]:
    prompt = _text(record.get("instruction"))
    completions = list(record.get("completions") or [])
    pairs = []

    for first, second in itertools.combinations(completions, 2):
        texts = (_text(first.get("response")), _text(second.get("response")))
        scores = (score(first), score(second))
        if not prompt.strip():
            reason = "empty_prompt"
        elif not texts[0].strip() or not texts[1].strip():
            reason = "empty_response"
        elif scores[0] is None or scores[1] is None:
            reason = "missing_rating"
        elif scores[0] == scores[1]:
            reason = "tie"
        elif texts[0] == texts[1]:
            reason = "identical_responses"
        else:
            reason = None
        if reason is not None:
            stats[reason] += 1
            continue

        better = 0 if scores[0] > scores[1] else 1
        pairs.append({"prompt": prompt, "chosen": texts[better], "rejected": texts[1 - better]})
    return pairs


def _check_completions(completions: Any) -> None:
    if not isinstance(completions, list | None):
        wrong = f"a {type(completions).__name__}"
    else:
        wrong = next((c for c in completions or [] if not isinstance(c, Mapping)), None)
        wrong = None if wrong is None else f"a list holding a {type(wrong).__name__}"
    if wrong is not None:
        raise ValueError(
            "'completions' must be a list of objects (each with a 'response' and "
            f"'annotations'), got {wrong}"
        )


def ultrafeedback_objectives(
    records: Iterable[Mapping], stats: dict[str, Counter] | None = None, mode: str = "aspects"
) -> dict[str, list[dict]]:
    """Per-aspect preference pairs (mode="aspects") or summed-score pairs (mode="cdpo")."""
    if mode == "aspects":
        scores = {aspect: (lambda c, a=aspect: aspect_rating(c, a)) for aspect in ASPECTS}
    elif mode == "cdpo":
        scores = {"cdpo": _cdpo_score}
    else:
        raise ValueError(f"unknown UltraFeedback mode {mode!r}; expected 'aspects' or 'cdpo'")
    stats = {} if stats is None else stats
    counters = {name: stats.setdefault(name, Counter()) for name in scores}
    objectives = {name: [] for name in scores}

    for index, record in enumerate(records):
        if "instruction" not in record or "completions" not in record:
            raise ValueError(
                f"record {index}: an UltraFeedback record needs 'instruction' and "
                f"'completions'; got {sorted(record)}"
            )
        try:
            _check_completions(record["completions"])
        except ValueError as error:
            raise ValueError(f"record {index}: {error}") from None
        for name, score in scores.items():
            objectives[name].extend(_pairs_of_record(record, score, counters[name]))
    return objectives


def golden_response(record: Mapping) -> str:
    """The best completion of an UltraFeedback record by its (mean) summed aspect rating."""
    _check_completions(record.get("completions"))
    best_key, best_text = None, None
    for index, completion in enumerate(record.get("completions") or []):
        text = _text(completion.get("response"))
        ratings = [aspect_rating(completion, aspect) for aspect in ASPECTS]
        valid = [r for r in ratings if r is not None]
        if not text.strip() or not valid:
            continue

        key = (sum(valid) / len(valid), len(valid), -index)
        if best_key is None or key > best_key:
            best_key, best_text = key, text

    if best_text is None:
        raise ValueError("the record has no non-empty completion with a valid rating")
    return best_text


# ---------------------------------------------------------------------------------------------
# Splitting


def _key_function(key: str | Callable[[Any], Any]) -> Callable[[Any], Any]:
    return key if callable(key) else (lambda item: item[key])


def _canonical(key: Any) -> str:
    return key if isinstance(key, str) else json.dumps(key, sort_keys=True, ensure_ascii=False)


def _test_keys(keys: Iterable[Any], test_fraction: float, seed: int) -> set:
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1]; got {test_fraction}")
    unique = {_canonical(k) for k in keys}

    def rank(text: str) -> tuple[bytes, str]:
        digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=16).digest()
        return digest, text

    ordered = sorted(unique, key=rank)
    n_test = round(test_fraction * len(ordered))
    return set(ordered[:n_test])


def _partition(items: Sequence, key_of: Callable, test: set) -> tuple[list, list]:
    train, held_out = [], []
    for item in items:
        side = _canonical(key_of(item)) in test
        (held_out if side else train).append(item)
    return train, held_out


def split_by_prompt(
    items: Sequence,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    key: str | Callable[[Any], Any] = "prompt",
) -> tuple[list, list]:
    """A seeded (train, test) split of items by prompt: a prompt's items never cross."""
    key_of = _key_function(key)
    test = _test_keys((key_of(item) for item in items), test_fraction, seed)
    return _partition(items, key_of, test)


def split_objectives(
    objectives: Mapping[str, Sequence],
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    key: str | Callable[[Any], Any] = "prompt",
) -> tuple[dict[str, list], dict[str, list]]:
    """split_by_prompt over the union of all objectives' prompts, applied to each objective."""
    key_of = _key_function(key)
    every_key = (key_of(item) for items in objectives.values() for item in items)
    test = _test_keys(every_key, test_fraction, seed)

    train, held_out = {}, {}
    for name, items in objectives.items():
        train[name], held_out[name] = _partition(items, key_of, test)
    return train, held_out


# ---------------------------------------------------------------------------------------------
# Tokenising

_PROMPT_SLOT = "MOFASTPROMPTSLOT"
_RESPONSE_SLOT = "MOFASTRESPONSESLOT"


@dataclass
class _Layout:
    """How one tokenizer renders a pair: the template's text around the prompt and response.

    A row is prefix + before + prompt + after + response + closing + suffix: text pieces
    tokenised one by one (so data text cannot form a control token), prefix and suffix ids.
    """

    before: str
    after: str
    closing: str
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    specials: tuple[str, ...]
    bos: int | None
    memo: dict = field(default_factory=dict)


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ids(tokenizer, text: str, *, data: bool) -> list[int]:
    # Data text is split on special-token strings so it can never become a control token.
    if not text:
        return []
    encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=data)
    return list(encoded["input_ids"])


def _piece_ids(
    tokenizer, layout: _Layout, text: str, previous: str, *, data: bool, memo: dict | None = None
) -> list[int]:
    """The ids of `text` as it tokenises after the text `previous` in the rendered row.

    Tokenised alone, a piece can differ from the same text in running text (SentencePiece
    tokenizers prefix every call with a space marker), so the piece is tokenised behind the
    last character before it, whose ids are then removed; where that character does not
    tokenise on its own as a prefix, or ends a special token, the piece is tokenised alone.
    """
    if not text:
        return []
    anchor = previous[-1:]
    if anchor and previous.endswith(layout.specials):
        anchor = ""

    # Template pieces recur in every row, data text in every pair of the same prompt.
    cache = memo if data else layout.memo
    key = (text, anchor, data)
    if cache is not None and key in cache:
        return list(cache[key])

    ids = _ids(tokenizer, anchor + text, data=data)
    if anchor:
        if anchor not in layout.memo:
            layout.memo[anchor] = _ids(tokenizer, anchor, data=True)
        anchor_ids = layout.memo[anchor]
        if ids[: len(anchor_ids)] == anchor_ids:
            ids = ids[len(anchor_ids) :]
        else:
            ids = _ids(tokenizer, text, data=data)
    if cache is not None:
        cache[key] = tuple(ids)
    return ids


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_specials = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_specials[:1] == [bos] and without[:1] != [bos]


def _special_strings(tokenizer) -> tuple[str, ...]:
    strings = set(tokenizer.all_special_tokens)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings.update(t.content for t in decoder.values() if getattr(t, "special", False))
    # Longest first, so a token that contains another is found whole.
    return tuple(sorted((s for s in strings if s), key=len, reverse=True))


def _chat_layout(tokenizer) -> _Layout:
    def render(messages, generation):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )

    user = {"role": "user", "content": _PROMPT_SLOT}
    prompt_text = render([user], True)
    full_text = render([user, {"role": "assistant", "content": _RESPONSE_SLOT}], False)
    if prompt_text.count(_PROMPT_SLOT) != 1 or not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template does not render the prompt with the generation prompt as a "
            "prefix of the conversation with the response; mofast cannot mask it"
        )
    if full_text.count(_RESPONSE_SLOT) != 1:
        raise ValueError("the chat template does not render the assistant's text exactly once")

    before, after = prompt_text.split(_PROMPT_SLOT)
    between, rest = full_text[len(prompt_text) :].split(_RESPONSE_SLOT)
    if between.strip():
        raise ValueError(
            f"the chat template writes {between!r} before the assistant's text only when a "
            "response follows; mofast cannot mask it identically"
        )
    specials = _special_strings(tokenizer)

    # The turn ends at the first special token after the assistant's text (<|im_end|>,
    # <end_of_turn>, <|eot_id|>, </s>); what the template writes after it is not trained on.
    ends = [rest.find(s) + len(s) for s in specials if s in rest]
    closing, suffix = rest[: min(ends)] if ends else "", ()
    if not ends:
        if tokenizer.eos_token_id is None:
            raise ValueError("the chat template closes no turn and the tokenizer has no EOS")
        suffix = (tokenizer.eos_token_id,)

    bos, prefix = tokenizer.bos_token_id, ()
    if bos is not None and _adds_bos(tokenizer):
        before_ids = _ids(tokenizer, before, data=False)
        prefix = () if before_ids[:1] == [bos] else (bos,)
    return _Layout(before, after + between, closing, prefix, suffix, specials, bos)


def _plain_layout(tokenizer) -> _Layout:
    if tokenizer.eos_token_id is None:
        raise ValueError("a tokenizer without a chat template needs an EOS token")
    bos = tokenizer.bos_token_id
    prefix = (bos,) if bos is not None else ()
    return _Layout(
        "", PLAIN_SEPARATOR, "", prefix, (tokenizer.eos_token_id,), _special_strings(tokenizer), bos
    )


def _layout(tokenizer) -> _Layout:
    template = getattr(tokenizer, "chat_template", None)
    try:
        cached = _LAYOUTS.get(tokenizer)
    except TypeError:  # a tokenizer that cannot be weakly referenced is simply not cached
        cached = None
    if cached is not None and cached[0] == template:
        return cached[1]

    layout = _chat_layout(tokenizer) if template else _plain_layout(tokenizer)
    try:
        _LAYOUTS[tokenizer] = (template, layout)
    except TypeError:
        pass
    return layout


def _encode(
    tokenizer,
    prompt: str,
    chosen: str,
    rejected: str,
    max_length: int,
    max_prompt_length: int,
    memo: dict | None = None,
) -> tuple[dict | None, str | None]:
    # Surrounding whitespace is dropped, as most chat templates trim message content.
    prompt, chosen, rejected = prompt.strip(), chosen.strip(), rejected.strip()
    if not prompt:
        return None, "empty_prompt"
    if not chosen or not rejected:
        return None, "empty_response"
    if chosen == rejected:
        return None, "identical_responses"
    layout = _layout(tokenizer)

    head = list(layout.prefix) + _piece_ids(tokenizer, layout, layout.before, "", data=False)
    while layout.bos is not None and head[:2] == [layout.bos, layout.bos]:
        head = head[1:]
    body = _piece_ids(tokenizer, layout, prompt, layout.before, data=True, memo=memo)
    tail = _piece_ids(tokenizer, layout, layout.after, prompt, data=False)
    responses = []
    for text in (chosen, rejected):
        previous = layout.before + layout.after
        ids = _piece_ids(tokenizer, layout, text, previous, data=True, memo=memo)
        ids += _piece_ids(tokenizer, layout, layout.closing, text, data=False)
        responses.append(ids + list(layout.suffix))

    # Only the prompt's own text is cut: the template's text around it stays whole.
    frame, longest = len(head) + len(tail), max(len(r) for r in responses)
    if frame + len(body) + longest > max_length:
        floor = min(frame + len(body), max_prompt_length)
        keep = max(max_length - longest, floor) - frame
        body = body[len(body) - max(keep, 0) :]
        room = max_length - frame - len(body)
        if room < 1:
            return None, "no_room_for_response"
        responses = [r[:room] for r in responses]
    if responses[0] == responses[1]:
        return None, "identical_after_truncation"

    prompt_ids = head + body + tail
    encoded = {}
    for name, response in zip(("chosen", "rejected"), responses, strict=True):
        encoded[f"{name}_input_ids"] = prompt_ids + response
        encoded[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response
    return encoded, None


def _check_lengths(max_length: int, max_prompt_length: int | None) -> int:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2; got {max_length}")
    if max_prompt_length is None:
        return max_length // 2
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length must lie in [1, max_length); got {max_prompt_length} "
            f"with max_length {max_length}"
        )
    return max_prompt_length


def encode_pair(
    tokenizer,
    prompt: str,
    chosen: str,
    rejected: str,
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    max_prompt_length: int | None = None,
    stats: Counter | None = None,
) -> dict[str, list[int]] | None:
    """Token ids and labels of both rows of a pair, or None (reason counted in stats)."""
    max_prompt_length = _check_lengths(max_length, max_prompt_length)
    encoded, reason = _encode(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length)
    if reason is not None and stats is not None:
        stats[reason] += 1
    return encoded


_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
_TEXT_FEATURES = datasets.Features(
    {name: datasets.Value("string") for name in ("prompt", "chosen", "rejected")}
)
# int32 holds any vocabulary and -100, at half the size of int64.
_PAIR_FEATURES = datasets.Features(
    {name: datasets.List(datasets.Value("int32")) for name in _COLUMNS}
)
_ENCODED_FEATURES = datasets.Features({**_PAIR_FEATURES, "drop_reason": datasets.Value("string")})


def _encode_batch(
    batch: dict[str, list], tokenizer, max_length: int, max_prompt_length: int
) -> dict[str, list]:
    out = {column: [] for column in (*_COLUMNS, "drop_reason")}
    memo = {}
    rows = zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True)
    for prompt, chosen, rejected in rows:
        texts = _text(prompt), _text(chosen), _text(rejected)
        encoded, reason = _encode(tokenizer, *texts, max_length, max_prompt_length, memo)
        for column in _COLUMNS:
            out[column].append(encoded[column] if encoded else [])
        out["drop_reason"].append(reason or "")
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes the encoding (not its path)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    else:
        # Padding and truncation settings change when the tokenizer is called with them; they
        # do not change the ids of an unpadded, untruncated encoding.
        if backend.truncation is not None or backend.padding is not None:
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        spec = backend.to_str()
    template = getattr(tokenizer, "chat_template", None)
    settings = [type(tokenizer).__name__, template, tokenizer.bos_token_id, _adds_bos(tokenizer)]
    settings.append(tokenizer.eos_token_id)

    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(settings, ensure_ascii=False).encode())
    digest.update(spec.encode())
    return digest.hexdigest()


def tokenize_objective(
    tokenizer,
    pairs: Sequence[Mapping] | datasets.Dataset,
    max_length: int = DEFAULT_MAX_LENGTH,
    stats: Counter | None = None,
    *,
    max_prompt_length: int | None = None,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """The encoded pairs of one objective as a Dataset, tokenised once and cached on disk."""
    max_prompt_length = _check_lengths(max_length, max_prompt_length)
    if isinstance(pairs, datasets.Dataset):
        source = pairs.select_columns(["prompt", "chosen", "rejected"])
    else:
        columns = {name: [p[name] for p in pairs] for name in ("prompt", "chosen", "rejected")}
        source = datasets.Dataset.from_dict(columns, features=_TEXT_FEATURES)
    if len(source) == 0:
        return datasets.Dataset.from_dict({name: [] for name in _COLUMNS}, features=_PAIR_FEATURES)

    fingerprint = Hasher.hash(
        [
            _ENCODING_VERSION,
            source._fingerprint,
            tokenizer_fingerprint(tokenizer),
            max_length,
            max_prompt_length,
        ]
    )
    default_folder = Path(datasets.config.HF_DATASETS_CACHE) / "mofast"
    folder = Path(cache_dir) if cache_dir is not None else default_folder
    folder.mkdir(parents=True, exist_ok=True)

    encoded = source.map(
        _encode_batch,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
        },
        remove_columns=source.column_names,
        features=_ENCODED_FEATURES,
        new_fingerprint=fingerprint,
        cache_file_name=str(folder / f"pairs-{fingerprint}.arrow"),
        load_from_cache_file=True,
        num_proc=num_proc,
        desc="tokenising pairs",
    )

    reasons = encoded["drop_reason"]
    if stats is not None:
        stats.update(r for r in reasons if r)
    kept = [i for i, reason in enumerate(reasons) if not reason]
    encoded = encoded.remove_columns("drop_reason")
    return encoded if len(kept) == len(reasons) else encoded.select(kept)


# ---------------------------------------------------------------------------------------------
# Batching


def pad_token_id_of(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")


class PairCollator:
    """Encoded pairs -> right-padded [2B, T] input_ids / labels / attention_mask, chosen first."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive; got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None) -> PairCollator:
        return cls(pad_token_id_of(tokenizer), pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping] | Mapping[str, list]) -> dict[str, torch.Tensor]:
        if isinstance(features, Mapping):
            columns = features
        else:
            columns = {c: [f[c] for f in features] for c in _COLUMNS}
        ids = list(columns["chosen_input_ids"]) + list(columns["rejected_input_ids"])
        labels = list(columns["chosen_labels"]) + list(columns["rejected_labels"])
        if not ids:
            raise ValueError("cannot collate an empty batch of pairs")
        for row, (i, y) in enumerate(zip(ids, labels, strict=True)):
            if len(i) != len(y) or not i:
                raise ValueError(
                    f"row {row}: input_ids ({len(i)}) and labels ({len(y)}) must be non-empty "
                    "and of equal length"
                )

        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (i, y) in enumerate(zip(ids, labels, strict=True)):
            input_ids[row, : len(i)] = torch.tensor(i, dtype=torch.long)
            label_ids[row, : len(y)] = torch.tensor(y, dtype=torch.long)
            mask[row, : len(i)] = 1
        return {"input_ids": input_ids, "labels": label_ids, "attention_mask": mask}


class MultiObjectiveSampler:
    """Per-step windows of dataset indices for every objective, oversampling the smaller ones."""

    def __init__(
        self, sizes: Mapping[str, int], micro_batch: int = 8, grad_accum: int = 4, seed: int = 0
    ):
        if not sizes:
            raise ValueError("the sampler needs at least one objective")
        for name, size in sizes.items():
            if int(size) < 1:
                raise ValueError(f"objective {name!r} has no pairs to sample (size {size})")
        if micro_batch < 1 or grad_accum < 1:
            raise ValueError(
                f"micro_batch and grad_accum must be positive; got {micro_batch}, {grad_accum}"
            )
        self.sizes = {name: int(size) for name, size in sizes.items()}
        self.micro_batch = int(micro_batch)
        self.grad_accum = int(grad_accum)
        self.seed = int(seed)
        self.window_size = self.micro_batch * self.grad_accum
        self.steps_per_epoch = -(-max(self.sizes.values()) // self.window_size)
        self.epoch = 0
        self.step = 0
        self._permutations: dict[tuple[str, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _permutation(self, name: str, epoch: int, index: int) -> np.ndarray:
        key = (name, epoch, index)
        if key not in self._permutations:
            if len(self._permutations) > 4 * len(self.sizes):
                self._permutations.clear()
            # The objective enters the seed by a hash of its name, so its stream does not
            # depend on the order the objectives were listed in.
            tag = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
            rng = np.random.default_rng([self.seed, epoch, index, tag])
            self._permutations[key] = rng.permutation(self.sizes[name])
        return self._permutations[key]

    def window(self, epoch: int, step: int) -> dict[str, list[list[int]]]:
        """The indices of optimiser step `step` of epoch `epoch`, for every objective."""
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IndexError(
                f"no step {step} of epoch {epoch}: an epoch has {self.steps_per_epoch} steps"
            )
        out = {}
        for name, size in self.sizes.items():
            start = step * self.window_size
            flat = [
                int(self._permutation(name, epoch, position // size)[position % size])
                for position in range(start, start + self.window_size)
            ]
            out[name] = [
                flat[i : i + self.micro_batch] for i in range(0, self.window_size, self.micro_batch)
            ]
        return out

    def __iter__(self) -> Iterator[dict[str, list[list[int]]]]:
        epoch = self.epoch
        while self.epoch == epoch and self.step < self.steps_per_epoch:
            current = self.step
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = epoch + 1, 0
            yield self.window(epoch, current)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "sizes": dict(self.sizes),
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in ("seed", "sizes", "micro_batch", "grad_accum"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the sampler: {name} was {state[name]!r} and is now "
                    f"{getattr(self, name)!r}"
                )
        if not 0 <= state["step"] < self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"cannot resume the sampler at {state['epoch']}:{state['step']}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
