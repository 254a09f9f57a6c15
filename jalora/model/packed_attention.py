"""Attention for packed rows that costs what the examples cost on their own.

With a block-diagonal mask, sdpa computes the scores of the whole packed row against itself
and discards those across examples: four 400-token examples in one row cost 4 times the
scores they need, 8 times counting that each example's own are causal, which on a small model
is nearly as much work as its linear layers. Given the examples' boundaries (`cu_seq_lens_q`,
the keyword that flash attention's variable-length path reads too), this runs causal sdpa on
each example's slice instead. Every other batch (padded, generation with a cache) goes to sdpa
with its mask.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "jalora_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    if cu_seq_lens_q is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    pieces = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(pieces, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # padded batches keep their masks


def use_packed_attention(model) -> bool:
    """Move a model on sdpa to the per-example path (flash attention is variable-length already,
    eager is the user's explicit choice). Returns whether it switched."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(PACKED_SDPA)
    return True
