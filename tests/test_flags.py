"""Strict flags on every command (jalora/flags.py): a typo or a bad value stops with one line before
any work; one name per thing; recipe files that parse to the flags README shows."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jalora.cli import COMMANDS, all_flags, command_values, main
from jalora.errors import UserError
from jalora.flags import RULES, flags_in_source, flags_table, parse_args, read_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "configs" / "recipes"
FIRE_TEXT = ("available values", "Usage:", "SYNOPSIS", "NAME", "fire", "Traceback")


def misspelled(name: str) -> str:
    """A flag name with one letter dropped, as a typist drops it."""
    return name[:2] + name[3:]


# one per command with flags: the flag to misspell (output flags and the learning rate of the issue)
TYPOS = {
    "finetune": "learning_rate", "generate": "output_file", "evaluate": "output_file", "merge": "output_dir",
    "export": "output_dir", "estimate": "gpu_gb", "inspect": "output_file", "ui": "port",
}  # fmt: skip
BAD_VALUES = [
    # types
    (["finetune", "--learning_rate", "abc"], "--learning_rate must be a number > 0, got 'abc'"),
    (["generate", "--max_new_tokens", "1.5"], "--max_new_tokens must be a whole number ≥ 1, got '1.5'"),
    (["evaluate", "--compare_base", "maybe"], "unexpected argument 'maybe'"),
    (["finetune", "--bf16", "--train_on_inputs", "yes"], "unexpected argument 'yes'"),
    # ranges (the list)
    (["finetune", "--lora_r", "0"], "--lora_r must be a whole number ≥ 1, got 0"),
    (["finetune", "--micro_batch_size", "0"], "--micro_batch_size must be a whole number ≥ 1, got 0"),
    (["finetune", "--cutoff_len", "-5"], "--cutoff_len must be a whole number ≥ 2, got -5"),
    (["finetune", "--val_set_size", "-1"], "--val_set_size must be a count, or a fraction below 1, ≥ 0, got -1"),
    (["finetune", "--lora_dropout", "1.5"], "--lora_dropout must be a number in [0, 1), got 1.5"),
    (["finetune", "--max_steps", "0"], "--max_steps must be -1 (use --num_epochs) or a whole number ≥ 1, got 0"),
    (["estimate", "m", "--gpu_gb", "-1"], "--gpu_gb must be a number > 0, got -1"),
    (["ui", "--port", "70000"], "--port must be a whole number in [1, 65535], got 70000"),
    (["inspect", "--show_examples", "-1"], "--show_examples must be a whole number ≥ 0, got -1"),
    (["generate", "--top_p", "1.5"], "--top_p must be a number in (0, 1], got 1.5"),
    # choices
    (["finetune", "--stage", "rl"], "unknown --stage 'rl'; choose one of: sft, pt, dpo, orpo"),
    (["finetune", "--quantization", "3bit"], "unknown --quantization '3bit'; choose one of: none, 8bit, 4bit"),
    (["export", "x", "--format", "onnx"], "unknown --format 'onnx'; choose one of: gguf"),
    (["export", "x", "--outtype", "q4"], "unknown --outtype 'q4'; choose one of: f16, q8_0"),
    (["merge", "--dtype", "fp8"], "unknown --dtype 'fp8'; choose one of: float32, bfloat16, float16"),
    (["evaluate", "--tasks", "jglue"], "unknown --tasks 'jglue'; choose one of: elyza-tasks-100, jcommonsenseqa"),
    (["estimate", "m", "--stage", "x"], "unknown --stage 'x'; choose one of: sft, pt, dpo, orpo"),
    # lists
    (["finetune", "--lora_target_modules", "q proj,v_proj"], "--lora_target_modules must be module names"),
    (["estimate", "m", "--lora_target_modules", ","], "--lora_target_modules must be module names"),
    # the command line itself: wrong command, missing value, missing required flag, stray words
    (["finetun"], "unknown command 'finetun' (did you mean finetune?)"),
    (["generat", "--prompt", "x"], "unknown command 'generat' (did you mean generate?)"),
    (["finetune", "--learning_rate"], "--learning_rate needs a value (a number > 0)"),
    (["finetune", "--seed", "--lora_r", "8"], "--seed needs a value (a whole number ≥ 0)"),
    (["export"], "--lora_weights is required"),
    (["estimate"], "--base_model is required"),
    (["finetune", "3e-4"], "unexpected argument '3e-4'"),
    (["finetune", "-lr", "3e-4"], "unknown flag -lr"),
    (["finetune", "--seed", "1", "--seed", "2"], "--seed is given twice"),
    (["presets", "--list"], "unknown flag --list"),
]
# every mistake above and every typo, run in one process: each must end with exit 2 and one line,
# nothing written, and no torch or transformers imported at any point
CHECKER = """
import contextlib, io, json, sys, time
from jalora.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exit:
            code = exit.code
    results.append({"argv": argv, "code": code, "out": err.getvalue(), "seconds": time.perf_counter() - started})
