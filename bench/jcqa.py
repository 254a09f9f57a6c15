"""JCommonsenseQA accuracy of a base model (default: jalora's embedded default) before and after a LoRA
run on JCommonsenseQA training questions turned into instruction records (question + choices -> answer text).

    python bench/jcqa.py --train_file train-v1.3.json --valid_file valid-v1.3.json --num_fewshot 0,3

The JGLUE files are JSON lines (github.com/yahoojapan/JGLUE, datasets/jcommonsenseqa-v1.x/,
CC BY-SA 4.0); they are not shipped with jalora. Without them the bench runs on the bundled
self-written sample (training and scoring on the same questions, a smoke test only). Scores: the base
model with the harness's plain prompt (`--num_fewshot` examples drawn from the train file, one count or
several), then base (adapter switched off) and adapter inside the run's template, 0-shot, on every valid
question; chance is 0.2. Every accuracy comes with a 95 % Wilson interval, and the adapter's gain over
the base in the same prompt with a paired interval (see `paired_gain`).
"""

from __future__ import annotations

import glob
import json
import sys
import time
from pathlib import Path

from jcqa_stats import correct, error_profile, paired_gain, scored

from jalora.cli import run_quietly
from jalora.data.records import SAMPLE_DATA
from jalora.errors import UserError
from jalora.evaluate.jcqa import (
    draw_shots,
    evaluate_jcqa,
    instruction,
    instruction_records,
    plain_prompt,
    prediction_rows,
    read_questions,
)
from jalora.generate.generator import Generator
from jalora.model.loading import DEFAULT_BASE_MODEL
from jalora.train.finetune import finetune

SAMPLE = SAMPLE_DATA.with_name("jcqa_sample.jsonl")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- resumable scoring -----------------------------------------------------------------------
def score_resumably(
    output_file: str,
    valid_file: str,
    base_model: str | None = None,
    lora_weights: str | None = None,
    prompt_template_name: str | None = None,
    use_template: bool | None = None,
    compare_base: bool = True,
    num_fewshot: int = 0,
    fewshot_file: str | None = None,
    start: int = 0,
    stop: int | None = None,
    chunk: int = 20,
    batch_size: int = 4,
) -> int:
    """Score questions[start:stop] like `jalora evaluate --tasks jcommonsenseqa` (plain prompt for a
    base model, the template with `--use_template`; for `lora_weights` the run's template, adapter and,
    unless `--compare_base False`, base), appending rows to output_file every `chunk` questions and
    skipping q_ids already there. `base_model` and `prompt_template_name` override the run record
    (a checkpoint folder has none).

    Why not evaluate_jcqa itself: on a shared 2-core CPU the whole split takes hours and a killed
    run would lose everything; here a stopped run keeps what it scored, a restart continues, and
    several processes can take disjoint slices. Few-shot examples are drawn over the whole split
    first, so every question gets the examples evaluate_jcqa would give it. Returns rows written.
    """
    questions = read_questions(valid_file)
    shots = draw_shots(questions, read_questions(fewshot_file) if num_fewshot else [], num_fewshot)
    out = Path(output_file)
    done = {r["q_id"] for r in read_rows(out)} if out.exists() else set()
    todo = [i for i in range(len(questions))[start:stop] if questions[i]["q_id"] not in done]
    if not todo:
        return 0
    generator = Generator.load(
        lora_weights=lora_weights, base_model=base_model, prompt_template_name=prompt_template_name
    )
    if use_template is None:
        use_template = bool(lora_weights)
    if use_template:
        contexts = [generator.prompter.render(instruction(q, s)) for q, s in zip(questions, shots)]
    else:
        contexts = [plain_prompt(q, s) for q, s in zip(questions, shots)]
    for at in range(0, len(todo), chunk):
        part = todo[at : at + chunk]
        rows = prediction_rows(
            generator, [questions[i] for i in part], [contexts[i] for i in part], batch_size,
            bool(lora_weights) and compare_base,
        )  # fmt: skip
        with out.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r | {"num_fewshot": num_fewshot}, ensure_ascii=False) + "\n" for r in rows))
    return len(todo)


# --- the bench ------------------------------------------------------------------------------
def shot_counts(num_fewshot: int | str | tuple) -> list[int]:
    """`--num_fewshot 3` or `--num_fewshot 0,3` (fire passes the latter as a tuple)."""
    if isinstance(num_fewshot, (tuple, list)):
        return [int(k) for k in num_fewshot]
    return [int(k) for k in str(num_fewshot).split(",") if k.strip()]


