"""The data rules of SPEC section 4 on small hand-made records in the real schemas."""

import gzip
import json
import random
from collections import Counter

import datasets
import pandas
import pytest
import torch
from transformers import AutoTokenizer

import mofast.data as data
from mofast.assets import DEFAULT_EVAL, STORIES260K
from mofast.data import (
    IGNORE_INDEX,
    MultiObjectiveSampler,
    PairCollator,
    aspect_rating,
    default_objectives,
    encode_pair,
    golden_response,
    load_preferences,
    preference_pair,
    split_by_prompt,
    split_objectives,
    tokenize_objective,
    ultrafeedback_objectives,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_RATING = object()


# ---------------------------------------------------------------------------------------------
# UltraFeedback records in the released schema


def _annotation(value):
    if value is NO_RATING:
        return {"Rationale": "the annotator gave no rating"}
    if isinstance(value, list):
        return [{"Rating": v, "Rationale": "one of several annotators"} for v in value]
    return {"Rating": value, "Rationale": "a reason"}


def _completion(text, **ratings):
    # An aspect left out of `ratings` is missing from the annotations altogether.
    return {
        "model": "some-model",
        "response": text,
        "annotations": {aspect: _annotation(v) for aspect, v in ratings.items()},
    }


def _record(instruction, *completions):
    return {"source": "hand-made", "instruction": instruction, "completions": list(completions)}


R1 = _record(
    "Name a prime number.",
    _completion(
        "A: 7", helpfulness="5", honesty="2", truthfulness="3"
    ),  # instruction_following missing
    _completion(
        "B: 9", helpfulness="3", honesty="4", instruction_following="1", truthfulness=NO_RATING
    ),
    _completion(
        "C: 2", helpfulness="N/A", honesty="4", instruction_following="2", truthfulness="5"
    ),
    _completion(
        "D: 11",
        helpfulness="3",
        honesty=["5", "3"],
        instruction_following=["N/A", "4"],
        truthfulness="1",
    ),
)
R2 = _record(
    "Say hi.",
    _completion("E: hi", helpfulness="4", honesty="4", instruction_following="4", truthfulness="4"),
    _completion(
        "F: hey", helpfulness="5", honesty="5", instruction_following="3", truthfulness="3"
    ),
    _completion(
        "G: no", helpfulness="2", honesty=["2", "3"], instruction_following="2", truthfulness="2"
    ),
    _completion("  ", helpfulness="5", honesty="5", instruction_following="5", truthfulness="5"),
)


def _pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_ultrafeedback_pairs_per_aspect():
    stats = {}
    objectives = ultrafeedback_objectives([R1, R2], stats)

    p1, p2 = R1["instruction"], R2["instruction"]
    assert objectives == {
        "helpfulness": [
            _pair(p1, "A: 7", "B: 9"),
            _pair(p1, "A: 7", "D: 11"),
            _pair(p2, "F: hey", "E: hi"),
            _pair(p2, "E: hi", "G: no"),
            _pair(p2, "F: hey", "G: no"),
        ],
        "honesty": [
            _pair(p1, "B: 9", "A: 7"),
            _pair(p1, "C: 2", "A: 7"),
            _pair(p1, "D: 11", "A: 7"),
            _pair(p2, "F: hey", "E: hi"),
            _pair(p2, "E: hi", "G: no"),
            _pair(p2, "F: hey", "G: no"),
        ],
        "instruction_following": [
            _pair(p1, "C: 2", "B: 9"),
            _pair(p1, "D: 11", "B: 9"),
            _pair(p1, "D: 11", "C: 2"),
            _pair(p2, "E: hi", "F: hey"),
            _pair(p2, "E: hi", "G: no"),
            _pair(p2, "F: hey", "G: no"),
        ],
        "truthfulness": [
            _pair(p1, "C: 2", "A: 7"),
            _pair(p1, "A: 7", "D: 11"),
            _pair(p1, "C: 2", "D: 11"),
            _pair(p2, "E: hi", "F: hey"),
            _pair(p2, "E: hi", "G: no"),
            _pair(p2, "F: hey", "G: no"),
        ],
    }

    # Every one of the 12 candidate pairs per aspect is either kept or counted.
    assert stats["helpfulness"] == Counter(missing_rating=3, tie=1, empty_response=3)
    assert stats["honesty"] == Counter(tie=3, empty_response=3)
    assert stats["instruction_following"] == Counter(missing_rating=3, empty_response=3)
    assert stats["truthfulness"] == Counter(missing_rating=3, empty_response=3)
    for name, pairs in objectives.items():
        assert len(pairs) + sum(stats[name].values()) == 12


def test_ultrafeedback_cdpo_sums_and_drops():
    stats = {}
    objectives = ultrafeedback_objectives([R1, R2], stats, mode="cdpo")

    # R1: only D has all four ratings, so no pair; R2: E and F both sum to 16 (a tie), G sums
    # to 8.5 with its list-shaped honesty read as the mean 2.5, the fourth is empty.
    p2 = R2["instruction"]
    assert objectives == {"cdpo": [_pair(p2, "E: hi", "G: no"), _pair(p2, "F: hey", "G: no")]}
    assert stats["cdpo"] == Counter(missing_rating=6, tie=1, empty_response=3)


def test_ultrafeedback_identical_texts_and_bad_input():
    record = _record(
        "Q?",
        _completion("same", helpfulness="5"),
        _completion("same", helpfulness="2"),
        _completion("other", helpfulness="4"),
    )
    stats = {}
    pairs = ultrafeedback_objectives([record], stats)["helpfulness"]

    assert pairs == [_pair("Q?", "same", "other"), _pair("Q?", "other", "same")]
    assert stats["helpfulness"]["identical_responses"] == 1
    with pytest.raises(ValueError, match="mode"):
        ultrafeedback_objectives([record], mode="overall")
    with pytest.raises(ValueError, match="instruction"):
        ultrafeedback_objectives([{"prompt": "x", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"record 1: .*instruction"):
        ultrafeedback_objectives([record, {"prompt": "x", "chosen": "a", "rejected": "b"}])
    # Completions that are not annotation objects raised AttributeError ('str' ... 'get').
    with pytest.raises(ValueError, match=r"record 0: 'completions' must be a list of objects"):
        ultrafeedback_objectives([{"instruction": "Q?", "completions": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"record 0: 'completions' must be a list of objects"):
        ultrafeedback_objectives([{"instruction": "Q?", "completions": "ab"}])


@pytest.mark.parametrize("bad", ["0", "6", "-1", "5.5", 7, float("inf"), float("nan"), True])
def test_rating_outside_one_to_five_is_no_rating(bad):
    # SPEC section 4: ratings run 1..5. A value outside that range must not win a pair (a "6"
    # would beat every real rating) but count as a missing rating, like "N/A".
    record = _record(
        "Q?",
        _completion("odd", helpfulness=bad, honesty=[bad, "2"]),
        _completion("real", helpfulness="5", honesty="4"),
        _completion("low", helpfulness="1", honesty="1"),
    )
    stats = {}
    objectives = ultrafeedback_objectives([record], stats)

    assert objectives["helpfulness"] == [_pair("Q?", "real", "low")]
    assert stats["helpfulness"] == Counter(missing_rating=2)
    # In a list of annotations the bad value is left out of the mean: honesty of "odd" is 2.
    assert objectives["honesty"] == [
        _pair("Q?", "real", "odd"),
        _pair("Q?", "odd", "low"),
        _pair("Q?", "real", "low"),
    ]
    assert aspect_rating(record["completions"][0], "helpfulness") is None
    for good in ("1", "5", 3, 2.5):
        assert aspect_rating(_completion("x", helpfulness=good), "helpfulness") == float(good)


def test_golden_response_uses_mean_of_valid_ratings_and_breaks_ties():
    # R1 means: A 10/3, B 8/3, C 11/3 (three valid ratings), D 3.
    assert golden_response(R1) == "C: 2"

    # R2: E and F tie at 4 with four ratings each: the first one wins; the empty one (all
    # fives) is never golden.
    assert golden_response(R2) == "E: hi"

    # Equal means: more valid ratings win over record order.
    record = _record(
        "Q?",
        _completion("three", helpfulness="4", honesty="4", truthfulness="4"),
        _completion(
            "four", helpfulness="4", honesty="4", instruction_following="4", truthfulness="4"
        ),
    )
    assert golden_response(record) == "four"

    with pytest.raises(ValueError, match="no non-empty completion"):
        golden_response(_record("Q?", _completion("x", helpfulness="N/A")))
    with pytest.raises(ValueError, match="'completions' must be a list of objects"):
        golden_response({"instruction": "Q?", "completions": ["a", "b"]})


# ---------------------------------------------------------------------------------------------
# Splitting


def _items(n_prompts=101, seed=0):
    rng = random.Random(seed)
    return [
        _pair(f"prompt {p}", f"good {p}.{j}", f"bad {p}.{j}")
        for p in range(n_prompts)
        for j in range(rng.randint(1, 3))
    ]


def test_split_by_prompt_never_crosses_and_is_seeded():
    items = _items()
    train, test = split_by_prompt(items, seed=3)

    train_prompts, test_prompts = {i["prompt"] for i in train}, {i["prompt"] for i in test}
    assert not train_prompts & test_prompts
    assert len(test_prompts) == round(101 * 15 / 64)
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, items))

    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert {i["prompt"] for i in split_by_prompt(shuffled, seed=3)[1]} == test_prompts
    assert split_by_prompt(items, seed=3) == (train, test)
    assert {i["prompt"] for i in split_by_prompt(items, seed=4)[1]} != test_prompts

    records = [_record(f"q{i}") for i in range(37)]
    train_r, test_r = split_by_prompt(records, test_fraction=0.5, seed=0, key="instruction")
    assert len(test_r) == round(37 * 0.5) and len(train_r) + len(test_r) == 37
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_prompt(items, test_fraction=1.5)


def test_split_objectives_puts_a_prompt_on_one_side_everywhere():
    first, second = _items(60, seed=1), _items(90, seed=2)[40:]
    train, test = split_objectives({"a": first, "b": second}, seed=5)

    test_prompts = {i["prompt"] for side in test.values() for i in side}
    train_prompts = {i["prompt"] for side in train.values() for i in side}
    assert test_prompts and not test_prompts & train_prompts
    assert len(train["a"]) + len(test["a"]) == len(first)
    assert len(train["b"]) + len(test["b"]) == len(second)


# ---------------------------------------------------------------------------------------------
# Generic preference files


ROWS = [
    {"prompt": "p1", "chosen": "good", "rejected": "bad", "metadata": {"score_chosen": 8.0}},
    {
        "prompt": "p2",
        "chosen": "fine",
        "rejected": "poor",
        "metadata": {"score_chosen": 7.0, "score_rejected": 7.0},
    },
    {
        "prompt": "p3",
        "chosen": "yes",
        "rejected": "no",
        "rating_chosen": 4.5,
        "rating_rejected": 4.5,
    },
    {"prompt": "p4", "chosen": "  ", "rejected": "no"},
    {"prompt": "p5", "chosen": "same", "rejected": "same"},
    {
        "prompt": "p6",
        "chosen": "long",
        "rejected": "short",
        "rating_chosen": 5,
        "rating_rejected": 2,
    },
]


def _msg(role, content):
    return {"role": role, "content": content}


CHAT_ROWS = [
    {
        "chosen": [_msg("user", "q1"), _msg("assistant", "good")],
        "rejected": [_msg("user", "q1"), _msg("assistant", "bad")],
    },
    {
        "chosen": [
            _msg("system", "be brief"),
            _msg("user", "u1"),
            _msg("assistant", "a1"),
            _msg("user", "u2"),
            _msg("assistant", "good"),
        ],
        "rejected": [
            _msg("system", "be brief"),
            _msg("user", "u1"),
            _msg("assistant", "a1"),
            _msg("user", "u2"),
            _msg("assistant", "bad"),
        ],
    },
    {
        "chosen": [_msg("user", "q3"), _msg("assistant", "x")],
        "rejected": [_msg("user", "q3"), _msg("assistant", "y")],
        "score_chosen": 6.0,
        "score_rejected": 6.0,
    },
]


def _write(path, rows):
    if path.name.endswith(".parquet"):
        # pandas takes the columns of every row; `datasets` and pyarrow infer them from the first.
        pandas.DataFrame(rows).to_parquet(path)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            json.dump(rows, handle)


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.json", "pairs.parquet"])
def test_load_preferences_from_files_counts_drops(tmp_path, name):
    path = tmp_path / name
    _write(path, ROWS)
    stats = Counter()

    pairs = load_preferences(path, stats)

    assert pairs == [_pair("p1", "good", "bad"), _pair("p6", "long", "short")]
    assert stats == Counter(tie=2, empty_response=1, identical_responses=1)


def test_load_preferences_reduces_chat_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    _write(path, CHAT_ROWS)
    stats = Counter()

    pairs = load_preferences(path, stats)

    conversation = "System: be brief\n\nUser: u1\n\nAssistant: a1\n\nUser: u2"
    assert pairs == [_pair("q1", "good", "bad"), _pair(conversation, "good", "bad")]
    assert stats == Counter(tie=1)

    row = {"prompt": "q1", "chosen": CHAT_ROWS[0]["chosen"], "rejected": CHAT_ROWS[0]["rejected"]}
    assert preference_pair(row) == (_pair("q1", "good", "bad"), None)


def test_load_preferences_rejects_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "pairs.txt").write_text("not a supported format")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_preferences(tmp_path / "pairs.txt")
    with pytest.raises(ValueError, match="ultrafeedback_objectives"):
        preference_pair(R1)
    with pytest.raises(ValueError, match="prompt"):
        preference_pair({"chosen": "a", "rejected": "b"})

    # A file whose rows lack a column: the error names the file and the row.
    misnamed = tmp_path / "misnamed.jsonl"
    _write(misnamed, [{"prompt": "p", "chosen": "a", "worse": "b"}] * 3)
    with pytest.raises(ValueError, match=r"misnamed\.jsonl: row 0: .*'rejected'"):
        load_preferences(misnamed)


def test_default_objectives_drop_counts():
    stats = {}
    objectives = default_objectives(stats)

    assert set(objectives) == {"overall_score", "rubric_mean"}
    assert stats["overall_score"]["tie"] == 111
    assert stats["overall_score"]["empty_response"] == 2
    assert stats["rubric_mean"]["held_out_prompt"] == 5
    # The embedded evaluation prompts are held out: no training pair of either objective uses
    # one (five rubric_mean prompts are in the evaluation file).
    held_out = {pair["prompt"] for pair in load_preferences(DEFAULT_EVAL)}
    for name, pairs in objectives.items():
        assert not held_out & {p["prompt"] for p in pairs}, name
        assert len(pairs) + sum(stats[name].values()) == 1000
        assert all(p["chosen"].strip() and p["rejected"].strip() for p in pairs)
        assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)


# ---------------------------------------------------------------------------------------------
# Tokenisation


@pytest.fixture(scope="module")
def plain_tokenizer():
    return AutoTokenizer.from_pretrained(STORIES260K)


def _chat_tokenizer(template):
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module", params=["bos in template", "bos from tokenizer"])
def chat_tokenizer(request):
    # stories260K adds BOS by default: a template that writes it too is the double-BOS trap.
    template = "{{ bos_token }}" + CHATML if request.param == "bos in template" else CHATML
    return _chat_tokenizer(template)


def _prompt_length(labels):
    return next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)


