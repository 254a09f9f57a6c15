"""Attention for packed rows that costs what the examples cost on their own.

With a block-diagonal mask, sdpa computes the scores of the whole packed row against itself
and discards those across examples: four 400-token examples in one row cost 4 times the
scores they need, 8 times counting that each example's own are causal, which on a small model
is nearly as much work as its linear layers. Given the examples' boundaries (`cu_seq_lens_q`,
the keyword that flash attention's variable-length path reads too), this attends within each
example's slice instead, with what the model's own attention passes for the layer:
- `sliding_window` (Gemma's local layers): a slice longer than the window gets the sliding
  causal mask that transformers builds for the layer, so the window holds as in a padded batch;
- `softcap` (Gemma 2's attention soft-cap): sdpa cannot apply it, so those slices run the eager
  attention transformers uses for Gemma 2, with the same cap.
Every other batch (padded, generation with a cache) goes to sdpa, or to that eager attention
for a soft-capped model, with its mask.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    eager_mask,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as softcapped_eager_attention

from jalora.model.architectures import attention_softcap

PACKED_SDPA = "jalora_packed_sdpa"
PACKED_EAGER = "jalora_packed_eager"  # for models with an attention soft-cap


def _slice_mask(n: int, sliding_window: int | None, eager: bool, query: torch.Tensor) -> torch.Tensor | None:
    """One example's causal mask, sliding if the layer has a window; None where sdpa's is_causal is enough."""
    if sliding_window is None or n <= sliding_window:
        if not eager:
            return None
        mask_function = causal_mask_function
    else:
        mask_function = sliding_window_causal_mask_function(sliding_window)
    if eager:
        return eager_mask(1, n, n, mask_function=mask_function, dtype=query.dtype, device=query.device)
    return sdpa_mask(1, n, n, mask_function=mask_function, allow_is_causal_skip=False, device=query.device)


def _per_example(fallback, eager: bool):
    def attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, sliding_window=None, **kwargs):
        if cu_seq_lens_q is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
            return fallback(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)
        bounds = cu_seq_lens_q.tolist()
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            mask = _slice_mask(b - a, sliding_window, eager, query)
            q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
            pieces.append(fallback(module, q, k, v, mask, **kwargs)[0])
        return torch.cat(pieces, dim=1), None

    return attention


AttentionInterface.register(PACKED_SDPA, _per_example(sdpa_attention_forward, eager=False))
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # padded batches keep their masks
AttentionInterface.register(PACKED_EAGER, _per_example(softcapped_eager_attention, eager=True))
AttentionMaskInterface.register(PACKED_EAGER, eager_mask)


def use_packed_attention(model) -> bool:
    """Move a model to the per-example path: from sdpa, or from the eager attention transformers
    picks for an attention soft-cap (Gemma 2). Flash attention is variable-length already, and an
    eager model without a soft-cap is the user's explicit choice. Returns whether it switched."""
    current = model.config._attn_implementation
    if attention_softcap(model.config) is not None:
        if current != "eager":
            return False
        model.set_attn_implementation(PACKED_EAGER)
        return True
    if current != "sdpa":
        return False
    model.set_attn_implementation(PACKED_SDPA)
    return True
