"""One GPU training run checked against what jalora predicts and promises: peak VRAM next to
`jalora estimate`, tokens/s, and the dtypes attention really computes in during a training step
(bf16 on a bf16 GPU, also with a 4-bit base whose other weights peft keeps in fp32, because the
loss shortcut runs under the Trainer's autocast).

The model is the config's shape with random weights and the tiny Qwen2.5-style byte-level
tokenizer of tests/tiny_models.py (a few thousand tokens, all ids inside the real vocabulary), so
nothing is downloaded. Every example is cut at cutoff_len: each micro-batch holds exactly
micro_batch_size × cutoff_len tokens, the worst case the estimate describes.

    PYTHONPATH=. python bench/gpu_check.py --model_config bench/model_configs/elyza-llama2-7b --quantization 4bit
    PYTHONPATH=. python bench/gpu_check.py --tiny True      # the same path on the CPU with tiny shapes

bench/gpu_check.sh runs the two checks of bench/README.md one after the other.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import fire
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: the offline tokenizer

from gpu_memory import long_records  # noqa: E402  (bench/ is the script's folder)
from tiny_models import build_tiny  # noqa: E402

from jalora.evaluate.memory import GB, estimate  # noqa: E402
from jalora.train.finetune import finetune  # noqa: E402

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def random_model_dir(model_config: str, out: Path, tiny: bool) -> Path:
    """The config's shapes (or tiny ones) with random bf16 weights and the offline tokenizer, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny("qwen2.5", out.with_name("tokenizer")))
    raw = json.loads((Path(model_config) / "config.json").read_text()) | (TINY_SHAPE if tiny else {})
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)  # derived fields (layer_types) follow the shape
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def attention_dtypes() -> Iterator[dict[str, str]]:
    """The dtypes of the first training-mode attention call: its input hidden states, the query
    handed to torch's sdpa and the dtype sdpa computes in, and the attention block's output."""
    import torch.nn.functional as F

    seen: dict[str, str] = {}

    def hook(module, args, kwargs, output):
        if module.training and type(module).__name__.endswith("Attention"):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            seen.setdefault("attention input", str(hidden.dtype))
            seen.setdefault("attention output", str((output[0] if isinstance(output, tuple) else output).dtype))

    sdpa = F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        out = sdpa(query, *args, **kwargs)
        if torch.is_grad_enabled():  # training, not evaluation
            seen.setdefault("sdpa called with", str(query.dtype))
            seen.setdefault("sdpa computes in", str(out.dtype))  # autocast casts inside the call
        return out

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    F.scaled_dot_product_attention = spy
    try:
        yield seen
    finally:
        handle.remove()
        F.scaled_dot_product_attention = sdpa


def main(
    model_config: str = "bench/model_configs/elyza-llama2-7b",
    quantization: str = "4bit",
    cutoff_len: int = 1024,
    micro_batch_size: int = 4,
    steps: int = 6,
    lora_target_modules: str = "all-linear",
    tiny: bool = False,
) -> dict:
    """Train `steps` bf16 steps and print measured vs predicted figures (one line each, and JSON)."""
    if tiny:
        cutoff_len, micro_batch_size, steps = 64, 2, 2
    work = Path(tempfile.mkdtemp(prefix="jalora-gpu-check-"))
    started = time.time()
    model_dir = random_model_dir(model_config, work / "model", tiny)
    flags = dict(quantization=quantization, cutoff_len=cutoff_len, micro_batch_size=micro_batch_size)
    predicted = estimate(str(model_dir), lora_target_modules=lora_target_modules, preset="qwen2.5", **flags)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with attention_dtypes() as dtypes:
        record = finetune(
            base_model=str(model_dir),
            preset="qwen2.5",
            data_path=str(long_records(work / "long.jsonl", micro_batch_size * steps + 1)),
            output_dir=str(work / "out"),
            batch_size=micro_batch_size,
            max_steps=steps,
            val_set_size=1,
            eval_before_training=False,
            lora_target_modules=lora_target_modules,
            warmup_steps=0,
            bf16=True,
            **flags,
        )
    result = {
        "model_config": model_config,
        **flags,
        "tiny": tiny,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tokens_per_s": record["metrics"]["tokens_per_s"],
        "attention": record["hyperparameters"]["attention"],
        **dtypes,
        "estimate_gb": round(predicted["total"] / GB, 2),
        "seconds": round(time.time() - started, 1),
    }
    if torch.cuda.is_available():
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
        result["estimate_off"] = f"{result['estimate_gb'] / result['peak_allocated_gb'] - 1:+.1%}"
    print("gpu_check " + json.dumps(result))
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