def run(
    base_model: str = DEFAULT_BASE_MODEL,
    train_file: str = str(SAMPLE),
    valid_file: str = str(SAMPLE),
    num_fewshot: int | str | tuple = 0,
    train_questions: int = 300,
    valid_questions: int | None = None,
    num_epochs: float = 2,
    max_steps: int = -1,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    lora_r: int = 16,
    cutoff_len: int = 256,
    prompt_template_name: str | None = None,
    adapter: str | None = None,
    output_dir: str = "runs/jcqa",
    plain_base: bool = True,
) -> dict:
    """Train on the first `train_questions` of train_file (or reuse `--adapter DIR`); score the first
    `valid_questions` of valid_file. `--plain_base False` skips the base model's plain-prompt scores."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    valid = read_questions(valid_file)[:valid_questions]
    valid_path = out / "valid.jsonl"
    valid_path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in valid), encoding="utf-8")

    minutes: dict[str, float] = {}
    figures: dict = {"base_model": base_model, "valid_questions": len(valid)}
    for k in shot_counts(num_fewshot) if plain_base else []:
        started = time.time()
        predictions = out / f"base_plain_{k}shot.jsonl"
        evaluate_jcqa(
            base_model=base_model,
            data_path=str(valid_path),
            num_fewshot=k,
            fewshot_path=train_file,
            output_file=str(predictions),
        )
        minutes[f"score_base_plain_{k}shot"] = (time.time() - started) / 60
        rows = read_rows(predictions)
        figures[f"base_plain_{k}shot"] = {"acc": scored(rows, "pred"), "acc_norm": scored(rows, "pred_norm")}

    if adapter is None:
        adapter = str(out / "adapter")
        started = time.time()
        record = train_adapter(
            adapter, base_model, train_file, train_questions, num_epochs, max_steps, learning_rate, batch_size,
            lora_r, cutoff_len, prompt_template_name,
        )  # fmt: skip
        minutes["train"] = (time.time() - started) / 60
        figures["train_questions"] = record["train_questions"]
        figures["train_loss"] = record.get("metrics", {}).get("train_loss")

    started = time.time()
    predictions = out / "template_0shot.jsonl"
    evaluate_jcqa(
        lora_weights=adapter, data_path=str(valid_path), compare_base=True, batch_size=4, output_file=str(predictions)
    )
    minutes["score_base_and_adapter_in_template"] = (time.time() - started) / 60
    figures.update(template_figures(read_rows(predictions), valid))
    figures["minutes"] = {k: round(v, 1) for k, v in minutes.items()}
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=2))
    return figures


def glob_rows(pattern: str) -> list[dict]:
    """The rows of every file matching a glob (the slices of one scoring), in file-name order."""
    rows = [row for path in sorted(glob.glob(pattern)) for row in read_rows(Path(path))]
    if not rows:
        raise UserError(f"{pattern}: no prediction files match")
    return rows


def score_files(valid_file: str, patterns: str, gain_of: str | None = None, over: str | None = None) -> dict:
    """Intervals and error counts of prediction files (`patterns`: globs separated by commas, each glob's
    files taken together), and with `--gain_of ADAPTER_GLOB --over BASE_GLOB` the paired gain on the
    questions both scored."""
    questions = read_questions(valid_file)
    figures = {}
    for name in patterns.split(","):
        rows = glob_rows(name)
        if "base_pred" in rows[0]:
            figures[name] = template_figures(rows, questions)
        else:
            figures[name] = {"acc": scored(rows, "pred"), "acc_norm": scored(rows, "pred_norm"),
                             "errors": error_profile(rows, questions, "pred")}  # fmt: skip
    if gain_of and over:
        old = {r["q_id"]: r for r in glob_rows(over)}
        paired = [
            r | {"base_pred": old[r["q_id"]]["pred"], "base_pred_norm": old[r["q_id"]]["pred_norm"]}
            for r in glob_rows(gain_of)
            if r["q_id"] in old
        ]
        figures[f"{gain_of} over {over}"] = template_figures(paired, questions)
    print(json.dumps(figures, indent=2))
    return figures


def train_adapter(
    output_dir: str,
    base_model: str = DEFAULT_BASE_MODEL,
    train_file: str = str(SAMPLE),
    train_questions: int = 300,
    num_epochs: float = 2,
    max_steps: int = -1,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    lora_r: int = 16,
    cutoff_len: int = 256,
    prompt_template_name: str | None = None,
) -> dict:
    """LoRA on the first `train_questions` of train_file as instruction records; returns the run record."""
    records = instruction_records(read_questions(train_file)[:train_questions])
    train_path = Path(output_dir).with_name(Path(output_dir).name + "-train.jsonl")
    train_path.parent.mkdir(parents=True, exist_ok=True)
    train_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    record = finetune(
        base_model=base_model,
        data_path=str(train_path),
        output_dir=output_dir,
        prompt_template_name=prompt_template_name,
        batch_size=batch_size,
        micro_batch_size=batch_size,
        num_epochs=num_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        warmup_steps=5,
        cutoff_len=cutoff_len,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        val_set_size=0,
        eval_before_training=False,
        logging_steps=5,
        overwrite_output_dir=True,
    )
    return record | {"train_questions": len(records)}


def template_figures(rows: list[dict], questions: list[dict]) -> dict:
    """Base and adapter in the template: accuracies, the paired gain, and the adapter's mistakes."""
    return {
        "base_in_template": {"acc": scored(rows, "base_pred"), "acc_norm": scored(rows, "base_pred_norm")},
        "adapter_in_template": {"acc": scored(rows, "pred"), "acc_norm": scored(rows, "pred_norm")},
        "gain": {
            "acc": paired_gain(correct(rows, "pred"), correct(rows, "base_pred")),
            "acc_norm": paired_gain(correct(rows, "pred_norm"), correct(rows, "base_pred_norm")),
        },
        "adapter_errors": error_profile(rows, questions, "pred"),
        "base_errors": error_profile(rows, questions, "base_pred"),
    }


# `python bench/jcqa.py [--flags]` runs the whole bench; `train`, `slice` and `score` are its parts on their own.
COMMANDS = {"score": score_files, "slice": score_resumably, "train": train_adapter}

if __name__ == "__main__":
    run_quietly(COMMANDS[sys.argv.pop(1)] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else run)
