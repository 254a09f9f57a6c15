"""Which data each training stage takes, checked on the first record before anything is loaded.

SFT trains on instructions (instruction/output, messages), continued pre-training (`pt`) on plain
text (.txt or a `text` field), DPO and ORPO on preference pairs (chosen/rejected). Data of the
wrong kind fails with one line naming the record and the stage it would fit.
"""

from __future__ import annotations

from pathlib import Path

from jalora.data.records import read_rows
from jalora.errors import UserError

STAGES = ("sft", "pt", "dpo", "orpo")
PREFERENCE_STAGES = ("dpo", "orpo")
TEXT_SUFFIX = ".txt"

KINDS = {
    "instructions": ("an instruction record (instruction/output or messages)", "sft"),
    "text": ("plain text (a .txt file or a 'text' field)", "pt"),
    "pairs": ("a preference pair (chosen/rejected)", "dpo or orpo"),
}
STAGE_KIND = {"sft": "instructions", "pt": "text", "dpo": "pairs", "orpo": "pairs"}


def row_kind(row: object) -> str:
    """The kind of data one raw row is (a non-object row is left to the stage's own checks)."""
    if not isinstance(row, dict):
        return "unknown"
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "text" in row and not {"output", "instruction", "messages"} & row.keys():
        return "text"
    return "instructions"


def check_data_fits_stage(data_path: str, stage: str) -> None:
    """Refuse data of another stage's kind, naming its first record."""
    if Path(data_path).suffix == TEXT_SUFFIX:
        if stage == "sft":
            return  # the SFT reader names the file type and the stage that reads .txt
        where, kind = f"{data_path}:1", "text"
    else:
        where, row = next(iter(read_rows(data_path)), (data_path, None))
        kind = row_kind(row)
    expected = STAGE_KIND[stage]
    if kind in KINDS and kind != expected:
        what, fits = KINDS[kind]
        raise UserError(
            f"{where}: this is {what}, but --stage {stage} trains on {KINDS[expected][0]}; "
            f"use --stage {fits} for this data"
        )
