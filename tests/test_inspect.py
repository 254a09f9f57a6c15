"""`jalora inspect` on folders holding only tokenizer files: the ids it writes are training's ids."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from transformers import AutoTokenizer

from jalora.cli import COMMANDS
from jalora.data.prompts import Prompter, load_template
from jalora.data.records import SAMPLE_DATA, load_records, tokenize_records
from jalora.errors import UserError
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import get_preset
from jalora.train.inspect import CLOSE, OPEN, inspect

RECORDS = 12


def tokenizer_only(model_dir, target):
    """A copy of a stand-in with its tokenizer files and nothing else (no config.json, no weights)."""
    target.mkdir()
    for path in model_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, target / path.name)
    assert not (target / "config.json").exists()
    return target


@pytest.mark.parametrize("family, preset_name", [("llama3-elyza", "llama3-elyza"), ("elyza-llama2", "elyza-llama2")])
def test_inspect_writes_the_training_ids_of_a_tokenizer_only_folder(
    tiny_model_dir, tmp_path, capsys, family, preset_name
):
    folder = tokenizer_only(tiny_model_dir(family), tmp_path / "tokenizer-only")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(SAMPLE_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:RECORDS]), "utf-8")
    out = tmp_path / "inspect.jsonl"
    assert COMMANDS["inspect"] is inspect
    inspect(base_model=str(folder), data_path=str(data), output_file=str(out), preset=preset_name, cutoff_len=256)

    preset = get_preset(preset_name)
    prompter = Prompter(load_template(preset.template), load_tokenizer(resolve_source(str(folder)), preset), preset)
    records = load_records(str(data))
    examples, _ = tokenize_records(records, prompter, 256)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["input_ids"], r["labels"]) for r in rows] == [(e["input_ids"], e["labels"]) for e in examples]
    raw = AutoTokenizer.from_pretrained(str(folder))
    eos = prompter.tokenizer.eos_token
    for record, row in zip(records, rows):
        assert row["prompt"] == prompter.render(record.instruction, record.input)
        if preset.template == "chat":
            assert raw.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True) == row["prompt"]
        else:
            assert "messages" not in row
        (answer,) = re.findall(f"{OPEN}(.*?){CLOSE}", row["text_marked"], flags=re.S)
        if len(row["input_ids"]) < 256:  # not truncated: the whole answer and the eos
            assert answer == record.output + eos
        assert row["text_marked"].startswith(prompter.tokenizer.decode(row["input_ids"][:1]))
    shown = capsys.readouterr().out
    assert shown.count("prompt ends") == 3 and f"{len(rows)} examples written" in shown


def test_inspect_without_preset_on_a_tokenizer_only_folder_says_to_pass_one(tiny_model_dir, tmp_path):
    folder = tokenizer_only(tiny_model_dir("qwen2.5"), tmp_path / "tokenizer-only")
    with pytest.raises(SystemExit):
        inspect(base_model=str(folder), output_file=str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match="pass --preset NAME"):
        inspect.__wrapped__(base_model=str(folder), output_file=str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()
