"""Evaluation: held-out data, generation cache, judges, verdict cache, the whole `mofast eval`.

The judge endpoint of these tests is a real HTTP server on loopback that speaks the
chat-completions protocol and answers from the shipped stories260K model: either through
the constrained local judge (model name "constrained": always 1, 2 or 0) or by greedy
generation of whatever text the model produces (model name "greedy": mostly invalid).
"""

import argparse
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mofast import evaluation, judges
from mofast.assets import DEFAULT_EVAL, STORIES260K, shipped_models
from mofast.cli import main as cli_main

API_KEY = "test-key-7f3a"


# ---------------------------------------------------------------------------------------
# A chat-completions server on loopback, answering from stories260K
# ---------------------------------------------------------------------------------------


class _Model:
    """stories260K loaded once, as the constrained judge and as a greedy generator."""

    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.judge = judges.LocalJudge(STORIES260K, device="cpu", batch_size=1)
        self.judge.load()
        self.tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
        self.lm = AutoModelForCausalLM.from_pretrained(STORIES260K).eval()
        self.lock = threading.Lock()

    def constrained(self, messages) -> str:
        with self.lock:
            (scores,), _ = self.judge.score([messages])
        return judges.VERDICTS[max(range(3), key=lambda j: scores[j])]

    def greedy(self, messages, max_tokens: int) -> str:
        text = "\n\n".join(m["content"] for m in messages)
        ids = self.tokenizer(text, return_tensors="pt").input_ids[:, -400:]
        with self.lock, torch.inference_mode():
            out = self.lm.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class ChatServer:
    """ThreadingHTTPServer on 127.0.0.1:<ephemeral>, counting every request it receives.

    `fail` maps a request fingerprint to a list of HTTP statuses to answer before the
    real reply (to exercise retries); `delay_s` slows every reply down.
    """

    def __init__(self, model: _Model, delay_s: float = 0.0) -> None:
        self.model = model
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.replies: dict[str, str] = {}
        self.fail: dict[str, list[int]] = {}
        self.fail_all_with: int | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no such route"}})
                fp = fingerprint(body["messages"])
                with server.lock:
                    server.requests.append({"fp": fp, **body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    statuses = server.fail.get(fp)
                    status = statuses.pop(0) if statuses else server.fail_all_with
                    if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                        status = 401
                # The count drops before the reply goes out: a client may send its next
                # request the moment it has read this one.
                try:
                    if status is not None:
                        reply = (status, {"error": {"message": "injected"}})
                    else:
                        time.sleep(server.delay_s)
                        reply = (200, server.answer(fp, body))
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self._send(*reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, fp: str, body: dict) -> dict:
        if body["model"] == "constrained":
            text = self.model.constrained(body["messages"])
        else:
            text = self.model.greedy(body["messages"], body["max_tokens"])
        with self.lock:
            self.replies[fp] = text
        message = {"role": "assistant", "content": text}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def fingerprint(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def stories():
    return _Model()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder like the trainer's: perturbed stories260K in final/, config naming none."""
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("runs") / "toy-run"
    model = AutoModelForCausalLM.from_pretrained(STORIES260K)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(run / "final")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES260K / name, run / "final" / name)
    # The trainer's resolved config: `model: null` is the shipped stories260K.
    (run / "config.yaml").write_text("model: null\nseed: 0\ncombinator: mgda-decoupled\n")
    return run


def eval_args(out: Path, run: Path, base_url: str, judge_model: str, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        str(run),
        "--output-dir",
        str(out),
        "--limit",
        "6",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "4",
        "--judge",
        "openai",
        "--judge-base-url",
        base_url,
        "--judge-model",
        judge_model,
        "--judge-api-key-env",
        "MOFAST_TEST_JUDGE_KEY",
        "--judge-backoff",
        "0.01",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# Small parts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("1", 1),
        ("2", 2),
        ("0", 0),
        (" 2\n", 2),
        ('"1"', 1),
        ("0.", 0),
        ("[2]", 2),
        ("", None),
        (None, None),
        ("3", None),
        ("12", None),
        ("1 because it is longer", None),
        ("Response 1", None),
        ("tie", None),
        ("Once upon a time", None),
    ],
)
def test_parse_verdict_never_invents_a_tie(reply, expected):
    assert judges.parse_verdict(reply) == expected


def test_default_prompts_carry_the_spec_definitions(tmp_path):
    prompts = judges.load_prompts()
    assert set(judges.QUESTIONS) <= set(prompts.criteria)
    definitions = {
        "instruction_following": "follows the query's instructions carefully",
        "honesty": "tells no lies and does not deceive",
        "helpfulness": "gives useful suggestions and resources",
        "truthfulness": "reveals the full truth of the matter",
    }
    for question, text in definitions.items():
        assert text in prompts.criteria[question], question
    messages = prompts.messages("honesty", "Q{x}?", "A {first}", "B")
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    # The texts are inserted verbatim: braces in a response are not format fields.
    assert "Q{x}?" in messages[1]["content"] and "A {first}" in messages[1]["content"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("system: s\ntemplate: '{prompt} {first}'\nquestions: {}\n")
    with pytest.raises(ValueError, match="template must use exactly the fields"):
        judges.load_prompts(bad)
    bad.write_text(
        "system: s\ntemplate: '{prompt}{first}{second}{criterion}'\nquestions:\n"
        "  overall: {criterion: x}\n"
    )
    with pytest.raises(ValueError, match="no criterion for question"):
        judges.load_prompts(bad)


def test_comparison_key_covers_every_part():
    prompts = judges.load_prompts()
    base = ("judge-a", "overall", "model_first", "prompt", "first", "second")
    key = judges.make_comparison(prompts, *base).key
    assert judges.make_comparison(prompts, *base).key == key
    for i, changed in enumerate(["judge-b", "honesty", "golden_first", "p2", "f2", "s2"]):
        parts = list(base)
        parts[i] = changed
        assert judges.make_comparison(prompts, *parts).key != key, i
    swapped = judges.make_comparison(
        prompts, "judge-a", "overall", "model_first", "prompt", "second", "first"
    )
    assert swapped.key != key


def test_verdict_cache_skips_a_torn_line_and_keeps_appending(tmp_path):
    path = tmp_path / "v.jsonl"
    with judges.VerdictCache(path) as cache:
        cache.add({"key": "a", "verdict": 1})
        cache.add({"key": "b", "verdict": None})
        cache.add({"key": "a", "verdict": 2})
    with open(path, "a") as f:
        f.write('{"key": "c", "verd')

    cache = judges.VerdictCache(path)
    assert cache.torn_lines == 1 and len(cache) == 2
    assert cache.get("a")["verdict"] == 1 and cache.get("b")["verdict"] is None
    cache.add({"key": "d", "verdict": 0})
    cache.close()

    again = judges.VerdictCache(path)
    assert sorted(again._records) == ["a", "b", "d"] and again.torn_lines == 1
    again.close()


class _ListJudge:
    """Answers "1" to every comparison except those whose prompt says FAIL (a failed request)."""

    identity = "list-judge"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def judge(self, comparisons, on_verdict):
        failed = []
        for comparison in comparisons:
            self.asked.append(comparison.key)
            if "FAIL" in comparison.messages[1]["content"]:
                failed.append((comparison.key, "injected"))
            else:
                on_verdict(comparison, "1", {})
        return failed


def test_judging_summary_tells_cached_from_duplicates_asked_and_failed(tmp_path):
    prompts = judges.load_prompts()

    def comparison(prompt, response):
        return judges.make_comparison(
            prompts, "list-judge", "overall", "model_first", prompt, response, "golden"
        )

    earlier = [comparison(f"earlier {i}", "r") for i in range(3)]
    fresh = [comparison(f"fresh {i}", "r") for i in range(4)]
    failing = [comparison(f"FAIL {i}", "r") for i in range(2)]
    cache = judges.VerdictCache(tmp_path / "v.jsonl")
    judges.judge_comparisons(_ListJudge(), earlier, cache)

    # Two models that wrote the same responses: every comparison comes twice.
    plan = [*earlier, *fresh, *failing] * 2
    judge = _ListJudge()
    summary = judges.judge_comparisons(judge, plan, cache)
    cache.close()
    assert summary.total == 18
    assert (summary.cached, summary.duplicates, summary.asked) == (6, 6, 6)
    assert (summary.answered, len(summary.failed), summary.missing) == (4, 2, 4)
    assert sorted(judge.asked) == sorted(c.key for c in [*fresh, *failing])


def test_order_is_seeded_recorded_and_mapped_to_outcomes():
    orders = [evaluation.order_for(0, f"p{i}", "overall") for i in range(64)]
    assert orders == [evaluation.order_for(0, f"p{i}", "overall") for i in range(64)]
    assert 16 < orders.count("model_first") < 48
    assert orders != [evaluation.order_for(1, f"p{i}", "overall") for i in range(64)]

    table = {
        ("model_first", 1): "win",
        ("model_first", 2): "loss",
        ("golden_first", 1): "loss",
        ("golden_first", 2): "win",
        ("model_first", 0): "tie",
        ("golden_first", 0): "tie",
        ("model_first", None): "invalid",
        ("golden_first", None): "invalid",
    }
    for (order, verdict), outcome in table.items():
        assert evaluation.outcome_of(order, verdict) == outcome


def test_local_judge_scores_padded_rows_like_each_row_alone():
    from transformers import AutoModelForCausalLM

    judge = judges.LocalJudge(STORIES260K, device="cpu", batch_size=3)
    # Short prompts of very different lengths: the padding is what is under test.
    criteria = {q: f"judge {q}" for q in judges.QUESTIONS}
    prompts = judges.JudgePrompts(
        "Be fair.", "{criterion}\n{prompt}\n1: {first}\n2: {second}", criteria
    )
    batch = [
        prompts.messages("overall", "Tell a story about a cat.", "The cat sat.", "A dog ran."),
        prompts.messages("honesty", "Why?", "Because the sky is big and blue today.", "No."),
        prompts.messages("helpfulness", "Hi", "Hello there, little friend.", "Hey"),
    ]
    model = AutoModelForCausalLM.from_pretrained(STORIES260K).eval()

    def check():
        table, truncated = judge.score(batch)
        assert truncated == [False, False, False]
        for messages, scores in zip(batch, table, strict=True):
            prompt_ids = judge.render(messages)
            for answer, got in zip(judge.answer_ids, scores, strict=True):
                ids = torch.tensor([prompt_ids + answer])
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
                start = len(prompt_ids) - 1
                want = sum(logprobs[start + j, t].item() for j, t in enumerate(answer))
                assert abs(got - want) < 1e-4, (got, want)

    # stories260K encodes "1", "2", "0" as a shared space marker and one digit: one row
    # per prompt. Answers of different lengths take the path of one row per answer.
    judge.load()
    assert judge.shared_prefix is not None and len(judge.shared_prefix[0]) == 1
    check()
    judge.answer_ids = [judge.answer_ids[0] + judge.answer_ids[1], [475], judge.answer_ids[2]]
    judge.shared_prefix = None
    check()


def test_local_judge_cuts_long_prompts_from_the_left():
    judge = judges.LocalJudge(STORIES260K, device="cpu", max_length=64)
    prompts = judges.load_prompts()
    long = prompts.messages("overall", "word " * 300, "yes " * 50, "no " * 50)
    table, truncated = judge.score([long])
    assert truncated == [True] and all(v == v for v in table[0])


def test_heldout_default_is_the_embedded_eval_file_with_chosen_as_golden():
    prompts, note = evaluation.load_heldout(limit=7)
    with gzip.open(DEFAULT_EVAL, "rt") as f:
        rows = [json.loads(line) for line in f][:7]
    assert [p.prompt for p in prompts] == [r["prompt"] for r in rows]
    assert [p.golden for p in prompts] == [r["chosen"] for r in rows]
    assert "chosen" in note["golden"] and note["prompts"] == 7
    assert len({p.id for p in prompts}) == 7


def test_heldout_default_follows_a_run_trained_on_ultrafeedback(tmp_path, monkeypatch):
    # The embedded eval file was the default for every run: a run trained on hub UltraFeedback
    # was judged on prompts unrelated to its split (some of them possibly trained on).
    pairs = {"data_mode": "pairs", "objectives": None, "dataset": None}
    aspects = {"data_mode": "ultrafeedback", "dataset": "openbmb/UltraFeedback"}
    assert evaluation.default_heldout([]) == str(DEFAULT_EVAL)
    assert evaluation.default_heldout([pairs]) == str(DEFAULT_EVAL)
    assert evaluation.default_heldout([pairs, aspects]) == "openbmb/UltraFeedback"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "uf.jsonl").write_text("")
    assert evaluation.default_heldout([{"data_mode": "cdpo", "dataset": "uf.jsonl"}]) == "uf.jsonl"

    # A run's relative data file seen from another folder was "preference file not found:
    # uf.jsonl", a file the eval command never named.
    monkeypatch.chdir(tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="test side of uf.jsonl, which a run trained on"):
        evaluation.default_heldout([{"data_mode": "cdpo", "dataset": "uf.jsonl"}])


def test_the_default_heldout_split_is_the_one_of_the_run_that_trained_on_it(tmp_path, monkeypatch):
    # With a pairs-mode run listed first, the held-out set was the ultrafeedback run's
    # dataset but its test side was cut with the pairs run's split settings: prompts the
    # ultrafeedback run trained on were judged as held out.
    pairs = {"data_mode": "pairs", "dataset": None, "split_seed": 0, "test_fraction": 0.1}
    cdpo = {"data_mode": "cdpo", "dataset": "uf.jsonl", "split_seed": 5, "test_fraction": 0.2}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "uf.jsonl").write_text("")
    source = evaluation.default_heldout([pairs, cdpo])
    assert source == "uf.jsonl"
    assert evaluation.heldout_split([pairs, cdpo], source, None) == (5, 0.2, "cdpo")
    assert evaluation.heldout_split([pairs, cdpo], source, 7) == (7, 0.2, "cdpo")
    # Another file given with --heldout: no run trained on it, every run's settings count.
    assert evaluation.heldout_split([pairs, cdpo], "other.jsonl", None) == (0, 0.1, "cdpo")


