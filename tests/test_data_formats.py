"""Each data format users bring is detected from its fields, or forced with --data_format."""

from __future__ import annotations

import json

import pytest

from jalora.data.records import Record, load_records
from jalora.errors import UserError

ALPACA = {"instruction": "要約して。", "input": "長い文章。", "output": "短い文章。"}
DOLLY = {"index": "0", **ALPACA, "category": "summarization"}
ICHIKARA = {"ID": "ichikara-0001", "text": "要約して。", "output": "短い文章。"}
MESSAGES = {"messages": [{"role": "user", "content": "要約して。"}, {"role": "assistant", "content": "短い文章。"}]}


def write(path, rows, as_array: bool = False) -> str:
    if as_array:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "row, expected",
    [
        (DOLLY, Record(instruction="要約して。", input="長い文章。", output="短い文章。", category="summarization")),
        (ALPACA, Record(instruction="要約して。", input="長い文章。", output="短い文章。")),
        (ICHIKARA, Record(instruction="要約して。", output="短い文章。")),
        (MESSAGES, Record(messages=MESSAGES["messages"])),
    ],
    ids=["dolly", "alpaca", "ichikara", "messages"],
)
def test_format_detected_from_fields(tmp_path, row, expected):
    path = write(tmp_path / "data.json", [row, row], as_array=True)
    records = load_records(path)
    for i, record in enumerate(records, start=1):
        assert record == Record(**{**expected.__dict__, "where": f"{path}: record {i}"})


def test_forced_format_reads_only_its_fields(tmp_path):
    path = write(tmp_path / "dolly.jsonl", [DOLLY])
    (record,) = load_records(path, data_format="alpaca")
    assert record == Record(instruction="要約して。", input="長い文章。", output="短い文章。", where=f"{path}:1")


@pytest.mark.parametrize(
    "row, data_format, message",
    [
        (ALPACA, "ichikara", "data.jsonl:1: field 'text' is missing"),
        (ALPACA, "messages", "data.jsonl:1: field 'messages' is missing"),
        (ALPACA, "sharegpt", "unknown data format 'sharegpt'"),
        ({"ID": 1, "text": "要約して。"}, None, "data.jsonl:1: field 'output' is missing"),
    ],
)
def test_forced_or_detected_format_errors_name_file_line_field(tmp_path, row, data_format, message):
    path = write(tmp_path / "data.jsonl", [row])
    with pytest.raises(UserError, match=message):
        load_records(path, data_format=data_format)


def test_mixed_formats_are_an_error_at_the_odd_line(tmp_path):
    path = write(tmp_path / "data.jsonl", [ALPACA, ALPACA, ICHIKARA])
    with pytest.raises(UserError, match="data.jsonl:3: field 'instruction' is missing"):
        load_records(path)
