"""`jalora merge`: fold an adapter into its base and write a plain transformers model.

The result (safetensors shards + tokenizer) loads with AutoModelForCausalLM.from_pretrained
alone, for serving stacks that know nothing of peft. A quantized base is dequantised before
merging (LoRA deltas cannot be added to 4-bit codes), and a GGUF-loaded base is copied into a
fresh model first, because transformers refuses to save a GGUF-quantized model as is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from jalora.errors import UserError, friendly_errors
from jalora.evaluate.card import CARD, merged_card
from jalora.generate.model_settings import eos_ids_of
from jalora.model.loading import compute_dtype, load_model, load_tokenizer, resolve_preset, resolve_source
from jalora.outputs import read_run_record, reported_write_failures, weight_bytes, write_atomic
from jalora.presets import get_preset
from jalora.quiet import quiet_third_party
from jalora.run_lock import locks_output, refuse_if_locked

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def savable(model):
    """The model itself, or, when a quantizer (GGUF) still owns it, a fresh copy of its weights
    under a config without quantization_config, which save_pretrained accepts."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    return fresh


def merged_model(base_model: str, lora_weights: str | None, quantization: str, dtype: torch.dtype):
    """Base (+ adapter, merged) as one plain full-precision model."""
    model = load_model(resolve_source(base_model), quantization, dtype)
    if quantization != "none":
        print(
            f"dequantising the {quantization} base to {str(dtype).removeprefix('torch.')} before merging: "
            "the merged weights are the dequantised base (what the adapter was trained against) plus the adapter"
        )
        model = model.dequantize(dtype=dtype)
    if lora_weights:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora_weights).merge_and_unload()
    return savable(model)


def stop_at_end_of_turn(generation_config, tokenizer) -> None:
    """eos ids for serving stacks: the family's end-of-turn id first (the tokenizer's eos after the
    preset's repair: Llama-3 <|eot_id|>, Qwen <|im_end|>), then the base's own. A base model's file
    names only its end-of-text id, so a merged chat model served elsewhere would never stop."""
    generation_config.eos_token_id = list(dict.fromkeys([tokenizer.eos_token_id, *eos_ids_of(generation_config)]))
    generation_config.pad_token_id = tokenizer.pad_token_id


@friendly_errors
@locks_output("output_dir")
def merge(
    lora_weights: str | None = None,
    output_dir: str = "./merged",
    base_model: str | None = None,
    quantization: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    verbose: bool = False,
) -> str:
    """Write base + adapter as one transformers model (safetensors shards, tokenizer, card).

    The base loads as in training (the run's --quantization unless given: a 4-bit base is
    dequantised first). Without --lora_weights the base alone is written, which turns a GGUF
    base into safetensors that bitsandbytes can quantize. --dtype: float32, bfloat16 or
    float16 (default: bf16/fp16 on a GPU, fp32 on the CPU). Returns the output folder.
    --verbose shows the libraries' warnings and log lines.
    """
    quiet_third_party(verbose)
    if lora_weights:
        refuse_if_locked(lora_weights, "--lora_weights")
    record = read_run_record(lora_weights) if lora_weights else {}
    base_model = base_model or record.get("base_model")
    if not base_model:
        raise UserError("give --base_model (the adapter folder has no jalora.json naming it)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{output_dir}: output folder exists and is not empty; choose another --output_dir")
    quantization = quantization or record.get("quantization", "none")
    the_dtype = DTYPES[dtype] if dtype else compute_dtype()

    preset = get_preset(record["preset"]) if "preset" in record else resolve_preset(None, base_model)
    tokenizer = load_tokenizer(resolve_source(base_model), preset)
    model = merged_model(base_model, lora_weights, quantization, the_dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    stop_at_end_of_turn(model.generation_config, tokenizer)

    partial = out.with_name(f".{out.name}.partial")  # renamed to `out` when whole; removed if a write fails
    shutil.rmtree(partial, ignore_errors=True)
    with reported_write_failures(out, lambda: weight_bytes(model), lambda: shutil.rmtree(partial, ignore_errors=True)):
        model.save_pretrained(partial, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(partial)
        card = merged_card(record, base_model, lora_weights, quantization, str(out))
        write_atomic(partial / CARD, card.encode("utf-8"))
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    print(f"wrote the merged model to {out}")
    return str(out)
