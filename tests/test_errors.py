"""Every bad input gives one clear `error:` line naming what and where, exit status 2 and no
traceback, before any expensive work; and nothing in data, templates or model folders runs code."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jalora.data.prompts import load_template
from jalora.errors import UserError
from jalora.generate.command import main as generate_cli
from jalora.model.loading import attach_lora, load_model, load_tokenizer, resolve_source
from jalora.model.preflight import base_config_summary
from jalora.presets import get_preset
from jalora.train.finetune import finetune as finetune_cli
from jalora.train.finetune import save_run

REPO = Path(__file__).resolve().parent.parent
NO_MODEL = "/nonexistent/model"  # any attempt to load it would fail differently: proves the error came first
GOOD = {"instruction": "日本の首都は？", "input": "", "output": "東京です。"}


def cli_error(cli, capsys, **kwargs) -> str:
    """Run a CLI entry point in-process; return its one `error:` line after checking status 2 and no traceback."""
    with pytest.raises(SystemExit) as exited:
        cli(**kwargs)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


SJIS_PREFIX = b'{"instruction": "'
# name -> (file name, content, expected message with {path} for the file)
DATA_CASES = {
    "missing file": ("absent.jsonl", None, "{path}: data file not found"),
    "empty file": ("empty.jsonl", b"\n  \n", "{path}: data file is empty"),
    "invalid JSON on line 3": ("bad.jsonl", jsonl(GOOD, GOOD) + b'{"instruction": "x",\n', "{path}:3: invalid JSON"),
    "array where lines expected": ("array.jsonl", json.dumps([GOOD]).encode(), "{path}:1: expected JSON lines"),
    "one object where records expected": (
        "wrapped.json",
        json.dumps({"data": [GOOD, GOOD]}, indent=2).encode(),
        "{path}:1: the file is one JSON object over several lines; .* under 'data'",
    ),
    "missing instruction": (
        "noinst.jsonl",
        jsonl(GOOD, {"input": "", "output": "x"}),
        "{path}:2: field 'instruction' is missing",
    ),
    "missing output": ("noout.jsonl", jsonl(GOOD, {"instruction": "x"}), "{path}:2: field 'output' is missing"),
    "non-string field": (
        "int.jsonl",
        jsonl(GOOD, {**GOOD, "output": 5}),
        "{path}:2: field 'output' must be a string, got int",
    ),
    "empty output": ("emptyout.jsonl", jsonl({**GOOD, "output": "  "}), "{path}:1: field 'output' is empty"),
    "record not an object": (
        "list.json",
        json.dumps([GOOD, ["a"]]).encode(),
        "{path}: record 2: expected a JSON object",
    ),
    "format not recognised": (
        "qa.jsonl",
        jsonl({"question": "q", "answer": "a"}),
        r"{path}:1: data format not recognised from fields \['answer', 'question'\]",
    ),
    "not UTF-8": (
        "sjis.jsonl",
        SJIS_PREFIX + "日本の首都は？".encode("shift_jis") + b'", "output": "x"}\n',
        f"{{path}}: not UTF-8 text \\(bad byte at offset {len(SJIS_PREFIX)}\\)",
    ),
    "unsupported file type": ("data.txt", b"hello", "{path}: unsupported file type"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file_is_named_before_any_model_is_loaded(case, tmp_path, capsys):
    name, content, expected = DATA_CASES[case]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    line = cli_error(
        finetune_cli, capsys, base_model=NO_MODEL, preset="open-calm", data_path=str(path),
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    assert re.search(expected.format(path=re.escape(str(path))), line), line
    assert not (tmp_path / "out").exists()


FLAG_CASES = {
    "unknown preset": ({"preset": "gpt5"}, r"unknown preset 'gpt5'; choose one of: open-calm, rinna"),
    "unknown template": ({"prompt_template_name": "nope"}, r"unknown template 'nope'; choose one of: .*alpaca_ja"),
    "unknown quantization": ({"quantization": "3bit"}, r"unknown --quantization '3bit'; choose one of: none, 8bit"),
    "unknown data format": ({"data_format": "sharegpt"}, r"unknown data format 'sharegpt'; choose one of: dolly"),
    "micro batch > batch": (
        {"batch_size": 4, "micro_batch_size": 8},
        r"--micro_batch_size 8 is larger than --batch_size 4",
    ),
    "val set too large": ({"val_set_size": 3}, r"--val_set_size 3 holds out 3 records but the data has only 3"),
    "not a number": ({"batch_size": "abc"}, r"--batch_size must be a whole number ≥ 1, got 'abc'"),
    "negative learning rate": ({"learning_rate": -1e-4}, r"--learning_rate must be a number > 0"),
    "dropout of 1": ({"lora_dropout": 1.0}, r"--lora_dropout must be a number in \[0, 1\)"),
    "bool as text": ({"bf16": "false"}, r"--bf16 must be True or False, got 'false'"),
    "bf16 and fp16": ({"bf16": True, "fp16": True}, r"--bf16 and --fp16 are both set"),
    "resume with nothing": ({"resume_from_checkpoint": True}, r"--resume_from_checkpoint True: no complete checkpoint"),
    "resume path missing": ({"resume_from_checkpoint": "/no/ckpt"}, r"--resume_from_checkpoint /no/ckpt: not found"),
    "resume and overwrite": (
        {"resume_from_checkpoint": True, "overwrite_output_dir": True},
        r"--resume_from_checkpoint and --overwrite_output_dir contradict each other",
    ),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flag_is_named_before_any_model_is_loaded(case, tmp_path, capsys):
    flags, expected = FLAG_CASES[case]
    data = tmp_path / "three.jsonl"
    data.write_bytes(jsonl(GOOD, GOOD, GOOD))
    kwargs = {"base_model": NO_MODEL, "preset": "open-calm", "data_path": str(data), "output_dir": str(tmp_path / "o")}
    line = cli_error(finetune_cli, capsys, **{**kwargs, **flags})
    assert re.search(expected, line), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is fine on a GPU")
def test_fp16_on_cpu_is_refused(tmp_path, capsys):
    line = cli_error(finetune_cli, capsys, base_model=NO_MODEL, preset="open-calm", fp16=True)
    assert "--fp16 needs a CUDA GPU" in line and "--bf16 True" in line


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    line = cli_error(finetune_cli, capsys, base_model=NO_MODEL, preset="open-calm", output_dir=str(tmp_path / "out"))
    assert "is a file, not a folder" in line


@pytest.mark.parametrize(
    "placeholder",
    ["{instruction.__class__}", "{input[0]}", "{instruction!r}", "{instruction:>999}", "{self}", "{}", "{0}"],
)
def test_template_placeholders_cannot_reach_python_objects(placeholder, tmp_path):
    path = tmp_path / "evil.json"
    text = "### 指示:\n{instruction}\n" + placeholder + "\n### 応答:\n"
    path.write_text(json.dumps({"prompt_input": text + "{input}", "prompt_no_input": text}), encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(placeholder) + ".*only {instruction}, {input} and {system}"):
        load_template(str(path))


def test_template_with_unbalanced_brace(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"prompt_input": "{instruction} {input", "prompt_no_input": "{instruction}"}))
    with pytest.raises(UserError, match=f"{re.escape(str(path))}: field 'prompt_input' has unbalanced braces"):
        load_template(str(path))


def test_braces_in_data_are_text_not_placeholders(tiny_model_dir):
    from jalora.data.prompts import Prompter

    base = resolve_source(str(tiny_model_dir("open-calm")))
    preset = get_preset("open-calm")
    prompter = Prompter(load_template("alpaca_ja"), load_tokenizer(base, preset), preset)
    prompt = prompter.render("{instruction.__class__} と {input}", "{system}")
    assert "{instruction.__class__} と {input}" in prompt and "### 入力:\n{system}\n" in prompt


def test_every_record_longer_than_cutoff(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_bytes(jsonl(*[{**GOOD, "instruction": "とても長い質問です。" * 20}] * 3))
    line = cli_error(
        finetune_cli, capsys, base_model=str(tiny_model_dir("open-calm")), data_path=str(data), cutoff_len=16,
        val_set_size=0, output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    assert f"{data}: every record is longer than --cutoff_len 16" in line


def test_missing_target_modules_lists_the_real_ones(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "ok.jsonl"
    data.write_bytes(jsonl(GOOD, GOOD))
    line = cli_error(
        finetune_cli, capsys, base_model=str(tiny_model_dir("open-calm")), data_path=str(data), val_set_size=0,
        lora_target_modules="q_proj,v_proj", output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    assert "--lora_target_modules q_proj,v_proj not found in this model" in line
    assert "dense, dense_4h_to_h, dense_h_to_4h, query_key_value (or use all-linear)" in line


# --- safety: nothing runs code ------------------------------------------------------------
class RunsCode:
    """Unpickling this creates the file it names: the proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_unread(tiny_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir("open-calm"), model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
    data = tmp_path / "ok.jsonl"
    data.write_bytes(jsonl(GOOD, GOOD))
    line = cli_error(finetune_cli, capsys, base_model=str(model_dir), data_path=str(data), val_set_size=0)
    assert "weights only as pickle files (pytorch_model.bin); jalora loads safetensors only" in line
    assert not marker.exists()


def test_remote_code_is_not_run_without_the_flag(tmp_path, capsys):
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    marker = tmp_path / "pwned"
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}), encoding="utf-8"
    )
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n", encoding="utf-8")
    line = cli_error(finetune_cli, capsys, base_model=str(model_dir))
    assert "uses custom model code" in line and "--trust_remote_code True" in line
    assert not marker.exists()


