"""Training throughput: jalora's defaults against two baselines, in one process: the plain
alpaca-lora recipe, and trl's SFTTrainer with packing, padding-free batches and completion-only loss.

Same model (a ~28M-parameter Llama built from config with SmolLM2's tokenizer, SmolLM2-135M
itself with --real, or any saved model folder with --model_dir, e.g. gemma-3-270m converted from
its GGUF with --convert_gguf), same records (data/dolly_ja_sample.jsonl, or its --longest ones),
same LoRA, batch sizes, seed and step count. Prints the whole-process wall time of each (load +
tokenize + train + save), real tokens/s and their ratio, padding efficiency, peak RSS during each
run, the final training loss, and the adapters' loss on held-out data.

    PYTHONPATH=. python bench/train_throughput.py [--examples 128] [--real]
    PYTHONPATH=. python bench/train_throughput.py --convert_gguf GGUF --model_dir DIR   # once
    PYTHONPATH=. python bench/train_throughput.py --model_dir DIR --preset generic --examples 48 --longest \
        --targets q_proj,v_proj --micro_batch_size 4 --batch_size 16
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import fire
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_recipe import pad_collator, render_plainly, tokenize_per_example  # noqa: E402

from jalora.data.collate import TokenCounter  # noqa: E402
from jalora.data.prompts import Prompter, load_template  # noqa: E402
from jalora.data.records import IGNORE_INDEX, load_records  # noqa: E402
from jalora.model.loading import load_model, load_tokenizer, resolve_source  # noqa: E402
from jalora.presets import get_preset  # noqa: E402
from jalora.train.finetune import finetune  # noqa: E402
from jalora.train.progress import ThroughputCallback  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PeakRSS:
    """Peak resident memory above the level at start, sampled every 10 ms in a thread."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def baseline_args(out, micro: int, batch: int, lr: float, steps: int, seed: int) -> dict:
    """The training arguments both baselines share (alpaca-lora's schedule, one epoch, no saves)."""
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        num_train_epochs=1,
        learning_rate=lr,
        warmup_steps=steps // 10,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
    )


def save_gguf_as_safetensors(gguf: str, out: Path) -> Path:
    """De-quantize a GGUF once into a safetensors folder (DESIGN.md §4: a GGUF-loaded model keeps a
    quantization mark that save_pretrained refuses; jalora's loader drops it)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(gguf)
    gguf_model = load_model(source)
    model = AutoModelForCausalLM.from_config(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.save_pretrained(out)
    load_tokenizer(source, get_preset("generic")).save_pretrained(out)
    return out


def build_model_dir(real: bool, out: Path) -> Path:
    """A saved model + tokenizer folder: SmolLM2-135M, or a Llama of ~28M parameters built from config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = get_preset("smollm2")
    tokenizer = load_tokenizer(resolve_source("smollm2"), preset)
    if real:
        gguf = load_model(resolve_source("smollm2"))
        config = gguf.config
        vars(config).pop("quantization_config", None)  # a GGUF model cannot be saved as is
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf.state_dict())
    else:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def plain_run(
    model_dir: Path,
    train_path: str,
    out: Path,
    cutoff: int,
    micro: int,
    batch: int,
    lr: float,
    seed: int,
    preset: str,
    targets: list[str],
):
    """HF Trainer + peft, per-example tokenization, pad to longest (multiple of 8), random order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    preset = get_preset(preset)
    tokenizer = load_tokenizer(resolve_source(str(model_dir)), preset)
    prompter = Prompter(load_template(preset.template), tokenizer, preset)
    train_set = tokenize_per_example(load_records(train_path), prompter, cutoff)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    counter = TokenCounter()
    throughput = ThroughputCallback(counter)  # the same instrument finetune() uses
    pad = pad_collator(tokenizer)

    def counting_collator(features):
        batch_ = pad(features)
        counter.add(batch_)
        return batch_

    steps = math.ceil(len(train_set) / batch)
    args = TrainingArguments(
        **baseline_args(out, micro, batch, lr, steps, seed),
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, data_collator=counting_collator, callbacks=[throughput]
    )
    result = trainer.train()
    model.save_pretrained(out)
    return model, {
        **_rates(throughput.summary()),
        "padding_efficiency": counter.padding_efficiency,
        "train_loss": result.training_loss,
    }


def trl_run(
    model_dir: Path,
    train_path: str,
    out: Path,
    cutoff: int,
    micro: int,
    batch: int,
    lr: float,
    seed: int,
    preset: str,
    targets: list[str],
):
    """trl's SFTTrainer as its docs recommend for speed: prompt/completion records, packing (best-fit
    decreasing into rows of cutoff tokens), padding-free batches, loss on completions only; and in
    its fastest settings here: fp32 like the others, no gradient checkpointing."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    preset = get_preset(preset)
    tokenizer = load_tokenizer(resolve_source(str(model_dir)), preset)
    prompter = Prompter(load_template(preset.template), tokenizer, preset)
    rows = [
        {"prompt": render_plainly(prompter, r.instruction, r.input), "completion": r.output}
        for r in load_records(train_path)
    ]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    steps = math.ceil(len(rows) / batch)
    args = SFTConfig(
        **baseline_args(out, micro, batch, lr, steps, seed),
        disable_tqdm=True,
        bf16=False,  # trl defaults to bf16: emulated (many times slower) on CPUs without bf16 units
        gradient_checkpointing=False,  # trl's default is on; off is faster, as jalora has it without quantization
        max_length=cutoff,
        packing=True,
        padding_free=True,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    counter = TokenCounter()
    trainer.add_callback(ThroughputCallback(counter))
    collate = trainer.data_collator

    def counting_collator(features):
        batch_ = collate(features)
        counter.add(batch_)  # padding-free: one row, no attention mask, every token real
        return batch_

    trainer.data_collator = counting_collator
    throughput = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputCallback))
    result = trainer.train()
    trainer.save_model(str(out))
    return trainer.model, {
        **_rates(throughput.summary()),
        "padding_efficiency": counter.padding_efficiency,
        "train_loss": result.training_loss,
    }