def test_heldout_generic_and_ultrafeedback_records(tmp_path):
    generic = tmp_path / "g.jsonl"
    generic.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "a?", "golden": "A."},
                {
                    "prompt": "b?",
                    "golden": [
                        {"role": "user", "content": "b?"},
                        {"role": "assistant", "content": "B."},
                    ],
                },
                {"prompt": "c?", "golden": "  "},
                {"prompt": "a?", "golden": "repeated prompt, dropped"},
            ]
        )
        + "\n"
    )
    prompts, note = evaluation.load_heldout(generic)
    assert [(p.prompt, p.golden) for p in prompts] == [("a?", "A."), ("b?", "B.")]
    assert note["skipped_without_prompt_or_golden"] == 1

    data = pytest.importorskip("mofast.data")

    def completion(text, ratings):
        aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
        return {
            "response": text,
            "annotations": {a: {"Rating": r} for a, r in zip(aspects, ratings, strict=True)},
        }

    records = [
        {
            "instruction": f"question {i}?",
            "completions": [
                completion(f"weak {i}", ["2", "3", "N/A", "2"]),
                completion(f"best {i}", ["5", "5", "4", "5"]),
                completion(f"mid {i}", ["3", "4", "4", "3"]),
            ],
        }
        for i in range(40)
    ]
    uf = tmp_path / "uf.jsonl"
    uf.write_text("".join(json.dumps(r) + "\n" for r in records))
    everything, note = evaluation.load_heldout(uf, part="all")
    assert len(everything) == 40 and note["schemas"] == ["ultrafeedback"]
    assert all(
        p.golden == data.golden_response(r) for p, r in zip(everything, records, strict=True)
    )
    assert all(p.golden.startswith("best") for p in everything)

    held_out, note = evaluation.load_heldout(uf, part="test", split_seed=3)
    objectives = data.ultrafeedback_objectives(records)
    _, test = data.split_objectives(objectives, seed=3)
    want = {pair["prompt"] for pairs in test.values() for pair in pairs}
    assert {p.prompt for p in held_out} == want and 0 < len(held_out) < 40

    # The trainer splits with its config's split_seed and test_fraction, not its `seed`
    # (which seeds sampling): reading `seed` evaluated a --seed 5 run on training prompts.
    config = {"seed": 5, "split_seed": 3, "test_fraction": 0.5}
    assert evaluation.trainer_split([config], None) == (3, 0.5)
    assert evaluation.trainer_split([config], 7) == (7, 0.5)
    assert evaluation.trainer_split([], None) == (0, None)
    half, _ = evaluation.load_heldout(uf, part="test", split_seed=3, test_fraction=0.5)
    _, test = data.split_objectives(objectives, 0.5, seed=3)
    want = {pair["prompt"] for pairs in test.values() for pair in pairs}
    assert {p.prompt for p in half} == want and len(half) > len(held_out)