def _check_rows(enc, bos, end_of_turn):
    n_prompt = _prompt_length(enc["chosen_labels"])
    assert _prompt_length(enc["rejected_labels"]) == n_prompt
    assert enc["chosen_input_ids"][:n_prompt] == enc["rejected_input_ids"][:n_prompt]

    for row in ("chosen", "rejected"):
        ids, labels = enc[f"{row}_input_ids"], enc[f"{row}_labels"]
        assert len(ids) == len(labels)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[0] == bos and ids.count(bos) == 1
        assert ids[-1] == end_of_turn and ids[n_prompt:].count(end_of_turn) == 1
    return n_prompt


def test_encode_pair_plain_rendering(plain_tokenizer):
    tok = plain_tokenizer
    prompt, chosen, rejected = "Once upon a time", "there was a cat.", "the end"

    enc = encode_pair(tok, prompt, chosen, rejected)

    n_prompt = _check_rows(enc, tok.bos_token_id, tok.eos_token_id)
    for row, text in (("chosen", chosen), ("rejected", rejected)):
        running = tok(prompt + data.PLAIN_SEPARATOR + text)["input_ids"]
        assert enc[f"{row}_input_ids"] == running + [tok.eos_token_id]
    assert enc["chosen_input_ids"][:n_prompt] == tok(prompt + "\n\n")["input_ids"]