# --- generate: the adapter must be an adapter, for this base model ----------------------------
@pytest.fixture(scope="module")
def open_calm_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    base = str(tiny_model_dir("open-calm"))
    preset = get_preset("open-calm")
    model = attach_lora(load_model(resolve_source(base)), ["query_key_value"], 4, 8, 0.0, quantized=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    out = tmp_path_factory.mktemp("adapter")
    record = {"base_model": base, "preset": "open-calm", "template": "alpaca_ja"}
    record["base_config"] = base_config_summary(model.config)
    save_run(model, load_tokenizer(resolve_source(base), preset), record, out)
    return out


def test_generate_with_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    assert "adapter folder not found" in cli_error(generate_cli, capsys, prompt="x", lora_weights=str(tmp_path / "no"))
    line = cli_error(generate_cli, capsys, prompt="x", lora_weights=str(tmp_path))
    assert f"{tmp_path}: not a LoRA adapter folder (missing adapter_config.json, adapter_model.safetensors)" in line


def test_generate_refuses_a_pickle_adapter(open_calm_adapter, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(open_calm_adapter / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(RunsCode(tmp_path / "pwned")))
    line = cli_error(generate_cli, capsys, prompt="x", lora_weights=str(folder))
    assert "the adapter is a pickle file (adapter_model.bin); jalora loads safetensors only" in line
    assert not (tmp_path / "pwned").exists()


def test_generate_with_another_base_model_is_refused_before_loading_it(open_calm_adapter, tiny_model_dir, capsys):
    other = str(tiny_model_dir("elyza-llama2"))
    line = cli_error(generate_cli, capsys, prompt="x", lora_weights=str(open_calm_adapter), base_model=other)
    assert f"was trained on '{tiny_model_dir('open-calm')}'; the --base_model given is a different model" in line
    assert "model_type gpt_neox vs llama" in line


def test_plain_peft_adapter_on_wrong_base_names_the_missing_layer(open_calm_adapter, tiny_model_dir, tmp_path, capsys):
    """No run record to compare with: the adapter's own tensors are checked against the model's layers."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(open_calm_adapter / name, folder)
    line = cli_error(
        generate_cli, capsys, prompt="x", lora_weights=str(folder), base_model=str(tiny_model_dir("elyza-llama2"))
    )
    assert "does not fit this base model (it has no layer gpt_neox.layers.0.attention.query_key_value)" in line


# --- two checks through real processes, as a user runs them ------------------------------------
def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_non_utf8_data_exits_2_with_the_byte_offset(tmp_path):
    data = tmp_path / "sjis.jsonl"
    data.write_bytes(jsonl(GOOD) + SJIS_PREFIX + "東京".encode("shift_jis") + b'", "output": "x"}\n')
    done = run("finetune.py", f"--data_path={data}", "--preset=open-calm", f"--base_model={NO_MODEL}", cwd=tmp_path)
    offset = len(jsonl(GOOD)) + len(SJIS_PREFIX)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {data}: not UTF-8 text (bad byte at offset {offset}); save it as UTF-8"
    )


def test_cli_generate_with_mismatched_base_exits_2(open_calm_adapter, tiny_model_dir, tmp_path):
    done = run(
        "generate.py", "--prompt=こんにちは", f"--lora_weights={open_calm_adapter}",
        f"--base_model={tiny_model_dir('elyza-llama2')}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "the --base_model given is a different model" in done.stderr


@pytest.mark.slow
def test_gguf_base_never_reads_pickle_beside_it(tmp_path):
    """The GGUF path loads only the named .gguf file: a pickle in the same folder stays unread."""
    from jalora.model.loading import EMBEDDED

    real = resolve_source("smollm2")
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / EMBEDDED["smollm2"][1]).symlink_to(Path(real.path) / real.gguf_file)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(tmp_path / "pwned")))
    model = load_model(resolve_source(str(folder / EMBEDDED["smollm2"][1])))
    assert model.config.model_type == "llama"
    assert not (tmp_path / "pwned").exists()
