"""`jalora evaluate`: is the adapter better than its base model?

Two kinds of evidence. Held-out loss and perplexity on answer tokens, overall and per dolly
category, for the adapter and (with --compare_base) for the same model with the adapter
switched off: one load, identical tokens, so the difference is the adapter alone. And, for
ELYZA-tasks-100 style files, batch-generated answers written to JSONL for human or LLM-judge
scoring, since loss says little about open-ended answers.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from jalora.data.collate import PadCollator
from jalora.data.pretrain import load_documents, tokenize_documents
from jalora.data.records import (
    DATA_DIR,
    IGNORE_INDEX,
    TokenizeStats,
    fingerprint,
    iter_rows,
    load_records,
    tokenize_records,
)
from jalora.errors import UserError, friendly_errors
from jalora.evaluate.card import score_rows, write_model_card
from jalora.evaluate.jcqa import evaluate_jcqa
from jalora.generate.generator import Generator, Sampling
from jalora.outputs import RUN_RECORD, read_run_record, write_atomic, write_json
from jalora.quiet import quiet_third_party

HELD_OUT_DATA = DATA_DIR / "dolly_ja_heldout.jsonl"
TASKS_DATA = DATA_DIR / "elyza_tasks_sample.jsonl"
TASKS = ("elyza-tasks-100", "jcommonsenseqa")
TASK_FIELDS = ("input", "output", "eval_aspect")
NO_CATEGORY = "uncategorized"


@torch.inference_mode()
def answer_token_nll(model, examples: list[dict], pad_token_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, number of answer tokens) per example, in input order.

    Examples are batched by length to waste little on padding; padding and prompt tokens
    carry label -100 and count for nothing.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    collate = PadCollator(pad_token_id)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        for row, i in enumerate(chunk):
            results[i] = (nll[row].sum().item(), int((labels[row] != IGNORE_INDEX).sum()))
    return results


def _score(nll: float, tokens: int, examples: int) -> dict:
    loss = nll / tokens if tokens else float("nan")
    perplexity = math.exp(loss) if tokens else float("nan")
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens, "examples": examples}


def summarize(categories: list[str], per_example: list[tuple[float, int]]) -> dict:
    """Token-weighted mean loss (and its exp, perplexity) overall and per category."""
    groups: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for category, scores in zip(categories, per_example):
        groups[category or NO_CATEGORY].append(scores)

    def total(items: list[tuple[float, int]]) -> dict:
        return _score(sum(n for n, _ in items), sum(t for _, t in items), len(items))

    return {"overall": total(per_example), "by_category": {c: total(v) for c, v in sorted(groups.items())}}


def held_out_scores(generator: Generator, examples: list[dict], batch_size: int, compare_base: bool) -> dict:
    """Scores of the adapter and, if asked, of the base (the same weights, adapter disabled)."""
    categories = [e["category"] for e in examples]
    pad = generator.tokenizer.pad_token_id
    scores = {"adapter": summarize(categories, answer_token_nll(generator.model, examples, pad, batch_size))}
    if compare_base:
        with generator.adapter_disabled():
            scores["base"] = summarize(categories, answer_token_nll(generator.model, examples, pad, batch_size))
    return scores


def format_scores(scores: dict) -> str:
    """The evaluation table as aligned plain text for the terminal."""
    header, rows = score_rows(scores)
    cells = [list(header)] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def record_evaluation(lora_weights: str, data_path: str, result: dict) -> None:
    """Add the result to the run record (atomic rewrite) and redraw the model card from it."""
    folder = Path(lora_weights)
    if not (folder / RUN_RECORD).is_file():
        print(f"{folder} has no {RUN_RECORD} (not a jalora run): results were printed only")
        return
    record = read_run_record(lora_weights)
    record.setdefault("evaluations", {})[data_path] = result
    write_json(folder / RUN_RECORD, record)
    write_model_card(folder, record)
    print(f"added to {folder / RUN_RECORD} and {folder / 'README.md'}")


def read_tasks(data_path: str) -> list[dict]:
    """Rows of an ELYZA-tasks-100 style file (CSV or JSONL: input, output, eval_aspect)."""
    path = Path(data_path)
    if not path.is_file():
        raise UserError(f"{data_path}: tasks file not found")
    if path.suffix not in (".csv", ".jsonl", ".json"):
        raise UserError(f"{data_path}: unsupported tasks file type; use .csv or .jsonl")
    rows = []
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with fields {', '.join(TASK_FIELDS)}")
        for name in TASK_FIELDS:
            value = row.get(name)
            if name == "input" and (not isinstance(value, str) or not value.strip()):
                raise UserError(f"{where}: field 'input' is missing or empty")
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        rows.append(row)
    if not rows:
        raise UserError(f"{data_path}: no tasks found")
    return rows


def answer_tasks(generator: Generator, rows: list[dict], sampling: Sampling, batch_size: int, compare_base: bool):
    """Each row with `response` (adapter) and, if asked, `base_response` added; other fields kept."""
    variants = [("response", contextlib.nullcontext)]
    if compare_base:
        variants.append(("base_response", generator.adapter_disabled))
    answered = [dict(row) for row in rows]
    for start in range(0, len(rows), batch_size):
        chunk = answered[start : start + batch_size]
        for field, context in variants:
            with context():
                answers = generator.answer([(row["input"], "") for row in chunk], sampling)
            for row, answer in zip(chunk, answers):
                row[field] = answer
        print(f"answered {min(start + batch_size, len(rows))}/{len(rows)} tasks")
    return answered


@friendly_errors
def evaluate(
    lora_weights: str | None = None,
    data_path: str | None = None,
    tasks: str | None = None,
    compare_base: bool = False,
    output_file: str | None = None,
    batch_size: int = 4,
    cutoff_len: int | None = None,
    base_model: str | None = None,
    quantization: str | None = None,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int = 0,
    trust_remote_code: bool = False,
    num_fewshot: int = 0,
    fewshot_path: str | None = None,
    use_template: bool | None = None,
    verbose: bool = False,
) -> dict:
    """Held-out loss/perplexity of an adapter (default), answers to an ELYZA-tasks-100 file, or
    JCommonsenseQA accuracy.

    Loss mode: --data_path is dolly-style JSONL (default: the bundled held-out set); the loss
    covers answer tokens only (prompts are never scored); for a pt run it is held-out text
    (.txt or JSONL `text`) and every token counts, cut at the run's cutoff_len, and
    is written into the run record and model card. Tasks mode (--tasks elyza-tasks-100):
    answers go to --output_file (default: ADAPTER/elyza_tasks_answers.jsonl), greedy unless
    --temperature is set. The base model loads as in training (the run's quantization).
    --tasks jcommonsenseqa (also with --base_model alone): multiple-choice accuracy by
    log-likelihood, --num_fewshot examples from --fewshot_path, --use_template to score inside
    the run's template (default: on with an adapter); see docs/evaluation.md.
    --verbose shows the libraries' warnings and log lines.
    """
    quiet_third_party(verbose)
    if tasks is not None and tasks not in TASKS:
        raise UserError(f"unknown --tasks {tasks!r}; choose one of: {', '.join(TASKS)}")
    if tasks == "jcommonsenseqa":
        return evaluate_jcqa(
            lora_weights=lora_weights, base_model=base_model, data_path=data_path, num_fewshot=num_fewshot,
            fewshot_path=fewshot_path, use_template=use_template, output_file=output_file, batch_size=batch_size,
            compare_base=compare_base, quantization=quantization, trust_remote_code=trust_remote_code,
        )  # fmt: skip
    if not lora_weights:
        raise UserError("--lora_weights is required (the adapter folder to evaluate)")
    record = read_run_record(lora_weights)
    pretraining = record.get("stage") == "pt" and not tasks
    if pretraining and data_path is None:
        raise UserError(f"{lora_weights} is a pt run: pass --data_path held-out text (.txt, or JSONL with 'text')")
    data_path = str(data_path or (TASKS_DATA if tasks else HELD_OUT_DATA))
    if tasks:
        rows = read_tasks(data_path)
        sampling = Sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
    else:
        records = load_documents(data_path) if pretraining else load_records(data_path)
    generator = Generator.load(
        lora_weights=lora_weights,
        base_model=base_model,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
    )
    if tasks:
        note = generator.settings_note(sampling)
        if note:
            print(note, file=sys.stderr)
        answered = answer_tasks(generator, rows, sampling, batch_size, compare_base)
        out = Path(output_file or Path(lora_weights) / "elyza_tasks_answers.jsonl")
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answered).encode("utf-8"))
        print(f"wrote {len(answered)} answers to {out}")
        return {"output_file": str(out), "answers": len(answered)}

    cutoff = cutoff_len or record.get("cutoff_len", 512)
    if pretraining:  # every token of the text is scored, as in training
        examples, stats = tokenize_documents(records, generator.prompter, cutoff), TokenizeStats()
    else:
        examples, stats = tokenize_records(
            records, generator.prompter, cutoff, False, record.get("add_eos_token", True)
        )
    if not examples:
        raise UserError(f"{data_path}: every record's prompt is longer than cutoff_len {cutoff}")
    result = {
        "fingerprint": fingerprint(data_path),
        "cutoff_len": cutoff,
        "records_truncated": stats.truncated,
        "records_dropped": stats.dropped,
        **held_out_scores(generator, examples, batch_size, compare_base),
    }
    print(format_scores({m: result[m] for m in ("adapter", "base") if m in result}))
    record_evaluation(lora_weights, data_path, result)
    return result
