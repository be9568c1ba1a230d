"""The DPO objective (SPEC section 1) and the per-sequence log-probabilities it needs.

Log-probabilities come from the model's final hidden states and the fused
`mofast.kernels.sequence_logprobs`, so the [rows, tokens, vocabulary] logits are never
materialised. Batches are right-padded: a row's real tokens then come first, take the
positions 0..n-1, and under causal attention never see the padding after them, so a padded
row gives the same log-probabilities as the row alone without any attention mask. That also
keeps transformers from building a padding mask, which inspects the mask on the host (a
device synchronisation) on every forward pass.
"""

import torch
import torch.nn.functional as F

from mofast.kernels import sequence_logprobs

IGNORE_INDEX = -100

# Causal-only attention implementations registered with transformers: the mask argument is
# ignored because right padding makes it redundant (see the module docstring).
CAUSAL_SDPA = "mofast_causal_sdpa"
CAUSAL_FLASH = "mofast_causal_flash_attention_2"
_CAUSAL_OF = {"sdpa": CAUSAL_SDPA, "flash_attention_2": CAUSAL_FLASH}


def _check_window(module: torch.nn.Module, length: int) -> None:
    window = getattr(module, "sliding_window", None)
    if window is not None and length > window:
        raise ValueError(
            f"sequence of {length} tokens exceeds the model's sliding attention window of "
            f"{window}; use --attn-implementation eager for sliding-window attention"
        )


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with is_causal and no mask: query [B, H, T, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _check_window(module, query.shape[2])
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def _causal_flash(module, query, key, value, attention_mask, **kwargs):
    """Flash Attention 2, causal, no mask: query [B, H, T, D] -> output [B, T, H, D]."""
    from flash_attn import flash_attn_func

    _check_window(module, query.shape[2])
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # Under autocast over float32 weights RoPE's float32 cos/sin turn the bf16 query and
        # key back to float32 while the value stays bf16; flash-attn takes one half dtype.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    out = flash_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=kwargs.get("dropout", 0.0) if module.training else 0.0,
        softmax_scale=kwargs.get("scaling"),
        causal=True,
        softcap=kwargs.get("softcap") or 0.0,
    )
    return out, None


def register_causal_attention() -> None:
    """Make the causal-only implementations known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)
    AttentionInterface.register(CAUSAL_FLASH, _causal_flash)


def causal_attention(implementation: str) -> str:
    """The mask-free causal variant of `sdpa` or `flash_attention_2`; others unchanged."""
    return _CAUSAL_OF.get(implementation, implementation)


def to_right_padding(
    input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the front (host tensors; a no-op when already so).

    The real tokens of a row must be contiguous; padding may sit on either side.
    """
    if input_ids.shape != labels.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, labels {tuple(labels.shape)} and "
            f"attention_mask {tuple(attention_mask.shape)} must have the same shape"
        )
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    starts = mask.int().argmax(1)
    positions = torch.arange(mask.shape[1])
    expected = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    if not torch.equal(expected, mask):
        raise ValueError("each row's attended tokens must be contiguous (one padded run per side)")
    if not starts.any():
        return input_ids, labels, attention_mask

    index = (positions[None, :] + starts[:, None]) % mask.shape[1]
    rolled = [t.gather(1, index) for t in (input_ids, labels, attention_mask)]
    keep = positions[None, :] < lengths[:, None]
    return rolled[0], rolled[1].masked_fill(~keep, IGNORE_INDEX), keep.to(attention_mask.dtype)


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Sum of log pi(token) over each row's counted tokens: float32 [N].

    input_ids [N, T] right-padded; labels [N, T] aligned with input_ids (IGNORE_INDEX on
    prompt and padding tokens); the shift to next-token targets happens here.
    """
    if input_ids.dim() != 2 or input_ids.shape != labels.shape:
        raise ValueError(
            f"input_ids and labels must both be [N, T], got {tuple(input_ids.shape)} "
            f"and {tuple(labels.shape)}"
        )

    body = model.get_decoder()
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state

    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # The fused op is not an autocast op: cast its operands as autocast casts a linear
        # layer's, so the head runs in the autocast dtype like the rest of the model.
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return sequence_logprobs(
        hidden[:, :-1],
        weight,
        labels[:, 1:],
        bias=bias,
        ignore_index=IGNORE_INDEX,
        softcap=getattr(model.config, "final_logit_softcapping", None),
    )


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses softplus(-margin) and margins, both float32 [B] (SPEC section 1)."""
    logratio_chosen = policy_chosen.float() - reference_chosen.float()
    logratio_rejected = policy_rejected.float() - reference_rejected.float()
    margins = beta * (logratio_chosen - logratio_rejected)
    return F.softplus(-margins), margins