def test_run_folder_resolution(tmp_path):
    top = tmp_path / "top"
    top.mkdir()
    (top / "config.json").write_text("{}")
    (top / "config.yaml").write_text("model: /some/base\nseed: 1\n")
    assert evaluation.resolve_model(str(top)) == (str(top), str(top))
    assert evaluation.starting_model(top) == "/some/base"

    nested = tmp_path / "nested"
    (nested / "final").mkdir(parents=True)
    (nested / "final" / "config.json").write_text("{}")
    (nested / "config.yaml").write_text("model: null\n")
    assert evaluation.resolve_model(str(nested)) == (str(nested / "final"), str(nested))
    assert evaluation.resolve_model(str(nested / "final")) == (str(nested / "final"), str(nested))
    assert evaluation.starting_model(nested) == str(STORIES260K)

    trainer_layout = tmp_path / "trainer"
    (trainer_layout / "model").mkdir(parents=True)
    (trainer_layout / "model" / "config.json").write_text("{}")
    (trainer_layout / "config.yaml").write_text("model: base/relative\n")
    (trainer_layout / "base" / "relative").mkdir(parents=True)
    assert evaluation.resolve_model(str(trainer_layout))[0] == str(trainer_layout / "model")
    assert evaluation.starting_model(trainer_layout) == str(trainer_layout / "base" / "relative")

    plan = evaluation.plan_models([str(nested)])
    assert [m.label for m in plan] == ["REFERENCE", "nested"]
    assert plan[0].path == str(STORIES260K)

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot tell the starting model"):
        evaluation.plan_models([str(bare)])
    assert [m.label for m in evaluation.plan_models([str(bare)], no_reference=True)] == ["bare"]
    labelled = evaluation.plan_models([str(bare), str(top)], ["REFERENCE", "mine"])
    assert [m.label for m in labelled] == ["REFERENCE", "mine"]
    with pytest.raises(ValueError, match="holds no model"):
        evaluation.resolve_model(str(tmp_path))

    # A run started from a .gguf file: REFERENCE cannot be loaded from it, and the error
    # says which model that is and how to go on.
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")
    from_gguf = tmp_path / "from-gguf"
    (from_gguf / "model").mkdir(parents=True)
    (from_gguf / "model" / "config.json").write_text("{}")
    (from_gguf / "config.yaml").write_text(f"model: {gguf}\n")
    with pytest.raises(ValueError, match="REFERENCE.*is a file.*--reference.*--no-reference"):
        evaluation.plan_models([str(from_gguf)])
    assert len(evaluation.plan_models([str(from_gguf)], no_reference=True)) == 1


