"""Instruction records: read and validate, then tokenize with exact prompt/response masks.

Every error names the file, the line (or record number) and the field, and is raised before
any model is loaded, so a typo costs seconds, not a training run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jalora.data.prompts import Prompter
from jalora.errors import UserError

DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # the samples that ship with the project
SAMPLE_DATA = DATA_DIR / "dolly_ja_sample.jsonl"
IGNORE_INDEX = -100
# Part of the tokenization cache key: raise it whenever the same records and tokenizer give other ids.
TOKENIZATION_RULES = 2  # 2: answers as the continuation of the joint text; multi-turn cuts at whole turns
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# format name -> (required string fields, optional string fields)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dolly": (("instruction", "output"), ("input", "category", "index")),
    "alpaca": (("instruction", "output"), ("input",)),
    "ichikara": (("text", "output"), ("ID",)),
    "messages": ((), ()),
}


@dataclass
class Record:
    """One training example, whatever format it came from. `where` is "file:line" for errors."""

    instruction: str = ""
    input: str = ""
    output: str = ""
    category: str = ""
    messages: list[dict] = field(default_factory=list)
    where: str = ""


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "text" in row and "instruction" not in row:
        return "ichikara"
    if "instruction" in row:
        return "dolly" if "category" in row else "alpaca"
    return None


def iter_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(location, row) pairs from a local file; location is 'file:line' or 'file: record N'."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read data file: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: data file is empty")
    suffix = path.suffix
    if suffix == ".csv":
        # keepends: quoted fields may hold newlines (ELYZA-tasks-100 does); report the line a record starts on
        reader = csv.DictReader(text.splitlines(keepends=True))
        start = 2
        for row in reader:
            yield f"{path}:{start}", row
            start = reader.line_num + 1
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}: record {i}", row
        return
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path}: record {i}", row
        return
    if suffix == ".jsonl" and stripped.startswith("["):
        raise UserError(
            f"{path}:1: expected JSON lines (one object per line) but the file is a JSON array; rename it to .json"
        )
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            whole = _single_document(path, text)
            raise UserError(whole or f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None


def _single_document(path: Path, text: str) -> str | None:
    """A file that fails as JSON lines may be one JSON object over many lines (arrays are caught earlier)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    under = ", ".join(repr(key) for key, value in document.items() if isinstance(value, list))
    hint = f"; the records seem to be under {under}: save that list instead" if under else ""
    return (
        f"{path}:1: the file is one JSON object over several lines; expected a JSON array of records (.json) "
        f"or one record per line (.jsonl){hint}"
    )


def _hub_rows(dataset_id: str) -> Iterator[tuple[str, object]]:
    from datasets import load_dataset

    for i, row in enumerate(load_dataset(dataset_id, split="train"), start=1):
        yield f"{dataset_id}: record {i}", row


def _string_field(row: dict, name: str, where: str, required: bool) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise UserError(f"{where}: field {name!r} is missing")
        return ""
    if not isinstance(value, str):
        if name in ("index", "ID") and isinstance(value, int):
            return str(value)
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: field {name!r} is empty")
    return value


def _messages(row: dict, where: str) -> list[dict]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{where}: field 'messages[{i}].role' must be system, user or assistant")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{where}: field 'messages[{i}].content' must be a non-empty string")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: field 'messages' has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_record(row: object, where: str, data_format: str | None) -> Record:
    """Validate one raw row and normalise it to a Record."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fmt = data_format or detect_format(row)
    if fmt is None:
        raise UserError(
            f"{where}: data format not recognised from fields {sorted(row)}; expected dolly/alpaca "
            "(instruction, input, output), ichikara (text, output) or chat (messages)"
        )
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "messages":
        if "messages" not in row:
            raise UserError(f"{where}: field 'messages' is missing")
        return Record(messages=_messages(row, where), where=where)
    required, optional = FORMATS[fmt]
    values = {name: _string_field(row, name, where, True) for name in required}
    values |= {name: _string_field(row, name, where, False) for name in optional}
    return Record(
        instruction=values.get("instruction") or values.get("text", ""),
        input=values.get("input", ""),
        output=values["output"],
        category=values.get("category", ""),
        where=where,
    )


def is_local(data_path: str) -> bool:
    return data_path.endswith(LOCAL_SUFFIXES) or Path(data_path).exists()


def read_rows(data_path: str) -> Iterator[tuple[str, object]]:
    """(location, row) pairs of a local file or hub dataset, whatever the training stage."""
    if not is_local(data_path):
        return _hub_rows(data_path)
    path = Path(data_path)
    if not path.is_file():
        raise UserError(f"{data_path}: data file not found")
    if path.suffix not in LOCAL_SUFFIXES:
        plain_text = " (plain text trains with --stage pt)" if path.suffix == ".txt" else ""
        raise UserError(f"{data_path}: unsupported file type; use .json, .jsonl, .csv or .parquet{plain_text}")
    return iter_rows(path)


def load_records(data_path: str, data_format: str | None = None) -> list[Record]:
    """All records of a local file or hub dataset, validated. The format is detected from the
    first record's fields unless given, and every record must have that format."""
    records: list[Record] = []
    for where, row in read_rows(data_path):
        if data_format is None and isinstance(row, dict):
            data_format = detect_format(row)
        records.append(to_record(row, where, data_format))
    if not records:
        raise UserError(f"{data_path}: no records found")
    return records


