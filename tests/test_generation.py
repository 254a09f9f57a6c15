"""Generation on tiny stand-ins: plain-generate equivalence, batching, penalties, stops, streaming,
faster decoding, batch files that resume, --compare_base and the chat loop driven through stdin."""

from __future__ import annotations

import io
import json

import pytest
import torch

from jalora.errors import UserError
from jalora.generate.batch_answers import answer_file
from jalora.generate.generator import Generator, Sampling, load_assistant

PROMPTS = [
    ("日本の首都について教えてください。", ""),
    ("次の文章を要約してください。", "富士山は日本で一番高い山です。"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box OpenMP spinning made them 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    loaded: dict[str, Generator] = {}

    def get(family: str) -> Generator:
        if family not in loaded:
            loaded[family] = Generator.load(base_model=str(tiny_model_dir(family)))
        return loaded[family]

    return get


def greedy(**kwargs) -> Sampling:
    return Sampling(**{"max_new_tokens": 24, "repetition_penalty": 1.0, **kwargs})


@pytest.mark.parametrize("family", ["open-calm", "llama3-elyza"])
def test_greedy_without_penalties_equals_plain_generate(generators, family):
    gen = generators(family)
    prompt = gen.prompter.encode([gen.prompter.render(*PROMPTS[0])])[0]
    ours = gen.generate_ids([prompt], greedy())[0]
    with torch.inference_mode():
        plain = gen.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
    plain = plain.tolist()
    end = next((i for i, t in enumerate(plain) if t in gen.eos_ids), len(plain))
    assert ours == plain[:end] and len(ours) > 0


def test_left_padded_batch_equals_one_by_one(generators):
    gen = generators("qwen2.5")
    prompts = gen.prompter.encode([gen.prompter.render(i, x) for i, x in PROMPTS])
    assert len(prompts[0]) != len(prompts[1])
    assert gen.generate_ids(prompts, greedy()) == [gen.generate_ids([p], greedy())[0] for p in prompts]


def test_a_large_frequency_penalty_forbids_every_repeat(generators):
    gen = generators("open-calm")
    prompt = gen.prompter.encode([gen.prompter.render(*PROMPTS[0])])
    plain = gen.generate_ids(prompt, greedy(max_new_tokens=40))[0]
    assert len(set(plain)) < len(plain), "the untouched model should repeat some token"
    penalised = gen.generate_ids(prompt, greedy(max_new_tokens=40, frequency_penalty=1e4, penalty_exempt=""))[0]
    assert len(set(penalised)) == len(penalised)


def test_stop_string_ends_generation_and_is_cut_off(generators):
    gen = generators("open-calm")
    prompt_text = gen.prompter.render(*PROMPTS[0])
    ids = gen.prompter.encode([prompt_text])
    full_ids = gen.generate_ids(ids, greedy(max_new_tokens=40))[0]
    full = gen.complete([prompt_text], greedy(max_new_tokens=40))[0]
    clean = [i for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    stop = full[clean[0] : clean[0] + 2]
    stopped_ids = gen.generate_ids(ids, greedy(max_new_tokens=40, stop=(stop,)))[0]
    assert gen.complete([prompt_text], greedy(max_new_tokens=40, stop=(stop,)))[0] == full[: full.find(stop)]
    assert len(stopped_ids) < len(full_ids)


@pytest.mark.parametrize("family", ["open-calm", "qwen2.5"])
def test_streaming_reassembles_to_the_non_streaming_answer(generators, family):
    gen = generators(family)
    prompt_text = gen.prompter.render(*PROMPTS[1])
    with_stop = greedy(max_new_tokens=40, frequency_penalty=0.5, stop=("。",))
    looked_up = greedy(max_new_tokens=40, generated_only_penalty=1.5, prompt_lookup_num_tokens=4)
    for sampling in (greedy(max_new_tokens=40, generated_only_penalty=1.5), with_stop, looked_up):
        pieces = list(gen.stream(prompt_text, sampling))
        assert "".join(pieces) == gen.complete([prompt_text], sampling)[0]
        assert len(pieces) > 1


def test_prompt_lookup_and_draft_model_keep_the_greedy_answer(generators, tiny_model_dir):
    gen = generators("open-calm")
    prompts = [gen.prompter.render(i, x) for i, x in PROMPTS]
    plain = gen.complete(prompts, greedy(max_new_tokens=30, generated_only_penalty=1.3))
    lookup = gen.complete(prompts, greedy(max_new_tokens=30, generated_only_penalty=1.3, prompt_lookup_num_tokens=3))
    assert lookup == plain
    assisted = Generator(
        gen.model, gen.tokenizer, gen.prompter, load_assistant(str(tiny_model_dir("open-calm")), gen.tokenizer)
    )
    assert assisted.complete(prompts, greedy(max_new_tokens=30, generated_only_penalty=1.3)) == plain
    with pytest.raises(UserError, match="tokenizer differs"):
        load_assistant(str(tiny_model_dir("qwen2.5")), gen.tokenizer)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_batch_file_resumes_after_an_interrupted_run(generators, tmp_path, capsys):
    gen = generators("open-calm")
    rows = [
        {"id": n, "instruction": f"{t}について教えて。"} for n, t in enumerate(["東京", "桜", "寿司", "温泉", "将棋"])
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    sampling = greedy(max_new_tokens=12)
    answer_file(gen, str(src), str(out), sampling, batch_size=2, report=True)
    complete = out.read_text(encoding="utf-8")
    answers = [json.loads(line) for line in complete.splitlines()]
    assert [{k: a[k] for k in ("id", "instruction")} for a in answers] == rows
    assert [a["response"] for a in answers] == gen.answer([(r["instruction"], "") for r in rows], sampling)
    assert all(set(a["repetition"]) == {"repeated_3gram_share", "distinct_2", "top_3gram_count"} for a in answers)

    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15], encoding="utf-8")  # died while writing record 3
    asked = []
    real_complete = gen.complete
    gen.complete = lambda prompts, s: asked.extend(prompts) or real_complete(prompts, s)
    try:
        answer_file(gen, str(src), str(out), sampling, batch_size=2, report=True)
    finally:
        del gen.complete
    assert out.read_text(encoding="utf-8") == complete
    assert len(asked) == 3
    assert "2 of 5 records already answered" in capsys.readouterr().err

    write_jsonl(out, [{"id": 9, "instruction": "別の質問", "response": "x"}])
    with pytest.raises(UserError, match=r"out.jsonl:1: does not answer input record 1"):
        answer_file(gen, str(src), str(out), sampling, batch_size=2)


def test_compare_gives_the_base_model_answer_beside_the_adapter_one(tiny_model_dir, generators, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = generators("open-calm")
    fresh = Generator.load(base_model=str(tiny_model_dir("open-calm")))
    lora = LoraConfig(r=8, target_modules=["query_key_value"], init_lora_weights=False)
    adapted = Generator(get_peft_model(fresh.model, lora), fresh.tokenizer, fresh.prompter)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"instruction": i, "input": x} for i, x in PROMPTS])
    sampling = greedy(max_new_tokens=16)
    answer_file(adapted, str(src), str(out), sampling, batch_size=2, compare=True)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["response_base"] for r in rows] == base.answer(PROMPTS, sampling)
    assert [r["response"] for r in rows] == adapted.answer(PROMPTS, sampling)
    assert [r["response"] for r in rows] != [r["response_base"] for r in rows]
    with pytest.raises(UserError, match="--compare_base needs --lora_weights"):
        with base.adapter_disabled():
            pass