def test_eval_help_names_the_folder_the_trainer_writes(tmp_path):
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    action = next(a for a in parser._actions if "--model" in a.option_strings)
    assert "model/" in action.help and "final/" not in action.help

    # The folder the help names is the one a run folder is read from, ahead of final/.
    run = tmp_path / "run"
    for sub in ("final", "model"):
        (run / sub).mkdir(parents=True)
        (run / sub / "config.json").write_text("{}")
    assert evaluation.resolve_model(str(run)) == (str(run / "model"), str(run))


def test_models_are_checked_before_generating_and_shipped_ones_found_by_name(
    tmp_path, monkeypatch, caplog
):
    import huggingface_hub.constants

    # Run from a folder that is not the repository, as after `pip install .`.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    caplog.set_level(logging.ERROR, logger="mofast.evaluation")
    out = tmp_path / "eval"
    local = ["--output-dir", str(out), "--limit", "1", "--max-new-tokens", "4"]
    local += ["--questions", "overall", "--judge", "local"]
    model = ["--model", "stories260K", "--reference", "stories260K"]

    assert cli_main(["eval", *model, *local, "--judge-model", "mofast/assets/stories260K"]) == 2
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("--judge-model mofast/assets/stories260K: no such file or folder")
    assert "stories260K" in message.split("shipped model")[1] and "\n" not in message
    assert not (out / "generations").exists()

    caplog.clear()
    argv = ["eval", "--model", "nobody/no-such-model", *local, "--judge-model", "stories260K"]
    assert cli_main(argv) == 2
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("--model nobody/no-such-model: not a local folder or a shipped")
    assert not (out / "generations").exists()

    assert evaluation.resolve_model("stories260K") == (str(STORIES260K), None)
    assert shipped_models() == {"stories260K": STORIES260K}

    # The README's command with the shipped judge by name works from anywhere.
    argv = ["eval", *model, "--model-name", "same", *local, "--judge-model", "stories260K"]
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="mofast.evaluation")
    assert cli_main([*argv, "--judge-device", "cpu", "--device", "cpu"]) == 0
    meta = json.loads((out / "eval.json").read_text())
    assert meta["judge"] == f"local:{STORIES260K}"
    assert [m["path"] for m in meta["models"]] == [str(STORIES260K)] * 2
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 2 and all(r["outcome"] in ("win", "tie", "loss") for r in rows)

    # stories260K's 512-token context cannot hold a comparison: the log says so.
    assert all(r["truncated"] for r in read_jsonl(out / "verdicts.jsonl"))
    warned = [r.getMessage() for r in caplog.records if "judge's context" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("judge: 2 of 2 comparisons had a prompt")


def test_a_local_folder_that_shadows_a_shipped_model_says_so(tmp_path, monkeypatch):
    # A folder named like a shipped model (a run's output, say) is read first; holding no
    # model, the error must point at the shipped one the user likely meant.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stories260K").mkdir()
    with pytest.raises(ValueError, match="holds no model") as err:
        evaluation.resolve_model("stories260K")
    hint = f"shadows the shipped model stories260K; give its path: {STORIES260K}"
    assert hint in str(err.value)

    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    args = parser.parse_args(
        ["--model", "m", "--output-dir", "out", "--judge", "local", "--judge-model", "stories260K"]
    )
    with pytest.raises(ValueError, match="holds no config.json") as err:
        evaluation.build_judge(args)
    assert f"give its path: {STORIES260K}" in str(err.value)

    # A folder of another name gets no such hint.
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="holds no model") as err:
        evaluation.resolve_model("other")
    assert "shadows" not in str(err.value)