heavy = sorted(m for m in ("torch", "transformers", "peft", "trl", "datasets") if m in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


def cli_mistakes() -> list[tuple[list[str], str]]:
    typos = [
        ([name, f"--{misspelled(flag)}", "1"], f"unknown flag --{misspelled(flag)} (did you mean --{flag}?)")
        for name, flag in TYPOS.items()
    ]
    return typos + BAD_VALUES


def test_every_command_has_a_typo_case():
    assert set(TYPOS) == {name for name in COMMANDS if COMMANDS.flags(name)}


def test_every_mistake_stops_with_one_line_before_any_work(tmp_path):
    cases = cli_mistakes()
    done = subprocess.run(
        [sys.executable, "-c", CHECKER, json.dumps([argv for argv, _ in cases])],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    for (argv, expected), result in zip(cases, report["results"]):
        lines = result["out"].splitlines()
        assert result["code"] == 2, (argv, result)
        assert lines == [lines[0]] and lines[0].startswith("error: "), (argv, result["out"])
        assert expected in lines[0], (argv, lines[0])
        assert not any(text in result["out"] for text in FIRE_TEXT), (argv, result["out"])
    assert report["heavy"] == []  # nothing heavy was imported, so no model or data was touched
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("script", ["finetune.py", "generate.py"])
def test_misspelled_flag_is_refused_before_any_work(script, tmp_path):
    """The issue's own command, typed as a user types it: refused in about the time Python takes to start."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO / script), "--base_model", "M", "--lerning_rate", "1e-4", "--output_dir", "OUT"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: unknown flag --lerning_rate")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    if script == "finetune.py":
        assert done.stderr == "error: unknown flag --lerning_rate (did you mean --learning_rate?)\n"
    assert not (tmp_path / "OUT").exists()
    assert seconds < 5, seconds  # ~0.3 s on an idle machine; torch alone takes ~10 s to import


def test_help_lists_the_flags_without_fire(capsys):
    with pytest.raises(SystemExit) as done:
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--learning_rate" in out and "--config" in out
    assert not any(text in out for text in FIRE_TEXT)


def test_values_are_typed_and_the_forms_fire_took_still_work():
    flags = COMMANDS.flags("finetune")
    values = parse_args(
        flags,
        ["--learning_rate=2e-4", "--num_epochs", "3", "--bf16", "--nogroup_by_length", "--packing", "False",
         "--lora_target_modules", "[q_proj, v_proj]", "--resume_from_checkpoint", "out/checkpoint-10",
         "--val_data_path", "None", "--max_steps", "-1"],
    )  # fmt: skip
    assert values == {
        "learning_rate": 2e-4, "num_epochs": 3, "bf16": True, "group_by_length": False, "packing": False,
        "lora_target_modules": ["q_proj", "v_proj"], "resume_from_checkpoint": "out/checkpoint-10",
        "val_data_path": None, "max_steps": -1,
    }  # fmt: skip
    assert parse_args(flags, ["--resume_from_checkpoint", "True", "--lora_target_modules", "all-linear"]) == {
        "resume_from_checkpoint": True,
        "lora_target_modules": "all-linear",
    }
    assert parse_args(COMMANDS.flags("estimate"), ["my/model", "--lora_r", "16"]) == {
        "base_model": "my/model",
        "lora_r": 16,
    }


def test_a_new_parameter_is_a_flag_without_code_here(tmp_path):
    """A parameter a command gains is checked from its signature alone, with no RULES entry."""
    source = tmp_path / "new_command.py"
    source.write_text(
        "def estimate(base_model: str, num_nodes: int = 1, engine: str | None = None) -> dict:\n    return {}\n"
    )
    flags = flags_in_source(str(source), "estimate")
    assert parse_args(flags, ["m", "--num_nodes", "2", "--engine", "zero9"]) == {
        "base_model": "m",
        "num_nodes": 2,
        "engine": "zero9",
    }
    with pytest.raises(UserError, match=r"--num_nodes must be a whole number, got 'two'"):
        parse_args(flags, ["--num_nodes", "two"])
    with pytest.raises(UserError, match=r"unknown flag --num_node \(did you mean --num_nodes\?\)"):
        parse_args(flags, ["--num_node", "2"])


def test_one_name_for_one_thing():
    """Files a command writes are --output_file, folders --output_dir, records it reads --data_path;
    the renamed flags are gone."""
    for command, flags in all_flags().items():
        assert not {"output_path", "input_file", "compare", "output_folder", "out_file"} & set(flags), command
        assert all(not name.startswith("output") or name in ("output_file", "output_dir") for name in flags), command
    assert {"output_file", "data_path", "compare_base"} <= set(COMMANDS.flags("generate"))
    assert "output_file" in COMMANDS.flags("inspect") and "output_dir" in COMMANDS.flags("export")


def test_rule_choices_are_the_commands_own():
    from jalora.evaluate.heldout import TASKS
    from jalora.evaluate.memory import SHARDINGS
    from jalora.export.gguf import OUTTYPES
    from jalora.export.merge import DTYPES

    assert RULES["tasks"].options == TASKS and RULES["outtype"].options == OUTTYPES
    assert RULES["dtype"].options == tuple(DTYPES)
    assert RULES["sharding"].options == SHARDINGS


def test_every_rule_names_a_flag_of_some_command():
    names = {name for flags in all_flags().values() for name in flags}
    assert set(RULES) <= names


def test_docs_table_is_current():
    assert (REPO / "docs" / "flags.md").read_text(encoding="utf-8") == flags_table(all_flags())


# --- recipe files ---------------------------------------------------------------------------------


def readme_commands() -> list[tuple[str, list[str]]]:
    """(the comment lines above it, argv) of every `python finetune.py` command in README's code blocks."""
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    commands, comments = [], ""
    for line in text.splitlines():
        if line.startswith("#"):
            comments += line
        elif line.startswith("python finetune.py "):
            commands.append((comments, shlex.split(line.split("  #")[0])[2:]))
            comments = ""
        else:
            comments = ""
    return commands


def finetune_values(argv: list[str]) -> dict:
    return command_values("finetune", COMMANDS.flags("finetune"), argv, recipes=True)


@pytest.mark.parametrize("recipe", ["open-calm-7b", "elyza-7b", "llama3-elyza-8b", "cpu-demo"])
def test_recipe_file_is_the_command_readme_shows(recipe):
    path = f"configs/recipes/{recipe}.yaml"
    shown = [argv for comments, argv in readme_commands() if path in comments]
    assert len(shown) == 1, f"README shows no command for {path}"
    from_file = read_recipe(str(REPO / path), COMMANDS.flags("finetune"))
    assert from_file == finetune_values(shown[0])
    assert f"--config {path}" in (REPO / "README.md").read_text(encoding="utf-8")


def test_cpu_demo_recipe_is_the_run_make_demo_makes(monkeypatch):
    import jalora.demo

    made = {}
    monkeypatch.setattr(jalora.demo, "finetune", lambda **kwargs: made.update(kwargs))
    jalora.demo.short_run("demo-out", jalora.demo.DEMO_STEPS)
    recipe = read_recipe(str(RECIPES / "cpu-demo.yaml"), COMMANDS.flags("finetune"))
    for key in ("data_path", "val_data_path"):
        assert Path(made.pop(key)) == REPO / recipe.pop(key)
    assert made == recipe


def test_command_line_overrides_the_file_and_both_are_checked(tmp_path):
    values = finetune_values(["--config", str(RECIPES / "open-calm-7b.yaml"), "--learning_rate", "1e-4"])
    assert values["learning_rate"] == 1e-4 and values["base_model"] == "cyberagent/open-calm-7b"
    with pytest.raises(UserError, match=r"--lora_r must be a whole number ≥ 1, got 0"):
        finetune_values(["--config", str(RECIPES / "open-calm-7b.yaml"), "--lora_r", "0"])


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_misspelled_key_in_a_recipe_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"recipe{suffix}"
    rows = {"base_model": "smollm2", "lerning_rate": 1e-4}
    text = json.dumps(rows, indent=2) if suffix == ".json" else "".join(f"{k}: {v}\n" for k, v in rows.items())
    path.write_text(text, encoding="utf-8")
    line = 3 if suffix == ".json" else 2
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:{line}: unknown key lerning_rate "):
        finetune_values(["--config", str(path)])
    with pytest.raises(SystemExit) as done:  # and through the command line: one line, exit 2
        main(["finetune", "--config", str(path)])
    assert done.value.code == 2


def test_bad_values_in_a_recipe_name_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("# a recipe\nbase_model: smollm2\nlora_dropout: 1.5\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:3: lora_dropout must be a number in \[0, 1\)"):
        finetune_values(["--config", str(path)])
    path.write_text("stage: rl\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:1: unknown stage 'rl'; choose one of"):
        finetune_values(["--config", str(path)])
    path.write_text("learning_rate: [1, 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: not valid YAML"):
        finetune_values(["--config", str(path)])


def test_recipe_and_typed_flags_make_the_same_run(tiny_model_dir, tmp_path):
    """Same hyper-parameters, template and resolved flags in both run records; the record repeats the run."""
    data = tmp_path / "toy.jsonl"
    rows = [{"instruction": f"{i}について教えて。", "input": "", "output": "はい。"} for i in range(12)]
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    typed = [
        f"--base_model={tiny_model_dir('open-calm')}", f"--data_path={data}",
        "--batch_size=4", "--micro_batch_size=2", "--max_steps=2", "--learning_rate=1e-3", "--cutoff_len=256",
        "--lora_r=4", "--val_set_size=4", "--eval_before_training=False", "--lora_target_modules=query_key_value",
    ]  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{flag[2:].replace('=', ': ', 1)}\n" for flag in typed), encoding="utf-8")
    main(["finetune", *typed, f"--output_dir={tmp_path / 'typed'}"])
    main(["finetune", "--config", str(recipe), f"--output_dir={tmp_path / 'file'}"])
    records = [json.loads((tmp_path / run / "jalora.json").read_text(encoding="utf-8")) for run in ("typed", "file")]
    for key in ("hyperparameters", "template", "lora", "cutoff_len"):
        assert records[0][key] == records[1][key], key
    for record in records:
        record["flags"].pop("output_dir")
    assert records[0]["flags"] == records[1]["flags"]
    assert records[0]["flags"]["learning_rate"] == 1e-3 and records[0]["flags"]["max_steps"] == 2
    repeated = finetune_values(["--config", str(tmp_path / "typed" / "jalora.json"), "--output_dir", "again"])
    assert repeated == {**records[0]["flags"], "output_dir": "again"}