def _rates(summary: dict) -> dict:
    return {
        "real_tokens": summary["train_tokens"],
        "step_s": summary["train_step_seconds"],
        "tokens_per_s": summary["train_tokens"] / summary["train_step_seconds"],
        "tokens_per_cpu_s": summary["train_tokens"] / summary["train_cpu_seconds"],
    }


def jalora_run(
    model_dir: Path,
    train_path: str,
    out: Path,
    cutoff: int,
    micro: int,
    batch: int,
    lr: float,
    seed: int,
    preset: str,
    targets: list[str],
):
    """jalora's finetune() with its defaults (packing, cached batched tokenization)."""
    record = finetune(
        base_model=str(model_dir),
        preset=preset,
        data_path=train_path,
        output_dir=str(out),
        batch_size=batch,
        micro_batch_size=micro,
        num_epochs=1,
        learning_rate=lr,
        cutoff_len=cutoff,
        val_set_size=0,
        lora_target_modules=targets,
        logging_steps=1,
        seed=seed,
    )
    metrics = record["metrics"]
    return {
        **_rates(metrics),
        "padding_efficiency": metrics["padding_efficiency"],
        "train_loss": metrics["train_loss"],
    }


def heldout_loss(model, prompter: Prompter, n: int = 24, cutoff: int = 512) -> float:
    """Token-mean answer loss on held-out records, example by example (no padding, no packing)."""
    from jalora.data.records import tokenize_records

    examples, _ = tokenize_records(load_records(str(DATA / "dolly_ja_heldout.jsonl"))[:n], prompter, cutoff)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1].float()
            targets = torch.tensor(e["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def select_records(examples: int, longest: bool) -> list[str]:
    """The first `examples` sample records, or the `examples` longest (most characters) in file order."""
    lines = [line for line in (DATA / "dolly_ja_sample.jsonl").read_text(encoding="utf-8").splitlines() if line]
    if not longest:
        return lines[:examples]
    keep = set(sorted(range(len(lines)), key=lambda i: -len(lines[i]))[:examples])
    return [line for i, line in enumerate(lines) if i in keep]


def timed(run, *args, **kwargs):
    """The run's results with its whole-process wall time (load + tokenize + train + save) and peak RSS."""
    start = time.perf_counter()
    with PeakRSS() as rss:
        result = run(*args, **kwargs)
    model, figures = result if isinstance(result, tuple) else (None, result)
    figures["whole_s"] = time.perf_counter() - start
    figures["peak_rss_mb"] = rss.mb
    return model, figures


def main(
    examples: int = 128,
    real: bool = False,
    cutoff_len: int = 512,
    micro_batch_size: int = 4,
    batch_size: int = 16,
    model_dir: str | None = None,
    preset: str = "smollm2",
    targets: str | list[str] | None = None,
    longest: bool = False,
    convert_gguf: str | None = None,
):
    """Run the three recipes on the sample records and print the comparison (or, with
    --convert_gguf, only write the GGUF's model as a safetensors folder to --model_dir)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if convert_gguf:
        print(save_gguf_as_safetensors(convert_gguf, Path(model_dir)))
        return
    work = Path(tempfile.mkdtemp(prefix="jalora-bench-"))
    os.environ.setdefault("JALORA_CACHE_DIR", str(work / "cache"))
    model_path = Path(model_dir) if model_dir else build_model_dir(real, work / "model")
    records = select_records(examples, longest)
    train_path = work / "train.jsonl"
    train_path.write_text("\n".join(records) + "\n", encoding="utf-8")
    lora_targets = targets.split(",") if isinstance(targets, str) else list(targets or TARGETS)
    common = dict(cutoff=cutoff_len, micro=micro_batch_size, batch=batch_size, lr=3e-4, seed=42)
    common.update(preset=preset, targets=lora_targets)
    print(f"load average before: {psutil.getloadavg()}, threads: {torch.get_num_threads()}")

    warm_path = work / "warm.jsonl"  # one unmeasured step each first: one-time allocations and imports
    warm_path.write_text("\n".join(records[-micro_batch_size:]) + "\n", encoding="utf-8")
    warm = dict(common, batch=micro_batch_size)
    plain_run(model_path, str(warm_path), work / "warm-plain", **warm)
    trl_run(model_path, str(warm_path), work / "warm-trl", **warm)
    jalora_run(model_path, str(warm_path), work / "warm-jalora", **warm)
    plain_model, plain = timed(plain_run, model_path, str(train_path), work / "plain", **common)
    trl_model, trl = timed(trl_run, model_path, str(train_path), work / "trl", **common)
    _, lean = timed(jalora_run, model_path, str(train_path), work / "jalora", **common)
    print(f"load average after training: {psutil.getloadavg()}")

    the_preset = get_preset(preset)
    tokenizer = load_tokenizer(resolve_source(str(model_path)), the_preset)
    prompter = Prompter(load_template(the_preset.template), tokenizer, the_preset)
    plain["heldout_loss"] = heldout_loss(plain_model, prompter, cutoff=cutoff_len)
    trl["heldout_loss"] = heldout_loss(trl_model, prompter, cutoff=cutoff_len)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    lean["heldout_loss"] = heldout_loss(
        PeftModel.from_pretrained(base, str(work / "jalora")), prompter, cutoff=cutoff_len
    )
    print(f"load average after: {psutil.getloadavg()}")

    if model_dir:
        model_name = f"{model_path.name} ({base.config.model_type})"
    else:
        model_name = "SmolLM2-135M" if real else f"Llama-shaped {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M"
    print(
        f"\n{model_name}, {len(records)} records, cutoff {cutoff_len}, micro-batch {micro_batch_size}, "
        f"batch {batch_size}, LoRA r=8 on {','.join(lora_targets)}"
    )
    keys = ["whole_s", "real_tokens", "step_s", "tokens_per_s", "tokens_per_cpu_s", "padding_efficiency"]
    keys += ["peak_rss_mb", "train_loss", "heldout_loss"]
    print(f"{'':<20}{'plain':>12}{'trl SFT':>12}{'jalora':>12}{'vs plain':>10}{'vs trl':>10}")
    for k in keys:
        vs_plain = lean[k] / plain[k] if plain[k] else float("nan")
        vs_trl = lean[k] / trl[k] if trl[k] else float("nan")
        print(f"{k:<20}{plain[k]:>12.4g}{trl[k]:>12.4g}{lean[k]:>12.4g}{vs_plain:>10.3f}{vs_trl:>10.3f}")
    speedups = f"{plain['whole_s'] / lean['whole_s']:.2f}x plain, {trl['whole_s'] / lean['whole_s']:.2f}x trl"
    print(f"whole-process speed-up: {speedups}")


if __name__ == "__main__":
    fire.Fire(main)