CHAT_SAMPLING = greedy(max_new_tokens=8, frequency_penalty=5.0)


def drive_chat(gen: Generator, lines: list[str], monkeypatch, capsys) -> tuple[list[str], str]:
    """Run the chat loop on `lines` as stdin; return the prompts the model saw and stdout."""
    from jalora.generate.chat import chat_loop

    seen: list[str] = []
    real_stream = gen.stream
    monkeypatch.setattr(gen, "stream", lambda prompt, s: seen.append(prompt) or real_stream(prompt, s))
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    chat_loop(gen, CHAT_SAMPLING)
    return seen, capsys.readouterr().out


def test_chat_loop_keeps_history_for_chat_template_families(generators, monkeypatch, capsys):
    gen = generators("qwen2.5")
    seen, out = drive_chat(
        gen, ["こんにちは", "東京は？", "/reset", "桜は？", "/exit", "never read"], monkeypatch, capsys
    )
    assert "(history cleared)" in out and len(seen) == 3
    first_reply = gen.complete([seen[0]], CHAT_SAMPLING)[0]
    assert first_reply.strip() and f"> {first_reply}\n" in out
    render = gen.prompter.render_chat
    assert seen[0] == render([{"role": "user", "content": "こんにちは"}])
    assert seen[1] == render(
        [
            {"role": "user", "content": "こんにちは"},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "東京は？"},
        ]
    )
    assert seen[2] == render([{"role": "user", "content": "桜は？"}])


