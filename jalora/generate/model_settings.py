"""A model's own generation_config.json is advice to show the user, never a setting jalora applies.

transformers' `generate()` starts from the `GenerationConfig` it is given (or a fresh one) and
fills every field still unset from `model.generation_config`, i.e. from the model's file, before
the library defaults (`_prepare_generation_config` in transformers 5.24). Passing a fresh config
does not help: its fields are unset until filled. Qwen2.5-Instruct's file, for one, turns on
`repetition_penalty 1.05` on top of jalora's own penalty (and penalises `<|im_end|>`, which
jalora exempts). So the model's config is read once for its suggestions, then replaced by a
neutral one that holds only the special-token ids: the fields jalora does not pass fall to the
library defaults (greedy, no penalty, no n-gram ban), and jalora's flags are the only source.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import GenerationConfig

# generation_config fields that are no decoding advice: token ids, bookkeeping, output format
NOT_ADVICE = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "transformers_version",
        "_from_model_config",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "max_length",  # a legacy cap; jalora always passes max_new_tokens
    }
)
# fields a user can set with a flag of the same name
FLAGS = frozenset(
    {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size", "num_beams"}
    | {"max_new_tokens"}
)


def model_suggestions(config: GenerationConfig) -> dict:
    """The decoding settings a model's generation_config sets (everything but ids and bookkeeping)."""
    return {k: v for k, v in config.to_diff_dict().items() if k not in NOT_ADVICE}


def eos_ids_of(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return list(eos) if isinstance(eos, list | tuple) else [] if eos is None else [eos]


def neutralise(model, eos_ids: Sequence[int], pad_id: int | None) -> dict:
    """Replace the model's generation_config by one that holds only token ids; return what the
    replaced one suggested. `model` may be a peft model: its generate() reads the base's config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    suggested = model_suggestions(base.generation_config)
    base.generation_config = GenerationConfig(
        bos_token_id=base.generation_config.bos_token_id, eos_token_id=list(eos_ids), pad_token_id=pad_id
    )
    return suggested


def suggestion_note(suggested: dict, in_effect: dict) -> str | None:
    """One line naming the model's suggestions that differ from the settings in effect, with the
    flags that would apply them; None when there are none."""
    differing = {k: v for k, v in suggested.items() if in_effect.get(k) != v}
    if not differing:
        return None
    note = "model suggests " + ", ".join(f"{k} {v}" for k, v in differing.items()) + " (not applied)"
    flags = " ".join(f"--{k} {v}" for k, v in differing.items() if k in FLAGS)
    return f"{note}; pass {flags} to use" if flags else note
