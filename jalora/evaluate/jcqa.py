"""`jalora evaluate --tasks jcommonsenseqa`: JGLUE's five-choice commonsense questions, scored by
log-likelihood.

Each choice is scored as the summed log-probability of its tokens after the prompt; the
prediction is the highest score (lm-evaluation-harness's `acc`), and `acc_norm` divides each
score by the choice's length in characters first, as the harness does. The plain prompt is
the Japanese harness's JCommonsenseQA prompt version 0.2.1; `--use_template` puts the same
question inside the run's own instruction/chat template, for instruction-tuned adapters.
A small scorer of our own instead of lm-evaluation-harness: the harness is not a dependency,
knows nothing of the run's template, BOS or `<NL>` rules, and cannot switch the adapter off.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jalora.data.records import iter_rows
from jalora.errors import UserError
from jalora.generate.generator import Generator
from jalora.outputs import read_run_record, write_atomic

TASK = "jcommonsenseqa"
HUB_DATASET = "sbintuitions/JCommonsenseQA"  # JGLUE's rows as parquet: train / validation splits
CHOICES = tuple(f"choice{i}" for i in range(5))
FIELDS = ("q_id", "question", *CHOICES, "label")
# Prompt version 0.2.1 of the Japanese lm-evaluation-harness task (trailing space included).
DESCRIPTION = "与えられた選択肢の中から、最適な答えを選んでください。 \n\n"
INSTRUCTION = "与えられた選択肢の中から、最適な答えを選んでください。"
FEWSHOT_SEED = 1234  # the harness's seed for drawing few-shot examples
DEFAULT_OUTPUT = "jcommonsenseqa_predictions.jsonl"


# --- questions ------------------------------------------------------------------------------
def check_question(where: str, row: object) -> dict:
    """One row in JGLUE's schema, or a UserError naming the place and the field."""
    schema = f"JCommonsenseQA rows have {', '.join(FIELDS)}"
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object ({schema})")
    if not isinstance(row.get("q_id"), (int, str)) or isinstance(row.get("q_id"), bool):
        raise UserError(f"{where}: field 'q_id' is missing or not a number/string ({schema})")
    for name in ("question", *CHOICES):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise UserError(f"{where}: field {name!r} is missing or not a non-empty string ({schema})")
    label = row.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(CHOICES):
        raise UserError(f"{where}: field 'label' must be an integer 0-4, got {label!r}")
    return {name: row[name] for name in FIELDS}


def read_questions(data_path: str) -> list[dict]:
    """Questions of a local JSON-lines file (JGLUE's own train/valid-v1.x.json files are JSON lines)."""
    path = Path(data_path)
    if not path.is_file():
        raise UserError(f"{data_path}: JCommonsenseQA file not found")
    questions = [check_question(where, row) for where, row in iter_rows(path)]
    ids = [q["q_id"] for q in questions]
    if len(set(ids)) != len(ids):
        raise UserError(f"{data_path}: q_id values are not unique")
    return questions


def hub_questions(split: str) -> list[dict]:
    """A split of the hub copy of JCommonsenseQA (needs a network connection)."""
    import datasets

    try:
        rows = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as err:  # offline, renamed, gated: all end the same way for the user
        raise UserError(
            f"cannot load {HUB_DATASET} ({split}) from the hub: {type(err).__name__}; "
            "pass --data_path with JGLUE's valid-v1.x.json (JSON lines) instead"
        ) from None
    return [check_question(f"{HUB_DATASET} ({split}) row {i}", row) for i, row in enumerate(rows, start=1)]


def answer(question: dict) -> str:
    return question[CHOICES[question["label"]]]


# --- prompts --------------------------------------------------------------------------------
def question_text(question: dict) -> str:
    """`質問：…` and the five choices as a list, one per line."""
    choices = "\n".join(f"- {question[c]}" for c in CHOICES)
    return f"質問：{question['question']}\n選択肢：\n{choices}"


def solved(shots: list[dict]) -> str:
    """Few-shot examples with their answers, each followed by a blank line."""
    return "".join(f"{question_text(s)}\n回答：{answer(s)}\n\n" for s in shots)


def plain_prompt(question: dict, shots: list[dict]) -> str:
    """The harness's prompt: description, solved examples, the question, then `回答：`."""
    return f"{DESCRIPTION}{solved(shots)}{question_text(question)}\n回答："


def instruction(question: dict, shots: list[dict] = ()) -> str:
    """The instruction for template scoring and for training records: the task, solved
    examples, then the question; the answer is the template's response."""
    return f"{INSTRUCTION}\n\n{solved(list(shots))}{question_text(question)}"