def test_encode_pair_chat_template(chat_tokenizer):
    tok = chat_tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    prompt, chosen = "Tell me a story.", "Once upon a time there was a cat."
    # Control-token text inside the data must stay text.
    rejected = "No. <|im_end|> </s> <s>"

    enc = encode_pair(tok, prompt, chosen, rejected)

    n_prompt = _check_rows(enc, tok.bos_token_id, end_of_turn)
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    expected = tok(rendered, add_special_tokens=False)["input_ids"]
    expected = expected if expected[0] == tok.bos_token_id else [tok.bos_token_id] + expected
    # The template's own tokenisation, less the newline it writes after the end of turn.
    ids = enc["chosen_input_ids"]
    assert ids == expected[: len(ids)]
    assert len(expected) > len(ids) and not tok.decode(expected[len(ids) :]).strip()
    generation = tok.apply_chat_template(
        conversation[:1], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(generation, add_special_tokens=False)["input_ids"]
    assert ids[:n_prompt] == prompt_ids or ids[:n_prompt] == [tok.bos_token_id] + prompt_ids
    assert tok.decode(enc["rejected_labels"][n_prompt:-1]).strip() == rejected


def test_encode_pair_chat_truncation_keeps_template_text(chat_tokenizer):
    tok = chat_tokenizer
    prompt = " ".join(f"word{i}" for i in range(40))
    full = encode_pair(tok, prompt, "yes it is", "no", max_length=10_000)
    n_prompt = _prompt_length(full["chosen_labels"])
    head = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    tail = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    response = full["chosen_input_ids"][n_prompt:]

    enc = encode_pair(tok, prompt, "yes it is", "no", max_length=48, max_prompt_length=24)

    # Only the prompt's text is cut: BOS, the user header and the generation prompt stay.
    ids, bos = enc["chosen_input_ids"], tok.bos_token_id
    n_kept = 48 - len(response)
    assert len(ids) == 48 and ids[n_kept:] == response
    assert _check_rows(enc, bos, tok.convert_tokens_to_ids("<|im_end|>")) == n_kept
    assert ids[: 1 + len(head)] == [bos] + head and ids[n_kept - len(tail) : n_kept] == tail
    text = ids[1 + len(head) : n_kept - len(tail)]
    full_text = full["chosen_input_ids"][1 + len(head) : n_prompt - len(tail)]
    assert 0 < len(text) < len(full_text) and text == full_text[-len(text) :]


def test_encode_pair_drops_and_counts(plain_tokenizer):
    tok, stats = plain_tokenizer, Counter()

    assert encode_pair(tok, "   ", "a", "b", stats=stats) is None
    assert encode_pair(tok, "p", "a", "\n", stats=stats) is None
    assert encode_pair(tok, "p", "same", " same ", stats=stats) is None
    assert stats == Counter(empty_prompt=1, empty_response=1, identical_responses=1)
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode_pair(tok, "p", "a", "b", max_length=16, max_prompt_length=16)


def test_encode_pair_truncation(plain_tokenizer):
    tok = plain_tokenizer
    prompt = " ".join(f"word{i}" for i in range(61))
    full = encode_pair(tok, prompt, "a short yes", "no", max_length=10_000)
    n_prompt = _prompt_length(full["chosen_labels"])
    chosen = full["chosen_input_ids"][n_prompt:]
    assert n_prompt > 100

    # Short responses: only the prompt is cut, from the left, BOS kept, one cut for both rows.
    enc = encode_pair(tok, prompt, "a short yes", "no", max_length=60, max_prompt_length=20)
    kept = 60 - len(chosen) - 1
    expected_prompt = [tok.bos_token_id] + full["chosen_input_ids"][n_prompt - kept : n_prompt]
    assert _check_rows(enc, tok.bos_token_id, tok.eos_token_id) == 1 + kept
    assert enc["chosen_input_ids"] == expected_prompt + chosen
    assert enc["rejected_input_ids"] == expected_prompt + full["rejected_input_ids"][n_prompt:]

    # Long responses: the prompt keeps max_prompt_length tokens, then both responses are cut.
    shared = "the cat sat on the mat " * 9
    full = encode_pair(tok, prompt, "yes " + shared, "no " + shared, max_length=10_000)
    enc = encode_pair(tok, prompt, "yes " + shared, "no " + shared, 40, max_prompt_length=15)
    head = full["chosen_input_ids"][:1] + full["chosen_input_ids"][n_prompt - 14 : n_prompt]
    for row in ("chosen", "rejected"):
        assert len(enc[f"{row}_input_ids"]) == 40
        assert _prompt_length(enc[f"{row}_labels"]) == 15
        assert enc[f"{row}_input_ids"] == head + full[f"{row}_input_ids"][n_prompt : n_prompt + 25]

    # Both responses begin alike and differ past the cut: the pair is dropped and counted.
    stats = Counter()
    late = (shared + "yes", shared + "no")
    assert encode_pair(tok, prompt, *late, 40, max_prompt_length=15, stats=stats) is None
    assert stats == Counter(identical_after_truncation=1)
    assert encode_pair(tok, prompt, *late, max_length=10_000) is not None


def test_tokenize_objective_caches_and_filters(plain_tokenizer, tmp_path, monkeypatch):
    tok = plain_tokenizer
    pairs = [_pair(f"Tell story {i}.", f"Once there was a cat {i}.", f"No {i}.") for i in range(5)]
    pairs += [_pair("p", "", "x"), _pair("q", "Once", "Once")]
    stats = Counter()

    dataset = tokenize_objective(tok, pairs, 64, stats, cache_dir=tmp_path)

    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 5
    assert set(dataset.column_names) == set(data._COLUMNS)
    assert stats == Counter(empty_response=1, identical_responses=1)
    for row, pair in zip(dataset, pairs, strict=False):
        assert row == encode_pair(tok, **pair, max_length=64)

    # The second call must not tokenise: it loads the Arrow file named by the fingerprint.
    def fail(*args, **kwargs):
        raise AssertionError("tokenised again instead of loading the cache")

    monkeypatch.setattr(data, "_encode", fail)
    again_stats = Counter()
    again = tokenize_objective(tok, list(pairs), 64, again_stats, cache_dir=tmp_path)
    assert again._fingerprint == dataset._fingerprint
    assert again.to_list() == dataset.to_list() and again_stats == stats
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_objective(tok, pairs, 65, cache_dir=tmp_path)

    monkeypatch.undo()
    shards = tokenize_objective(tok, pairs, 64, cache_dir=tmp_path / "shards", num_proc=2)
    assert shards.to_list() == dataset.to_list()
    empty = tokenize_objective(tok, [], 64, cache_dir=tmp_path)
    assert len(empty) == 0 and set(empty.column_names) == set(data._COLUMNS)


# ---------------------------------------------------------------------------------------------
# Batching


def test_collator_pads_right_chosen_rows_first(plain_tokenizer):
    tok = plain_tokenizer
    pairs = [("Tell a story.", "Once upon a time.", "No."), ("Hi", "Hello there, friend.", "Go")]
    pairs.append(("Why is the sky blue?", "Light scatters.", "Because it is."))
    features = [encode_pair(tok, *pair) for pair in pairs]
    collate = PairCollator.for_tokenizer(tok)

    batch = collate(features)

    rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
    labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
    width = max(len(r) for r in rows)
    assert tok.pad_token_id is None and collate.pad_token_id == tok.eos_token_id
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].shape == (6, width) and batch[key].dtype == torch.long
    for b, (ids, y) in enumerate(zip(rows, labels, strict=True)):
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids
        assert batch["labels"][b, :n].tolist() == y
        assert (batch["input_ids"][b, n:] == tok.eos_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)

    columns = {key: [f[key] for f in features] for key in features[0]}
    for key, value in PairCollator(tok.eos_token_id)(columns).items():
        assert torch.equal(value, batch[key])
    assert PairCollator(0, pad_to_multiple_of=16)(features)["input_ids"].shape[1] % 16 == 0
    broken = dict(features[0], chosen_labels=features[0]["chosen_labels"][:-1])
    with pytest.raises(ValueError, match="equal length"):
        collate([broken])