def test_generation_cache_resumes_and_notices_new_settings(tmp_path):
    prompts, _ = evaluation.load_heldout(limit=5)
    entry = evaluation.ModelEntry("m", str(STORIES260K))
    settings = evaluation.GenerationSettings(max_new_tokens=4, batch_size=2, device="cpu")

    made = []
    first = evaluation.generate_responses(entry, prompts[:3], settings, tmp_path, made.append)
    assert sum(made) == 3 and all(r["new_tokens"] <= 4 for r in first.values())

    made.clear()
    second = evaluation.generate_responses(entry, prompts, settings, tmp_path, made.append)
    assert sum(made) == 2
    assert all(second[p.id]["response"] == first[p.id]["response"] for p in prompts[:3])

    made.clear()
    hotter = evaluation.GenerationSettings(
        max_new_tokens=4, batch_size=2, device="cpu", temperature=1.0
    )
    evaluation.generate_responses(entry, prompts, hotter, tmp_path, made.append)
    assert sum(made) == 5


# ---------------------------------------------------------------------------------------
# The OpenAI-compatible judge against the loopback server
# ---------------------------------------------------------------------------------------


def test_openai_judge_retries_caps_tokens_and_sends_the_key(stories):
    prompts = judges.load_prompts()
    comparisons = [
        judges.make_comparison(prompts, "j", q, "model_first", f"prompt {i}", "yes", "no")
        for i in range(3)
        for q in ("overall", "honesty")
    ]
    with ChatServer(stories) as server:
        server.fail[fingerprint(comparisons[0].messages)] = [429, 503, 500]
        server.fail[fingerprint(comparisons[1].messages)] = [502]
        judge = judges.OpenAIJudge(
            server.base_url, "constrained", API_KEY, max_in_flight=4, backoff_s=0.001
        )
        got = {}
        failed = judge.judge(comparisons, lambda c, reply, extra: got.update({c.key: extra}))

    assert failed == [] and len(got) == 6
    assert got[comparisons[0].key]["attempts"] == 4 and got[comparisons[1].key]["attempts"] == 2
    assert len(server.requests) == 6 + 3 + 1
    assert all(r["max_tokens"] == judges.MAX_COMPLETION_TOKENS for r in server.requests)
    assert server.max_in_flight <= 4
    with pytest.raises(ValueError, match="max_tokens must be in 1..10"):
        judges.OpenAIJudge(server.base_url, "constrained", max_tokens=11)


