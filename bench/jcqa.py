"""JCommonsenseQA accuracy of SmolLM2-135M-Instruct (embedded GGUF) before and after a LoRA run on
JCommonsenseQA training questions turned into instruction records (question + choices -> answer text).

    python bench/jcqa.py --train_file train-v1.3.json --valid_file valid-v1.3.json

The JGLUE files are JSON lines (github.com/yahoojapan/JGLUE, datasets/jcommonsenseqa-v1.x/,
CC BY-SA 4.0); they are not shipped with jalora. Without them the bench runs on the bundled
self-written sample (training and scoring on the same questions, a smoke test only). Scores: the base
model with the harness's plain prompt, then base (adapter switched off) and adapter inside the run's
chat template, 0-shot, on every valid question; chance is 0.2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jalora.cli import run_quietly
from jalora.data.records import SAMPLE_DATA
from jalora.evaluate.jcqa import evaluate_jcqa, instruction_records, read_questions
from jalora.train.finetune import finetune

SAMPLE = SAMPLE_DATA.with_name("jcqa_sample.jsonl")


def run(
    train_file: str = str(SAMPLE),
    valid_file: str = str(SAMPLE),
    train_questions: int = 300,
    valid_questions: int | None = None,
    num_epochs: float = 2,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    output_dir: str = "runs/jcqa",
    plain_base: bool = True,
) -> dict:
    """Train on the first `train_questions` of train_file; score the first `valid_questions` of valid_file
    (`--plain_base False` skips scoring the base model with the harness's plain prompt)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    valid = read_questions(valid_file)[:valid_questions]
    valid_path = out / "valid.jsonl"
    valid_path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in valid), encoding="utf-8")
    records = instruction_records(read_questions(train_file)[:train_questions])
    train_path = out / "train.jsonl"
    train_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    minutes: dict[str, float] = {}
    figures: dict = {"train_questions": len(records), "valid_questions": len(valid)}
    if plain_base:
        started = time.time()
        plain = evaluate_jcqa(base_model="smollm2", data_path=str(valid_path), output_file=str(out / "plain.jsonl"))
        minutes["score_base_plain"] = (time.time() - started) / 60
        figures["base_plain_prompt"] = plain["model"]

    started = time.time()
    finetune(
        base_model="smollm2",
        data_path=str(train_path),
        output_dir=str(out / "adapter"),
        batch_size=batch_size,
        micro_batch_size=batch_size,
        num_epochs=num_epochs,
        learning_rate=learning_rate,
        warmup_steps=5,
        cutoff_len=256,
        lora_r=16,
        lora_alpha=32,
        val_set_size=0,
        eval_before_training=False,
        logging_steps=10,
        overwrite_output_dir=True,
    )
    minutes["train"] = (time.time() - started) / 60

    started = time.time()
    templated = evaluate_jcqa(
        lora_weights=str(out / "adapter"), data_path=str(valid_path), compare_base=True, batch_size=4
    )
    minutes["score_base_and_adapter_in_template"] = (time.time() - started) / 60
    figures["base_in_template"] = templated["base"]
    figures["adapter_in_template"] = templated["adapter"]
    figures["minutes"] = {k: round(v, 1) for k, v in minutes.items()}
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    run_quietly(run)