def test_chat_loop_is_single_turn_for_alpaca_templates(generators, monkeypatch, capsys):
    gen = generators("open-calm")
    seen, out = drive_chat(gen, ["こんにちは", "東京は？"], monkeypatch, capsys)  # ends at end of input
    assert out.startswith("chat: single-turn (alpaca_ja template)")
    assert seen == [gen.prompter.render("こんにちは"), gen.prompter.render("東京は？")]


def test_web_demo_streams_the_cli_answer_and_reports_without_gradio(generators):
    from jalora.generate.repetition_score import format_report, repetition_report
    from jalora.generate.ui import answer_stream

    gen = generators("open-calm")
    steps = list(answer_stream(gen, *PROMPTS[1], max_new_tokens=20, generated_only_penalty=1.2, stop="。\n###"))
    expected = gen.answer([PROMPTS[1]], greedy(max_new_tokens=20, generated_only_penalty=1.2, stop=("。", "###")))[0]
    assert steps[-1] == (expected, format_report(repetition_report(expected)))
    assert all(expected.startswith(text) for text, _ in steps)


def test_jalora_ui_without_gradio_says_how_to_install(capsys):
    import importlib.util

    from jalora.cli import COMMANDS

    if importlib.util.find_spec("gradio") is not None:
        pytest.skip("gradio is installed; this checks the message shown without it")
    with pytest.raises(SystemExit) as stopped:
        COMMANDS["ui"](base_model="unused")
    assert stopped.value.code == 2 and "pip install -e '.[ui]'" in capsys.readouterr().err


def test_generate_interactive_reads_stdin_and_reports(tiny_model_dir, tmp_path):
    """The real command line: chat from piped stdin, --report figures on stderr, clean exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(repo / "generate.py"), f"--base_model={tiny_model_dir('qwen2.5')}", "--interactive",
         "--max_new_tokens=6", "--frequency_penalty=1.0", "--report", "--stop=。"],
        input="こんにちは\n/reset\n東京は？\n/exit\n", capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("chat: keeps the history") and "(history cleared)" in done.stdout
    assert done.stderr.count("[report] repeated 3-grams") == 2


def test_device_map_auto_places_the_model_and_keeps_the_answer(generators, tiny_model_dir):
    """--device_map auto (a model larger than one GPU) goes through accelerate's placement; here,
    without a GPU, everything lands on the CPU and the greedy answer is unchanged."""
    placed = Generator.load(base_model=str(tiny_model_dir("open-calm")), device_map="auto")
    assert set(getattr(placed.model, "hf_device_map", {"": "cpu"}).values()) <= {"cpu", 0}
    assert placed.answer(PROMPTS, greedy()) == generators("open-calm").answer(PROMPTS, greedy())
