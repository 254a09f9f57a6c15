"""`make demo`: fine-tune the embedded SmolLM2-135M on the bundled Japanese sample, on the CPU,
and show held-out loss and a few answers before and after. A short run: minutes, not hours."""

from __future__ import annotations

import json
import time

from jalora.cli import run_quietly
from jalora.data.records import SAMPLE_DATA
from jalora.generate.generator import Generator, Sampling
from jalora.train.finetune import finetune

HELD_OUT = SAMPLE_DATA.with_name("dolly_ja_heldout.jsonl")


def held_out_questions(n: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in HELD_OUT.read_text(encoding="utf-8").splitlines()]
    short = [r for r in rows if not r["input"] and len(r["output"]) < 80]
    return [(r["instruction"], r["input"]) for r in short[:n]]


def show(title: str, generator: Generator, questions: list[tuple[str, str]], sampling: Sampling) -> None:
    print(f"\n=== {title} ===")
    for (question, _), answer in zip(questions, generator.answer(questions, sampling)):
        print(f"Q: {question}\nA: {answer.strip()}\n")


def short_run(output_dir: str, max_steps: int, cutoff_len: int = 256) -> dict:
    """The CPU recipe of `make demo` and bench/real_model.py: SmolLM2 on the sample, scored on the held-out file."""
    return finetune(
        base_model="smollm2",
        data_path=str(SAMPLE_DATA),
        val_data_path=str(HELD_OUT),
        output_dir=output_dir,
        batch_size=4,
        micro_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-3,
        cutoff_len=cutoff_len,
        lora_r=16,
        lora_alpha=32,
        save_steps=max_steps,
        eval_steps=max_steps,
        logging_steps=10,
        overwrite_output_dir=True,
    )


def demo(output_dir: str = "demo-out", max_steps: int = 40, questions: int = 3) -> None:
    """Answers before, a short LoRA run with held-out loss before/after, answers after."""
    started = time.time()
    asked = held_out_questions(questions)
    sampling = Sampling(max_new_tokens=48, repetition_penalty=1.1)
    show("base model (SmolLM2-135M-Instruct)", Generator.load(base_model="smollm2"), asked, sampling)
    record = short_run(output_dir, max_steps)
    show(f"after {max_steps} LoRA steps", Generator.load(output_dir), asked, sampling)
    m = record["metrics"]
    drop = 100 * (1 - m["eval_loss"] / m["eval_loss_before"])
    print(f"held-out loss: {m['eval_loss_before']:.3f} -> {m['eval_loss']:.3f} ({drop:.0f}% lower)")
    print(f"adapter in {output_dir}/; total {time.time() - started:.0f} s")
    print(f"try: python generate.py --lora_weights {output_dir} --prompt '日本で一番高い山は？'")


if __name__ == "__main__":
    run_quietly(demo)
