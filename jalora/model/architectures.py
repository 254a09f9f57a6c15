"""What each model architecture allows on jalora's fast path, keyed by `config.model_type`.

One table instead of allow-lists in the collator, the loss and the trainer (DESIGN.md §1): a
type is listed only where a test checks the claim (tests/test_packing.py, tests/test_loss.py,
tests/test_gemma.py). Numbers that a config states itself (soft-caps, sliding window, layer
types, tied embeddings) are read from the config, so a checkpoint with other values stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """`packing_exact`: with restarting position ids and example boundaries, attention stays inside
    each example (transformers' packed-sequence masks, or jalora/model/packed_attention.py).
    `supervised_head`: the logits are `head(last_hidden_state)`, then the config's final soft-cap
    if any, so jalora/train/loss.py may apply the head itself. `fp16_safe`: activations fit in
    float16 (Gemma's overflow it). `text_tower`: the module path of the language model inside a
    multimodal checkpoint, the only part LoRA targets and the memory estimate counts.
    `applies_final_softcap` / `applies_attention_softcap`: the model's forward applies the config's
    `final_logit_softcapping` / `attn_logit_softcapping` (transformers 5.24: Gemma 2 both, Gemma 3's
    text model the final one only, Gemma3ForConditionalGeneration neither), so jalora does too."""

    packing_exact: bool = False
    supervised_head: bool = False
    fp16_safe: bool = True
    text_tower: str | None = None
    applies_final_softcap: bool = False
    applies_attention_softcap: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(packing_exact=True, supervised_head=True),
    "qwen2": Architecture(packing_exact=True, supervised_head=True),
    "gpt_neox": Architecture(packing_exact=True, supervised_head=True),
    "mistral": Architecture(supervised_head=True),
    "gemma2": Architecture(
        packing_exact=True,
        supervised_head=True,
        fp16_safe=False,
        applies_final_softcap=True,
        applies_attention_softcap=True,
    ),
    "gemma3_text": Architecture(packing_exact=True, supervised_head=True, fp16_safe=False, applies_final_softcap=True),
    "gemma3": Architecture(
        packing_exact=True, supervised_head=True, fp16_safe=False, text_tower="model.language_model"
    ),
}
UNKNOWN = Architecture()


def architecture(config) -> Architecture:
    """The facts for a config's model type; an unlisted type gets none of the fast paths."""
    return ARCHITECTURES.get(config.model_type, UNKNOWN)


def types_with(fact: str) -> list[str]:
    """The model types for which a boolean fact holds, for error messages and docs."""
    return [name for name, arch in ARCHITECTURES.items() if getattr(arch, fact)]


def text_config(config):
    """The language model's config: `text_config` of a multimodal checkpoint, else the config itself."""
    return config.get_text_config()


def final_logit_softcap(config) -> float | None:
    """The cap the model's forward puts on its logits, `cap * tanh(logits / cap)` (Gemma 2: 30); else None."""
    if not architecture(config).applies_final_softcap:
        return None
    return getattr(text_config(config), "final_logit_softcapping", None)


def attention_softcap(config) -> float | None:
    """The cap the model's attention puts on its scores (Gemma 2: 50); sdpa cannot apply it, eager
    and jalora's packed attention do. None where the model applies none."""
    if not architecture(config).applies_attention_softcap:
        return None
    return getattr(text_config(config), "attn_logit_softcapping", None)


def sliding_window_layers(config) -> tuple[int, ...]:
    """Indices of the layers that attend to the last `sliding_window` tokens only."""
    text = text_config(config)
    if not getattr(text, "sliding_window", None):
        return ()
    return tuple(i for i, kind in enumerate(getattr(text, "layer_types", None) or []) if kind == "sliding_attention")


def tied_embeddings(config) -> bool:
    """The head shares the input embedding matrix (Gemma, Qwen2.5 up to 3B): LoRA never targets it."""
    return any(getattr(c, "tie_word_embeddings", False) for c in (config, text_config(config)))
