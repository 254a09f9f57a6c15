"""The model step of `finetune()`: base model, attention for packing, and a fresh LoRA adapter or
a saved one trained further (--base_adapter, the SFT → DPO chain)."""

from __future__ import annotations

from transformers import set_seed

from jalora.data.prompts import chat_template_file
from jalora.model.loading import attach_lora, continue_adapter, load_config, load_model, resolve_targets
from jalora.model.packed_attention import use_packed_attention
from jalora.model.preflight import check_base_matches
from jalora.outputs import read_run_record


def build_model(source, quantization, dtype, trust_remote_code, tokenizer, lean, base_adapter, *, lora, preset, seed):
    """The base model with a fresh LoRA adapter, or with --base_adapter's to train further.
    Returns (model, the adapter's settings for the run record)."""
    if base_adapter:
        saved = read_run_record(base_adapter)
        if saved.get("base_config"):
            check_base_matches(base_adapter, saved, load_config(source, trust_remote_code))
    model = load_model(source, quantization, dtype, trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if lean["packing"]:
        use_packed_attention(model)
    quantized = quantization != "none"
    if base_adapter:
        model = continue_adapter(model, base_adapter, quantized, lean["gradient_checkpointing"])
        config = model.peft_config["default"]
        lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout}
        targets = config.target_modules  # a regular expression for a multimodal Gemma 3 (resolve_targets)
        lora["target_modules"] = targets if isinstance(targets, str) else sorted(targets)
    else:
        lora = {**lora, "target_modules": resolve_targets(model, lora["target_modules"], preset)}
        turn_ids = base_turn_token_ids(tokenizer, preset)
        if turn_ids:
            lora["trainable_tokens"] = tokenizer.convert_ids_to_tokens(turn_ids)
        set_seed(seed)  # LoRA's A matrices are random: the same seed must give the same adapter
        model = attach_lora(
            model, lora["target_modules"], lora["r"], lora["alpha"], lora["dropout"], quantized,
            gradient_checkpointing=lean["gradient_checkpointing"], trainable_tokens=turn_ids,
        )  # fmt: skip
    model.print_trainable_parameters()
    return model, lora


def base_turn_token_ids(tokenizer, preset) -> list[int]:
    """The ids of the preset's turn tokens when the checkpoint is a base one (jalora gave its tokenizer
    the family's chat template), else none. Their embedding rows train with the adapter (peft's
    trainable tokens; tied models share the row with the head): a base model has never predicted
    them, and LoRA alone cannot teach it to. On gemma-3-270m the log-probability of <end_of_turn> at
    an answer's end is about -32; 40 LoRA steps of the demo raise it to -8 and no answer stops, while
    with the two rows trained 5 of 8 held-out answers stop after 8 steps."""
    if not preset.turn_tokens or tokenizer.chat_template != chat_template_file(preset.chat_template):
        return []
    return tokenizer.convert_tokens_to_ids(list(preset.turn_tokens))
