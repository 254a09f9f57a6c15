"""Checks that run before any expensive work: flags, weight files, and adapter/base fit.

Each failure is a UserError that names the flag or file and says what was expected, so a
typo costs a second, not a model load or a training run.
"""

from __future__ import annotations

import json
from pathlib import Path

from jalora.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
QUANTIZATIONS = ("none", "8bit", "4bit")


def check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}")


def check_training_flags(flags: dict) -> None:
    """finetune flags that contradict each other or the machine (each flag alone is checked by
    jalora/flags.py)."""
    if flags["micro_batch_size"] > flags["batch_size"]:
        raise UserError(
            f"--micro_batch_size {flags['micro_batch_size']} is larger than --batch_size {flags['batch_size']}; "
            "batch_size is the effective batch (micro_batch_size × gradient accumulation)"
        )
    if flags["bf16"] and flags["fp16"]:
        raise UserError("--bf16 and --fp16 are both set; choose one (bf16 is the safer one where supported)")
    if flags["fp16"]:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--fp16 needs a CUDA GPU; on the CPU train in fp32 (the default) or --bf16 True")


def check_safe_weights(path: str, gguf_file: str | None) -> None:
    """Refuse a local model folder whose weights exist only as pickle files: unpickling can run
    code. GGUF files hold raw tensors and metadata, no pickle, so they are accepted."""
    folder = Path(path)
    if gguf_file or not folder.is_dir():
        return  # hub ids: from_pretrained(use_safetensors=True) refuses pickle itself
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{path}: weights only as pickle files ({', '.join(pickles)}); jalora loads safetensors only, "
            "because unpickling can run code. Convert them once, in a process you trust, with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )


def base_config_summary(config) -> dict:
    """The shape-defining fields of a base model's config, stored in the run record."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {key: getattr(config, key, None) for key in keys}


def check_base_matches(lora_weights: str, record: dict, config) -> None:
    """Before loading weights: does --base_model have the shape of the model the adapter was trained on?"""
    expected, actual = record["base_config"], base_config_summary(config)
    diffs = [f"{k} {expected[k]} vs {actual[k]}" for k in expected if expected[k] != actual[k]]
    if diffs:
        raise UserError(
            f"{lora_weights} was trained on {record.get('base_model')!r}; the --base_model given is a different "
            f"model ({', '.join(diffs)}). Pass the base model the adapter was trained on"
        )


def check_adapter_fits(lora_weights: str, model) -> None:
    """Every LoRA matrix in the adapter must land on a layer of this model with matching shape;
    otherwise peft fails with a size-mismatch traceback, or silently skips missing layers."""
    from safetensors import safe_open

    folder = Path(lora_weights)
    trained_on = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    modules = dict(model.named_modules())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as tensors:
        for key in tensors.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            layer = key.removeprefix("base_model.model.").split(".lora_")[0]
            shape = tensors.get_slice(key).get_shape()
            module = modules.get(layer)
            if module is None:
                problem = f"it has no layer {layer}"
            elif ".lora_A." in key and shape[1] != getattr(module, "in_features", shape[1]):
                problem = f"layer {layer} takes {module.in_features} features, the adapter expects {shape[1]}"
            elif ".lora_B." in key and shape[0] != getattr(module, "out_features", shape[0]):
                problem = f"layer {layer} gives {module.out_features} features, the adapter expects {shape[0]}"
            else:
                continue
            raise UserError(
                f"{lora_weights} does not fit this base model ({problem}); it was trained on {trained_on!r}. "
                "Pass that model as --base_model"
            )
