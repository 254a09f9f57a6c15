"""Measured against predicted: peak GPU memory and tokens/s of a 4-bit LoRA run on a 7B-shaped
model with random weights, next to what `jalora estimate` says for the same flags.

Every training example is long enough to be cut at cutoff_len, so each micro-batch holds
exactly micro_batch_size × cutoff_len tokens: the worst case the estimate describes.

    PYTHONPATH=. python bench/gpu_memory.py --model_config bench/model_configs/elyza-llama2-7b \
        --quantization 4bit --cutoff_len 1024 --micro_batch_size 4 --steps 8
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fire
import torch

from jalora.evaluate.memory import GB, estimate
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import get_preset
from jalora.train.finetune import finetune

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "dolly_ja_sample.jsonl"


def random_model_dir(model_config: str, out: Path) -> Path:
    """The config's shapes with SmolLM2's tokenizer (vocab resized to it), random bf16 weights, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(resolve_source("smollm2"), get_preset("smollm2"))
    config = AutoConfig.from_pretrained(model_config)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def long_records(path: Path, n: int) -> Path:
    """Sample records with answers repeated until any cutoff truncates them."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line][:n]
    for row in rows:
        row["output"] = (row["output"] + "\n") * 40
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def main(
    model_config: str = "bench/model_configs/elyza-llama2-7b",
    quantization: str = "4bit",
    cutoff_len: int = 1024,
    micro_batch_size: int = 4,
    steps: int = 8,
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj",
):
    work = Path(tempfile.mkdtemp(prefix="jalora-gpu-"))
    model_dir = random_model_dir(model_config, work / "model")
    flags = dict(quantization=quantization, cutoff_len=cutoff_len, micro_batch_size=micro_batch_size)
    predicted = estimate(str(model_dir), lora_target_modules=lora_target_modules, preset="smollm2", **flags)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    record = finetune(
        base_model=str(model_dir),
        preset="smollm2",
        data_path=str(long_records(work / "long.jsonl", micro_batch_size * steps + 1)),
        output_dir=str(work / "out"),
        batch_size=micro_batch_size,
        max_steps=steps,
        val_set_size=1,
        eval_before_training=False,
        lora_target_modules=lora_target_modules,
        warmup_steps=0,
        **flags,
    )
    metrics = record["metrics"]
    print(f"tokens/s {metrics['tokens_per_s']:.0f}, padding efficiency {metrics['padding_efficiency']:.3f}")
    if torch.cuda.is_available():
        measured = torch.cuda.max_memory_allocated() / GB
        print(f"peak allocated {measured:.2f} GB (torch.cuda.max_memory_allocated)")
        print(f"estimate {predicted['total'] / GB:.2f} GB: {predicted['total'] / GB / measured - 1:+.1%} off")


if __name__ == "__main__":
    fire.Fire(main)
