"""Plain text for continued pre-training (`--stage pt`): documents, their ids, rows packed to cutoff_len.

A .txt file holds documents separated by a blank line; JSONL (or .json/.csv/.parquet) holds one
document per record in a `text` field. No template is applied; each document ends with the
preset's eos; every token is a target. Documents are packed greedily into rows of at most
cutoff_len tokens, and `DocumentPackCollator` hands each document to jalora's `PackCollator` as
its own example, so attention and positions restart at every document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jalora.data.collate import PackCollator
from jalora.data.prompts import Prompter
from jalora.data.records import read_rows
from jalora.data.stages import TEXT_SUFFIX, row_kind
from jalora.errors import UserError


@dataclass
class Document:
    text: str
    where: str = ""


def _txt_documents(path: Path) -> list[Document]:
    try:
        text = path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
    except OSError as err:
        raise UserError(f"{path}: cannot read data file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from None
    documents: list[Document] = []
    lines: list[str] = []
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        if line.strip():
            lines.append(line)
        elif lines:  # a blank line ends the document that started len(lines) lines above
            documents.append(Document("\n".join(lines), f"{path}:{number - len(lines)}"))
            lines = []
    return documents


def _row_document(row: object, where: str) -> Document:
    if row_kind(row) == "pairs":
        raise UserError(f"{where}: this is a preference pair (chosen/rejected); --stage pt trains on plain text")
    if not isinstance(row, dict) or "text" not in row:
        raise UserError(f"{where}: field 'text' is missing (--stage pt reads one document per record)")
    if not isinstance(row["text"], str):
        raise UserError(f"{where}: field 'text' must be a string, got {type(row['text']).__name__}")
    if not row["text"].strip():
        raise UserError(f"{where}: field 'text' is empty")
    return Document(row["text"], where)


def load_documents(data_path: str) -> list[Document]:
    """Every document of a .txt file, or of the `text` field of each record, validated."""
    path = Path(data_path)
    if path.suffix == TEXT_SUFFIX:
        if not path.is_file():
            raise UserError(f"{data_path}: data file not found")
        documents = _txt_documents(path)
    else:
        documents = [_row_document(row, where) for where, row in read_rows(data_path)]
    if not documents:
        raise UserError(f"{data_path}: no text documents found (the file is empty)")
    return documents


def tokenize_documents(documents: list[Document], prompter: Prompter, cutoff_len: int) -> list[dict]:
    """Each document's ids (the preset's BOS rule, eos appended), split into pieces of at most
    cutoff_len tokens; labels are the ids themselves: loss on every token."""
    eos = prompter.tokenizer.eos_token_id
    pieces = []
    for ids in prompter.encode([d.text for d in documents], first=True):
        ids = [*ids, eos]
        for start in range(0, len(ids), cutoff_len):
            piece = ids[start : start + cutoff_len]
            pieces.append({"input_ids": piece, "labels": piece, "category": ""})
    return pieces


def pack_documents(pieces: list[dict], cutoff_len: int) -> list[dict]:
    """Rows of at most cutoff_len tokens filled with whole pieces, in order; `lengths` keeps the
    pieces' boundaries for the collator."""
    rows: list[dict] = []
    for piece in pieces:
        n = len(piece["input_ids"])
        if not rows or len(rows[-1]["input_ids"]) + n > cutoff_len:
            rows.append({"input_ids": [], "labels": [], "lengths": [], "category": ""})
        rows[-1]["input_ids"] += piece["input_ids"]
        rows[-1]["labels"] += piece["labels"]
        rows[-1]["lengths"].append(n)
    return rows


class DocumentPackCollator(PackCollator):
    """Packed rows of documents: every document becomes one example of `PackCollator`."""

    def __call__(self, features: list[dict]) -> dict:
        documents = []
        for row in features:
            start = 0
            for n in row["lengths"]:
                documents.append({k: row[k][start : start + n] for k in ("input_ids", "labels")})
                start += n
        return super().__call__(documents)