def fingerprint(data_path: str) -> str:
    """sha256 of a local data file (or the dataset id for hub data), for the run record."""
    path = Path(data_path)
    if not path.is_file():
        return f"hub:{data_path}"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def split_records(records: list[Record], val_set_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Shuffle with the seed and hold out `val_set_size` records (a count, or a fraction below 1)."""
    n_val = int(round(val_set_size * len(records))) if 0 < val_set_size < 1 else int(val_set_size)
    if n_val < 0:
        raise UserError(f"--val_set_size must be ≥ 0, got {val_set_size}")
    if n_val >= len(records):
        raise UserError(
            f"--val_set_size {val_set_size} holds out {n_val} records but the data has only {len(records)}; "
            "use a smaller number or a fraction such as 0.05"
        )
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_val:], shuffled[:n_val]


@dataclass
class TokenizeStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0


Segments = list[tuple[str, bool]]


def _segments(record: Record, prompter: Prompter) -> Segments:
    """(text, is_supervised) pieces of one record, in order; the supervised ones as the template writes them."""
    answer = None if record.messages else prompter.answer_text(record.output)
    if answer is not None:
        return [(prompter.render(record.instruction, record.input), False), (answer, True)]
    messages = record.messages or [
        {"role": "user", "content": prompter.user_message(record.instruction, record.input)},
        {"role": "assistant", "content": record.output},
    ]
    try:
        return prompter.chat_segments(messages)
    except UserError as err:
        raise UserError(f"{record.where}: {err}") from None


def segment_ids(segments: list[Segments], prompter: Prompter, add_eos_token: bool) -> list[list[list[int]]]:
    """Token ids of every piece, batched: the first piece of a record as generation encodes a prompt,
    each later one as the continuation of the record's text before it (`Prompter.encode_after`),
    where the text before an answer's successor holds the eos written after the answer."""
    eos_text = prompter.tokenizer.eos_token if add_eos_token else ""
    contexts, texts = [], []
    for segs in segments:
        context = ""
        for j, (text, supervised) in enumerate(segs):
            if j:
                contexts.append(context)
                texts.append(text)
            context += text + (eos_text if supervised else "")
    firsts = iter(prompter.encode([segs[0][0] for segs in segments], first=True))
    rest = iter(prompter.encode_after(contexts, texts))
    return [[next(firsts) if j == 0 else next(rest) for j in range(len(segs))] for segs in segments]


def tokenize_records(
    records: list[Record],
    prompter: Prompter,
    cutoff_len: int,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> tuple[list[dict], TokenizeStats]:
    """Token ids and labels for each record.

    An example is `prompt_ids + answer_ids + [eos]` (per assistant turn), where the prompt ids are
    those generation feeds and the answer ids those the joint text `prompt + answer` has after
    them, so the mask boundary is exact and no id appears that the joint text lacks. Labels are
    masked by position, never by token id. Too long an example is cut back to its last complete
    answer (with its eos); when not even the first answer fits, that answer is cut and still ends
    with eos. A record whose first answer has no token within `cutoff_len` is dropped and counted.
    """
    segments = [_segments(r, prompter) for r in records]
    eos = prompter.tokenizer.eos_token_id
    stats = TokenizeStats()
    examples = []
    for record, segs, pieces in zip(records, segments, segment_ids(segments, prompter, add_eos_token)):
        input_ids: list[int] = []
        supervised: list[bool] = []
        turn_ends = []  # positions just after each complete answer (and its eos)
        for (_, is_response), ids in zip(segs, pieces):
            if is_response and add_eos_token:
                ids = [*ids, eos]
            input_ids += ids
            supervised += [is_response] * len(ids)
            if is_response:
                turn_ends.append(len(input_ids))
        if len(input_ids) > cutoff_len:
            complete = [end for end in turn_ends if end <= cutoff_len]
            if complete:
                input_ids, supervised = input_ids[: complete[-1]], supervised[: complete[-1]]
            else:  # cut inside the first answer, keeping its eos last
                tail = [eos] if add_eos_token else []
                keep = cutoff_len - len(tail)
                if not any(supervised[:keep]):
                    stats.dropped += 1
                    continue
                input_ids = input_ids[:keep] + tail
                supervised = supervised[:keep] + [True] * len(tail)
            stats.truncated += 1
        labels = [t if (s or train_on_inputs) else IGNORE_INDEX for t, s in zip(input_ids, supervised)]
        examples.append({"input_ids": input_ids, "labels": labels, "category": record.category})
        stats.kept += 1
    return examples, stats