def test_openai_judge_gives_up_and_stops_on_a_refusal(stories):
    prompts = judges.load_prompts()
    comparisons = [
        judges.make_comparison(prompts, "j", "overall", "model_first", f"p{i}", "a", "b")
        for i in range(12)
    ]
    with ChatServer(stories) as server:
        server.fail_all_with = 503
        judge = judges.OpenAIJudge(
            server.base_url,
            "constrained",
            API_KEY,
            max_in_flight=3,
            max_retries=2,
            backoff_s=0.001,
        )
        failed = judge.judge(comparisons[:2], lambda *a: pytest.fail("no verdict expected"))
        assert len(failed) == 2 and "after 3 attempts" in failed[0][1]
        assert len(server.requests) == 6

        server.requests.clear()
        wrong_key = judges.OpenAIJudge(server.base_url, "constrained", "nope", max_in_flight=3)
        with pytest.raises(judges.JudgeFatalError, match="HTTP 401"):
            wrong_key.judge(comparisons, lambda *a: None)
    # A refused request stops the pass: only the requests already in flight were sent.
    assert 1 <= len(server.requests) <= 3


# ---------------------------------------------------------------------------------------
# The whole path
# ---------------------------------------------------------------------------------------


def test_eval_and_report_end_to_end_over_http(stories, trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MOFAST_TEST_JUDGE_KEY", API_KEY)
    out = tmp_path / "eval"
    with ChatServer(stories) as server:
        assert cli_main(eval_args(out, trained_run, server.base_url, "constrained")) == 0
        asked = len(server.requests)
        # A rerun finds everything in the caches: no request, no generation.
        assert cli_main(eval_args(out, trained_run, server.base_url, "constrained")) == 0
        assert len(server.requests) == asked

    meta = json.loads((out / "eval.json").read_text())
    assert [m["label"] for m in meta["models"]] == ["REFERENCE", "toy-run"]
    assert meta["models"][0]["path"] == str(STORIES260K)
    assert meta["judge"].startswith("openai:constrained@")

    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 2 * 6 * 5
    assert {r["outcome"] for r in rows} <= {"win", "tie", "loss"}
    unique = {r["key"] for r in rows}
    assert asked == len(unique)
    for row in rows:
        assert row["order"] == evaluation.order_for(0, row["prompt_id"], row["question"])
        assert row["outcome"] == evaluation.outcome_of(row["order"], row["verdict"])
    assert {r["order"] for r in rows} == {"model_first", "golden_first"}
    for label in ("REFERENCE", "toy-run"):
        generated = read_jsonl(next((out / "generations").glob(f"{label}-*.jsonl")))
        assert len(generated) == 6 and all(g["new_tokens"] <= 16 for g in generated)

    assert cli_main(["report", str(out), "--resamples", "2000"]) == 0
    text = (out / "report.md").read_text()
    assert "| REFERENCE |" in text and "| toy-run |" in text
    assert (out / "net_win_rate.png").stat().st_size > 1000
    numbers = json.loads((out / "report.json").read_text())
    overall = next(n for n in numbers if n["model"] == "toy-run" and n["question"] == "overall")
    mine = [r["outcome"] for r in rows if r["model"] == "toy-run" and r["question"] == "overall"]
    assert overall["win"] == mine.count("win") and overall["loss"] == mine.count("loss")


def _identical_models_args(out: Path, base_url: str) -> list[str]:
    """REFERENCE and a model that is the same stories260K: their responses are identical."""
    argv = eval_args(out, STORIES260K, base_url, "constrained", "--limit", "2")
    return [
        *argv,
        "--reference",
        str(STORIES260K),
        "--questions",
        "overall,honesty",
        "--judge-max-retries",
        "0",
    ]


def test_eval_summary_counts_cached_duplicate_asked_and_failed_honestly(
    stories, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("MOFAST_TEST_JUDGE_KEY", API_KEY)
    caplog.set_level(logging.INFO, logger="mofast.evaluation")
    out = tmp_path / "eval"
    argv = _identical_models_args(out, "")

    def summary_line() -> str:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("judge:")]
        caplog.clear()
        return lines[-1]

    with ChatServer(stories) as server:
        argv[argv.index("--judge-base-url") + 1] = server.base_url
        server.fail_all_with = 503
        assert cli_main(argv) == 1
        # A fresh folder has no cache: the 4 shared comparisons are asked once and fail.
        assert summary_line() == (
            "judge: 8 comparisons: 0 with a verdict cached by an earlier run, 4 identical to "
            "another comparison of this run (asked once), 4 asked: 0 answered (0 invalid "
            "replies), 4 failed"
        )
        assert len(server.requests) == 4
        rows = read_jsonl(out / "results.jsonl")
        assert len(rows) == 8 and {r["outcome"] for r in rows} == {"missing"}
        # The report counts them as missing, not invalid, and exits 1 as eval did.
        assert cli_main(["report", str(out), "--resamples", "100"]) == 1
        numbers = json.loads((out / "report.json").read_text())
        assert {(n["invalid"], n["missing"]) for n in numbers} == {(0, 2)}
        assert "**8 of 8 verdicts missing**" in (out / "report.md").read_text()

        server.fail_all_with = None
        assert cli_main(argv) == 0
        assert summary_line().startswith(
            "judge: 8 comparisons: 0 with a verdict cached by an earlier run, 4 identical to "
            "another comparison of this run (asked once), 4 asked: 4 answered"
        )
        assert cli_main(argv) == 0
        assert summary_line().startswith(
            "judge: 8 comparisons: 8 with a verdict cached by an earlier run, 0 identical to "
            "another comparison of this run (asked once), 0 asked: 0 answered"
        )
    assert len(server.requests) == 8


def test_invalid_replies_are_recorded_and_counted_not_tied(
    stories, trained_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("MOFAST_TEST_JUDGE_KEY", API_KEY)
    out = tmp_path / "eval"
    extra = ("--limit", "3", "--questions", "overall,honesty")
    with ChatServer(stories) as server:
        assert cli_main(eval_args(out, trained_run, server.base_url, "greedy", *extra)) == 0
        replies = dict(server.replies)
        asked = len(server.requests)
        assert cli_main(eval_args(out, trained_run, server.base_url, "greedy", *extra)) == 0
        assert len(server.requests) == asked

    strict = re.compile(r"""\s*["'`(\[]?\s*[012]\s*["'`)\]]?\s*\.?\s*""")
    cached = {r["key"]: r for r in read_jsonl(out / "verdicts.jsonl")}
    invalid = [r for r in cached.values() if not r["valid"]]
    assert invalid, "stories260K's greedy text should not look like a verdict"
    assert len(invalid) == sum(not strict.fullmatch(text) for text in replies.values())
    assert all(r["verdict"] is None and r["reply"] for r in invalid)

    rows = read_jsonl(out / "results.jsonl")
    for row in rows:
        expected = "invalid" if not cached[row["key"]]["valid"] else row["outcome"]
        assert row["outcome"] == expected
    n_invalid = sum(r["outcome"] == "invalid" for r in rows)
    assert n_invalid >= len(invalid)

    assert cli_main(["report", str(out), "--resamples", "500"]) == 0
    numbers = json.loads((out / "report.json").read_text())
    assert sum(n["invalid"] for n in numbers) == n_invalid
    assert sum(n["tie"] for n in numbers) == sum(r["outcome"] == "tie" for r in rows)


def test_killed_evaluation_resumes_without_asking_twice(
    stories, trained_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("MOFAST_TEST_JUDGE_KEY", API_KEY)
    out = tmp_path / "eval"
    verdicts = out / "verdicts.jsonl"
    with ChatServer(stories, delay_s=0.15) as server:
        argv = eval_args(
            out,
            trained_run,
            server.base_url,
            "constrained",
            "--judge-concurrency",
            "3",
            "--limit",
            "4",
            "--questions",
            "overall,honesty,helpfulness",
        )
        env = dict(os.environ, MOFAST_TEST_JUDGE_KEY=API_KEY)
        # The child runs outside the repository so its `kernels/` folder shadows nothing.
        child = subprocess.Popen(
            [sys.executable, "-m", "mofast", "--log-level", "WARNING", *argv],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if verdicts.exists() and len(verdicts.read_text().splitlines()) >= 6:
                break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()

        before = judges.VerdictCache(verdicts)
        kept = set(before._records)
        before.close()
        sent_before = [r["fp"] for r in server.requests]
        assert 6 <= len(kept) < 24 and len(sent_before) < 24

        assert cli_main(argv) == 0

    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 24 and all(r["outcome"] in ("win", "tie", "loss") for r in rows)
    final = read_jsonl(verdicts)
    keys = [r["key"] for r in final if "key" in r]
    assert len(keys) == len(set(keys)) == len({r["key"] for r in rows})
    assert kept <= set(keys)

    sent = [r["fp"] for r in server.requests]
    sent_after = sent[len(sent_before) :]
    assert len(sent_after) == len(set(sent_after))
    assert len(set(sent)) == len(set(keys))
    # Only the requests in flight at the kill (sent, verdict not yet cached; at most
    # --judge-concurrency of them) may be asked again.
    in_flight_at_kill = len(set(sent_before)) - len(kept)
    assert 0 <= in_flight_at_kill <= 3
    assert len(set(sent_after) & set(sent_before)) <= in_flight_at_kill
    for label in ("REFERENCE", "toy-run"):
        generated = read_jsonl(next((out / "generations").glob(f"{label}-*.jsonl")))
        assert len(generated) == 4
