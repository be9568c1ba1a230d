"""The DPO loss and the per-sequence log-probabilities, on the shipped model and real data."""

import copy
import math
import sys
import types

import pytest
import torch

from mofast import dpo
from mofast.assets import STORIES260K

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    dpo.register_causal_attention()
    return AutoModelForCausalLM.from_pretrained(
        STORIES260K, attn_implementation=dpo.CAUSAL_SDPA, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES260K)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Five real pairs of odd, different lengths, collated right-padded: [10, T]."""
    from mofast import data

    pairs = iter(data.default_objectives()["rubric_mean"])
    encoded = []
    for length in (37, 61, 96, 45, 73):
        enc = None
        while enc is None:  # a pair may become identical once cut short; take the next
            pair = next(pairs)
            enc = data.encode_pair(
                tokenizer, pair["prompt"], pair["chosen"], pair["rejected"], max_length=length
            )
        encoded.append(enc)
    return data.PairCollator.for_tokenizer(tokenizer)(encoded)


def _reference_logps(model, input_ids, labels):
    """float64 log-probs from the model's own materialised logits (the model in float64)."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(input_ids=input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    counted = targets != dpo.IGNORE_INDEX
    token = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return (token * counted).sum(-1)


def test_dpo_losses_follow_the_formula():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-50 * torch.rand(13, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.5

    losses, margins = dpo.dpo_losses(pc.float(), pr.float(), rc.float(), rr.float(), beta)
    expected_margin = beta * ((pc - rc) - (pr - rr))
    expected = torch.log1p(torch.exp(-expected_margin))

    assert losses.dtype == torch.float32 and margins.dtype == torch.float32
    # fp32 inputs of magnitude 50 carry ~4e-6 absolute rounding into the margin.
    torch.testing.assert_close(margins.double(), expected_margin, atol=2e-5, rtol=0)
    torch.testing.assert_close(losses.double(), expected, atol=2e-5, rtol=0)


def test_dpo_losses_at_zero_margin_are_ln2_and_float32_from_bf16():
    logps = (-30 * torch.rand(9)).to(torch.bfloat16)
    losses, margins = dpo.dpo_losses(logps, logps.flip(0), logps, logps.flip(0), 0.5)
    assert losses.dtype == torch.float32
    assert torch.all(margins == 0)
    assert torch.all((losses.double() - math.log(2)).abs() < 1e-7)


def test_sequence_logps_equal_the_models_own_logits(model, batch):
    ids, labels = batch["input_ids"], batch["labels"]
    expected = _reference_logps(model, ids, labels)
    with torch.no_grad():
        got = dpo.sequence_logps(model, ids, labels)

    assert got.dtype == torch.float32 and got.shape == (ids.shape[0],)
    # fp32 sums of up to ~50 token log-probs of size ~5: a few 1e-5 absolute.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_padded_rows_give_the_log_probs_of_each_row_alone(model, batch):
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 2, "the rows must have different lengths"

    with torch.no_grad():
        padded = dpo.sequence_logps(model, ids, labels)
        alone = torch.stack(
            [dpo.sequence_logps(model, ids[i : i + 1, :n], labels[i : i + 1, :n])[0]
             for i, n in enumerate(lengths.tolist())]
        )  # fmt: skip
    exact = _reference_logps(model, ids, labels)

    # The padded batch is judged against the fp32 row alone: at most twice as far from the
    # float64 answer, plus one fp32 rounding of the sum.
    err_alone = (alone.double() - exact).abs()
    err_padded = (padded.double() - exact).abs()
    assert torch.all(err_padded <= 2 * err_alone + 1e-6 * exact.abs()), (err_padded, err_alone)


def test_prompt_and_padding_never_count(model, batch):
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    with torch.no_grad():
        base = dpo.sequence_logps(model, ids, labels)

        # Other tokens in the padding: the real tokens never see them (causal, right padding).
        noisy = ids.clone()
        noisy[mask == 0] = torch.randint(3, 500, (int((mask == 0).sum()),))
        assert torch.equal(dpo.sequence_logps(model, noisy, labels), base)

        # Scoring the prompt too changes the result: so masking it out is what excludes it.
        all_labels = torch.where(mask.bool(), ids, torch.full_like(ids, dpo.IGNORE_INDEX))
        with_prompt = dpo.sequence_logps(model, ids, all_labels)
    assert torch.all(with_prompt < base - 1.0)

    # A row scored only on its response tokens equals the explicit sum over them.
    expected = _reference_logps(model, ids, labels)
    torch.testing.assert_close(base.double(), expected, rtol=1e-5, atol=1e-4)


def test_to_right_padding_moves_left_padding_and_rejects_holes():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 0, 0, 0]])
    labels = torch.tensor(
        [[-100, -100, -100, 6, 7], [-100, 9, 10, 11, 12], [-100, 14, -100] + [-100] * 2]
    )
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    out_ids, out_labels, out_mask = dpo.to_right_padding(ids, labels, mask)
    assert out_ids[0, :3].tolist() == [5, 6, 7]
    assert out_labels[0].tolist() == [-100, 6, 7, -100, -100]
    assert out_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert torch.equal(out_ids[1:], ids[1:]) and torch.equal(out_labels[1:], labels[1:])

    holes = torch.tensor([[1, 0, 1, 1, 1], [1] * 5, [1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="contiguous"):
        dpo.to_right_padding(ids, labels, holes)


def test_sequence_logps_rejects_mismatched_shapes(model):
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        dpo.sequence_logps(model, torch.ones(2, 7, dtype=torch.long), torch.ones(2, 6).long())


def test_flash_attention_gets_one_half_precision_dtype_under_autocast(monkeypatch):
    # Under the trainer's bf16 autocast over float32 weights, RoPE's float32 cos/sin turn
    # the bf16 query and key back to float32 while the value stays bf16; flash-attn accepts
    # only fp16/bf16 and one dtype for all three (HF's own flash path casts for this).
    seen = []

    def flash_attn_func(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)
        groups = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * kwargs["softmax_scale"]
        causal = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func)
    )
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    # A name without "flash": transformers would look for the real flash-attn package.
    AttentionInterface.register("mofast_test_causal_fa", dpo._causal_flash)
    config = LlamaConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config._attn_implementation = "mofast_test_causal_fa"
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 67, (2, 7))
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = dpo.sequence_logps(model, ids, labels)
    assert seen == [(torch.bfloat16,) * 3]
    assert torch.isfinite(logps).all()
