"""Tiny random-weight Gemma 3 and Gemma 2 models built from configs, for the numerics tests.

Model only, no tokenizer (tests/tiny_models.py has the Gemma stand-ins with tokenizers): the
numerics do not depend on the text. Every stand-in has a sliding window of 6 tokens, shorter
than the test examples, and mixes sliding and full-attention layers; Gemma 2 keeps its
attention (50) and final (30) soft-caps, scaled down so that they bite on random weights.
"""

from __future__ import annotations

import torch

VOCAB = 96
WINDOW = 6


def _shape() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=WINDOW,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )


def gemma3_text_model(attn: str = "sdpa"):
    """A Gemma3ForCausalLM (model_type gemma3_text, as gemma-3-270m and -1b): layers sliding, sliding, full."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    config = Gemma3TextConfig(**_shape(), layer_types=layer_types, query_pre_attn_scalar=16)
    config._attn_implementation = attn
    return Gemma3ForCausalLM(config).eval()


def gemma2_model(attn: str = "eager", attn_softcap: float = 2.0, final_softcap: float = 0.5):
    """A Gemma2ForCausalLM with sliding and full layers alternating and both soft-caps on."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        **_shape(),
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        attn_logit_softcapping=attn_softcap,
        final_logit_softcapping=final_softcap,
    )
    config._attn_implementation = attn
    return Gemma2ForCausalLM(config).eval()


def gemma3_vision_model():
    """A Gemma3ForConditionalGeneration (model_type gemma3, as gemma-3-4b and up) with a tiny SigLIP tower."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(
        **_shape(), layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=16
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1, image_token_index=VOCAB - 1)
    config._attn_implementation = "sdpa"
    return Gemma3ForConditionalGeneration(config).eval()


def examples(lengths: tuple[int, ...] = (13, 9, 17, 11), prompt: int = 4, seed: int = 1) -> list[dict]:
    """Tokenized examples of the given lengths (longer than the window), labels masked on the first `prompt` ids."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = [2, *torch.randint(3, VOCAB - 1, (n - 2,), generator=generator).tolist(), 1]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out