def instruction_records(questions: list[dict]) -> list[dict]:
    """Training records (dolly schema) that teach an adapter to answer with the choice's text."""
    return [
        {"index": str(q["q_id"]), "instruction": instruction(q), "input": "", "output": answer(q), "category": TASK}
        for q in questions
    ]


def draw_shots(questions: list[dict], pool: list[dict], k: int, seed: int = FEWSHOT_SEED) -> list[list[dict]]:
    """k examples per question from the pool, never the question itself; one seeded draw per
    question in order, so a run is reproducible."""
    if k <= 0:
        return [[] for _ in questions]
    if len(pool) <= k:
        raise UserError(f"--num_fewshot {k} needs more than {k} questions to draw examples from; got {len(pool)}")
    rng = random.Random(seed)
    drawn = []
    for q in questions:
        candidates = rng.sample(pool, k + 1)
        drawn.append([s for s in candidates if s["q_id"] != q["q_id"]][:k])
    return drawn


# --- scoring --------------------------------------------------------------------------------
def choice_requests(prompter, contexts: list[str], questions: list[dict]) -> list[tuple[list[int], int]]:
    """(ids of prompt + choice, where the choice's ids start) for every choice of every question.

    The choice's ids are those of the joint text: the scored part starts where the joint ids
    stop agreeing with the prompt's own ids, so a token merged across the boundary is scored
    rather than split.
    """
    texts = [ctx + q[c] for ctx, q in zip(contexts, questions) for c in CHOICES]
    joint = prompter.encode(texts)
    alone = prompter.encode(contexts)
    requests = []
    for i, ids in enumerate(joint):
        ctx = alone[i // len(CHOICES)]
        start = next((j for j, (a, b) in enumerate(zip(ctx, ids)) if a != b), min(len(ctx), len(ids)))
        requests.append((ids, max(1, min(start, len(ids) - 1))))
    return requests


@torch.inference_mode()
def choice_logprobs(model, requests: list[tuple[list[int], int]], pad_token_id: int) -> list[float]:
    """Summed log-probability of ids[start:] given ids[:start] for every request, the requests
    coming in groups of five (one question's choices, which share the prompt).

    The prompt of each question runs once, left-padded with explicit position ids; its key/value
    cache is then repeated for the five choices, which run as a short right-padded batch. Scoring
    every choice with its whole prompt would cost five times as much.
    """
    n = len(CHOICES)
    groups = [requests[i : i + n] for i in range(0, len(requests), n)]
    prefixes = [group[0][0][: min(start for _, start in group)] for group in groups]  # shared by the five
    device = next(model.parameters()).device
    width = max(map(len, prefixes))
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prefixes], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
    out = model(
        input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    cache, last = out.cache, out.logits[:, -1].repeat_interleave(n, dim=0)
    cache.batch_repeat_interleave(n)
    suffixes = [ids[len(prefixes[i // n]) :] for i, (ids, _) in enumerate(requests)]
    longest = max(map(len, suffixes))
    suffix_ids = torch.tensor([s + [pad_token_id] * (longest - len(s)) for s in suffixes], device=device)
    suffix_mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in suffixes], device=device)
    lengths = torch.tensor([len(prefixes[i // n]) for i in range(len(requests))], device=device)
    logits = model(
        input_ids=suffix_ids,
        attention_mask=torch.cat([mask.repeat_interleave(n, dim=0), suffix_mask], dim=1),
        position_ids=lengths[:, None] + torch.arange(longest, device=device),
        cache=cache,
    ).logits
    scores = []
    for row, (_, start) in enumerate(requests):
        suffix = suffixes[row]
        # row k predicts suffix[k]: the prompt's last logits, then the choice's own
        predicted = torch.cat([last[row : row + 1], logits[row, : len(suffix) - 1]]).float()
        scored = start - len(prefixes[row // n])
        logprobs = torch.log_softmax(predicted[scored:], dim=-1)
        targets = torch.tensor(suffix[scored:], device=device)
        scores.append(logprobs.gather(1, targets[:, None]).sum().item())
    return scores


def score_questions(generator: Generator, contexts: list[str], questions: list[dict], batch_size: int) -> list[list]:
    """Five scores per question, `batch_size` questions per forward pass."""
    scores: list[list[float]] = []
    pad = generator.tokenizer.pad_token_id
    with tqdm(total=len(questions), unit="question", desc=TASK) as bar:
        for start in range(0, len(questions), batch_size):
            chunk = slice(start, start + batch_size)
            requests = choice_requests(generator.prompter, contexts[chunk], questions[chunk])
            flat = choice_logprobs(generator.model, requests, pad)
            scores += [flat[i : i + len(CHOICES)] for i in range(0, len(flat), len(CHOICES))]
            bar.update(len(questions[chunk]))
    return scores


def predictions(question: dict, scores: list[float]) -> tuple[int, int]:
    """(argmax of the scores, argmax of the scores per character of the choice)."""
    per_char = [s / len(question[c]) for s, c in zip(scores, CHOICES)]
    return max(range(len(scores)), key=scores.__getitem__), max(range(len(scores)), key=per_char.__getitem__)


def accuracy(rows: list[dict], field: str = "pred") -> float:
    """Share of rows whose `field` equals their label; the printed figure comes from the rows."""
    return sum(r[field] == r["label"] for r in rows) / len(rows)


def prediction_rows(
    generator: Generator, questions: list[dict], contexts: list[str], batch_size: int, compare_base: bool
) -> list[dict]:
    """One row per question: q_id, label, pred, pred_norm, scores (and base_* with compare_base)."""
    variants = [("", contextlib.nullcontext)]
    if compare_base:
        variants.append(("base_", generator.adapter_disabled))
    rows = [{"q_id": q["q_id"], "label": q["label"]} for q in questions]
    for prefix, context in variants:
        with context():
            all_scores = score_questions(generator, contexts, questions, batch_size)
        for row, q, scores in zip(rows, questions, all_scores):
            pred, pred_norm = predictions(q, scores)
            row.update({f"{prefix}pred": pred, f"{prefix}pred_norm": pred_norm, f"{prefix}scores": scores})
    return rows


def summary(rows: list[dict], compare_base: bool) -> dict:
    models = [("adapter" if compare_base else "model", "")] + ([("base", "base_")] if compare_base else [])
    return {
        name: {"acc": accuracy(rows, f"{p}pred"), "acc_norm": accuracy(rows, f"{p}pred_norm")} for name, p in models
    }


def evaluate_jcqa(
    lora_weights: str | None = None,
    base_model: str | None = None,
    data_path: str | None = None,
    num_fewshot: int = 0,
    fewshot_path: str | None = None,
    use_template: bool | None = None,
    output_file: str | None = None,
    batch_size: int = 4,
    compare_base: bool = False,
    quantization: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Accuracy on JCommonsenseQA; see docs/evaluation.md for the prompt and the scores."""
    if not lora_weights and not base_model:
        raise UserError("--tasks jcommonsenseqa needs --lora_weights ADAPTER or --base_model MODEL")
    if compare_base and not lora_weights:
        raise UserError("--compare_base needs --lora_weights (an adapter to compare the base model with)")
    if batch_size < 1 or num_fewshot < 0:
        raise UserError("--batch_size must be at least 1 and --num_fewshot at least 0")
    use_template = bool(lora_weights) if use_template is None else str(use_template).lower() in ("true", "1")
    questions = read_questions(data_path) if data_path else hub_questions("validation")
    pool = []
    if num_fewshot:
        pool = read_questions(fewshot_path) if fewshot_path else questions if data_path else hub_questions("train")
    record = read_run_record(lora_weights) if lora_weights else {}
    generator = Generator.load(
        lora_weights=lora_weights,
        base_model=base_model,
        quantization=quantization or record.get("quantization"),
        trust_remote_code=trust_remote_code,
    )
    shots = draw_shots(questions, pool, num_fewshot)
    if use_template:
        contexts = [generator.prompter.render(instruction(q, s)) for q, s in zip(questions, shots)]
        prompt_format = f"template:{generator.prompter.template.name}"
    else:
        contexts = [plain_prompt(q, s) for q, s in zip(questions, shots)]
        prompt_format = "plain"
    rows = prediction_rows(generator, questions, contexts, batch_size, compare_base)
    for row in rows:
        row.update(prompt_format=prompt_format, num_fewshot=num_fewshot)
    result = {"task": TASK, "questions": len(rows), "num_fewshot": num_fewshot, "prompt_format": prompt_format}
    result.update(summary(rows, compare_base))
    out = output_file or (str(Path(lora_weights) / DEFAULT_OUTPUT) if lora_weights else None)
    if out:
        write_atomic(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        result["output_file"] = out
    print(format_summary(result))
    return result


def format_summary(result: dict) -> str:
    head = f"{TASK}: {result['questions']} questions, {result['num_fewshot']}-shot, prompt {result['prompt_format']}"
    lines = [head]
    for name in ("model", "adapter", "base"):
        if name in result:
            lines.append(f"  {name:<8} accuracy {result[name]['acc']:.4f}  acc_norm {result[name]['acc_norm']:.4f}")
    if "output_file" in result:
        lines.append(f"  predictions in {result['output_file']}")
    return "\n".join(lines)