# ---------------------------------------------------------------------------------------------
# The multi-objective sampler

SIZES = {"big": 203, "small": 37, "tiny": 5}


def _stream(windows, name):
    return [i for window in windows for micro in window[name] for i in micro]


def test_sampler_epoch_oversampling_and_full_windows():
    sampler = MultiObjectiveSampler(SIZES, micro_batch=3, grad_accum=4, seed=7)
    windows = list(sampler)
    epoch_1 = sampler.window(1, 0)

    assert len(sampler) == len(windows) == -(-203 // 12) == 17
    for window in windows:
        assert set(window) == set(SIZES)
        for name, micro_batches in window.items():
            assert [len(m) for m in micro_batches] == [3, 3, 3, 3]
            assert all(0 <= i < SIZES[name] for m in micro_batches for i in m)

    # Each objective reads whole passes, each a permutation, reshuffled from pass to pass.
    for name, size in SIZES.items():
        stream = _stream(windows, name)
        passes = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert all(sorted(p) == list(range(size)) for p in passes if len(p) == size)
        if len(stream) >= 2 * size:
            assert len({tuple(p) for p in passes if len(p) == size}) > 1
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["step"] == 0
    next_epoch = list(sampler)
    assert next_epoch[0] == epoch_1 and _stream(next_epoch, "big") != _stream(windows, "big")


def test_sampler_is_deterministic():
    first = list(MultiObjectiveSampler(SIZES, 3, 4, seed=7))
    reordered = dict(reversed(SIZES.items()))

    assert list(MultiObjectiveSampler(SIZES, 3, 4, seed=7)) == first
    assert list(MultiObjectiveSampler(reordered, 3, 4, seed=7)) == first
    assert list(MultiObjectiveSampler(SIZES, 3, 4, seed=8)) != first


def test_sampler_resumes_from_state_dict():
    reference = MultiObjectiveSampler(SIZES, 3, 4, seed=7)
    uninterrupted = list(reference) + list(reference)

    sampler = MultiObjectiveSampler(SIZES, 3, 4, seed=7)
    seen = []
    for window in sampler:
        seen.append(window)
        if len(seen) == 5:
            break
    state = json.loads(json.dumps(sampler.state_dict()))

    resumed = MultiObjectiveSampler(SIZES, 3, 4, seed=7)
    resumed.load_state_dict(state)
    assert seen + list(resumed) + list(resumed) == uninterrupted

    with pytest.raises(ValueError, match="sizes"):
        MultiObjectiveSampler({**SIZES, "tiny": 6}, 3, 4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="no pairs"):
        MultiObjectiveSampler({"empty": 0})
