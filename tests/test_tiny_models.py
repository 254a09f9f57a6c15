"""The tiny stand-ins reproduce each real family's architecture and special-token layout."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, japanese_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

BuildDir = Callable[[str], Path]
LLAMA2_LIKE = ("elyza-llama2", "elyza-llama2-instruct", "elyza-codellama", "swallow")
# transformers 5 names the GPT-NeoX head `lm_head` in memory; save_pretrained still writes `embed_out.weight`.
NEOX_MODULES = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"}
LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}

GEMMA_ROLES = {"bos": ("<bos>", 2), "eos": ("<eos>", 1), "pad": ("<pad>", 0), "unk": ("<unk>", 3)}
# family -> (architecture, {role: (token, id)}, adds BOS, appends EOS). An id given as "+N" is
# N past the end of the trained vocabulary (where Llama-3 / Qwen put their special tokens).
LAYOUT: dict[str, tuple[str, dict[str, tuple[str, int | str] | None], bool, bool]] = {
    "open-calm": (
        "GPTNeoXForCausalLM",
        {"bos": ("<|endoftext|>", 0), "eos": ("<|endoftext|>", 0), "pad": ("<|padding|>", 1)},
        False,
        False,
    ),
    "rinna": (
        "GPTNeoXForCausalLM",
        {"bos": ("<s>", 2), "eos": ("</s>", 3), "pad": ("[PAD]", 0), "unk": ("<unk>", 1)},
        False,
        True,
    ),
    **{
        family: (
            "LlamaForCausalLM",
            {"bos": ("<s>", 1), "eos": ("</s>", 2), "unk": ("<unk>", 0), "pad": pad},
            True,
            False,
        )
        for family, pad in [
            ("elyza-llama2", None),
            ("elyza-llama2-instruct", ("</s>", 2)),
            ("elyza-codellama", None),
            ("swallow", ("<unk>", 0)),
        ]
    },
    "llm-jp-3": (
        "LlamaForCausalLM",
        {
            "bos": ("<s>", 1),
            "eos": ("</s>", 2),
            "unk": ("<unk>", 0),
            "pad": ("<PAD|LLM-jp>", 4),
            "mask": ("<MASK|LLM-jp>", 3),
        },
        True,
        False,
    ),
    "llama3-elyza": (
        "LlamaForCausalLM",
        {"bos": ("<|begin_of_text|>", "+0"), "eos": ("<|end_of_text|>", "+1"), "pad": None, "unk": None},
        True,
        False,
    ),
    "qwen2.5": (
        "Qwen2ForCausalLM",
        {"bos": None, "eos": ("<|im_end|>", "+2"), "pad": ("<|endoftext|>", "+0"), "unk": None},
        False,
        False,
    ),
    **{
        family: (arch, GEMMA_ROLES, True, False)
        for family, arch in [("gemma3", "Gemma3ForCausalLM"), ("gemma2", "Gemma2ForCausalLM")]
    },
}
# Extra tokens that must be atomic, with their expected id.
EXTRA_TOKENS: dict[str, dict[str, int | str]] = {
    "llama3-elyza": {
        "<|reserved_special_token_0|>": "+2",
        "<|finetune_right_pad_id|>": "+4",
        "<|start_header_id|>": "+6",
        "<|end_header_id|>": "+7",
        "<|eom_id|>": "+8",
        "<|eot_id|>": "+9",
    },
    "qwen2.5": {"<|im_start|>": "+1", "<|im_end|>": "+2", "<tool_call>": "+14"},
    "llm-jp-3": {"<CLS|LLM-jp>": 5, "<SEP|LLM-jp>": 6, "<EOD|LLM-jp>": 7},
    "gemma3": {"<start_of_turn>": 105, "<end_of_turn>": 106, "\n": 107, "\n\n": 108},
    "gemma2": {"<start_of_turn>": 106, "<end_of_turn>": 107, "\n": 108, "\n\n": 109},
}
ROUND_TRIP = [
    "吾輩は猫である。名前はまだ無い。",
    "鰻丼と𩸽",
    "東京タワーの高さは333メートルです。Hello, world!",
    "ｶﾀｶﾅと全角ＡＢＣ、絵文字🍣も。",
]
UNSEEN = "鰻丼と𩸽"


def _resolve(tok, expected: int | str) -> int:
    return tok.vocab_size + int(expected[1:]) if isinstance(expected, str) else expected


def _load(tiny_model_dir: BuildDir, family: str):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir(family)), use_fast=family != "rinna")


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_layout(tiny_model_dir: BuildDir, family: str) -> None:
    tok = _load(tiny_model_dir, family)
    _, roles, adds_bos, adds_eos = LAYOUT[family]
    for role, expected in roles.items():
        if expected is None:
            assert getattr(tok, f"{role}_token") is None, role
            assert getattr(tok, f"{role}_token_id") is None, role
        else:
            assert getattr(tok, f"{role}_token") == expected[0], role
            assert getattr(tok, f"{role}_token_id") == _resolve(tok, expected[1]), role

    ids = tok("日本語のテキスト")["input_ids"]
    plain = tok("日本語のテキスト", add_special_tokens=False)["input_ids"]
    assert (ids[0] == tok.bos_token_id and ids[1:] == plain[: len(ids) - 1]) is adds_bos
    assert (ids[-1] == tok.eos_token_id and ids[:-1] == plain) is adds_eos
    assert len(ids) == len(plain) + adds_bos + adds_eos


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_atomic(tiny_model_dir: BuildDir, family: str) -> None:
    tok = _load(tiny_model_dir, family)
    expected = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    expected |= {t: _resolve(tok, i) for t, i in EXTRA_TOKENS.get(family, {}).items()}
    for token, token_id in expected.items():
        assert tok.convert_ids_to_tokens(token_id) == token
        assert tok.encode(token, add_special_tokens=False) == [token_id], token
        assert tok.decode([token_id]) == token
        assert tok.encode(f"前{token}後", add_special_tokens=False).count(token_id) == 1, token

    special_ids = set(expected.values())
    for text in japanese_corpus()[:300]:
        if any(t in text for t in expected):
            continue
        assert not special_ids & set(tok.encode(text, add_special_tokens=False)), text


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "rinna"])
def test_japanese_round_trip(tiny_model_dir: BuildDir, family: str) -> None:
    tok = _load(tiny_model_dir, family)
    assert tok.is_fast
    for text in ROUND_TRIP + japanese_corpus()[:50]:
        if text != text.strip() or "  " in text:  # Metaspace tokenizers normalise edge spaces
            continue
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_rinna_is_sentencepiece_slow(tiny_model_dir: BuildDir) -> None:
    from transformers import SentencePieceBackend

    path = str(tiny_model_dir("rinna"))
    tok = AutoTokenizer.from_pretrained(path, use_fast=False)
    assert isinstance(tok, SentencePieceBackend) and not tok.is_fast
    assert (Path(path) / "tokenizer.model").is_file()
    # transformers 5 ignores use_fast: the default call gives the same slow tokenizer
    assert type(AutoTokenizer.from_pretrained(path)) is type(tok)

    nl_id = tok.sp_model.piece_to_id("<NL>")
    assert nl_id > 3 and tok.convert_ids_to_tokens(nl_id) == "<NL>"
    tokens = tok.tokenize("一行目<NL>二行目")
    assert tokens.count("<NL>") == 1 and "<NL>" not in tokens[0] + tokens[-1]
    ids = tok("一行目<NL>二行目")["input_ids"]
    assert ids[-1] == tok.eos_token_id == 3 and ids.count(nl_id) == 1 and tok.bos_token_id not in ids
    assert tok("一行目", add_special_tokens=False)["input_ids"][-1] != 3

    for text in ROUND_TRIP + [s for s in japanese_corpus()[:50] if "\n" not in s]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text  # byte fallback instead of <unk>
        assert tok.sp_model.decode(ids) == unicodedata.normalize("NFKC", text)
    seen = "日本の首都は東京です。<NL>富士山は高い山です。"  # characters of the shipped data
    assert tok.decode(tok(seen)["input_ids"], skip_special_tokens=True) == seen


@pytest.mark.xfail(reason="transformers 5 SentencePieceBackend.decode does not fuse byte-fallback pieces")
def test_rinna_decode_of_byte_fallback(tiny_model_dir: BuildDir) -> None:
    tok = _load(tiny_model_dir, "rinna")
    assert tok.decode(tok.encode(UNSEEN, add_special_tokens=False)) == UNSEEN


@pytest.mark.xfail(reason="transformers 5 save_pretrained drops special_tokens_pattern: </s> no longer appended")
def test_rinna_resaved_tokenizer_appends_eos(tiny_model_dir: BuildDir, tmp_path: Path) -> None:
    _load(tiny_model_dir, "rinna").save_pretrained(str(tmp_path))
    resaved = AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False)
    assert resaved("テスト")["input_ids"][-1] == resaved.eos_token_id


def test_llama3_chat_template_and_generation_config(tiny_model_dir: BuildDir) -> None:
    path = tiny_model_dir("llama3-elyza")
    tok = AutoTokenizer.from_pretrained(str(path))
    messages = [
        {"role": "system", "content": "あなたは誠実なアシスタントです。"},
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": "はい、こんにちは。"},
    ]
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    assert tok.apply_chat_template(messages, tokenize=False) == "<|begin_of_text|>" + turns
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.count("<|begin_of_text|>") == 1
    assert prompt.endswith("こんにちは<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    gen = json.loads((path / "generation_config.json").read_text())
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|end_of_text|>"), eot]
    assert tok.eos_token == "<|end_of_text|>"  # the naive eos that jalora must switch to <|eot_id|>


def test_llm_jp_3_chat_template(tiny_model_dir: BuildDir) -> None:
    tok = _load(tiny_model_dir, "llm-jp-3")
    default = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
    user = {"role": "user", "content": "日本の首都は？"}
    answer = {"role": "assistant", "content": "東京です。"}
    assert tok.apply_chat_template([user, answer], tokenize=False) == (
        "<s>" + default + "### 指示:\n日本の首都は？\n\n### 応答:\n東京です。</s>"
    )
    system = {"role": "system", "content": "あなたは親切です。"}
    prompt = tok.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>あなたは親切です。\n\n### 指示:\n日本の首都は？\n\n### 応答:\n"


def test_qwen_chat_template(tiny_model_dir: BuildDir) -> None:
    tok = _load(tiny_model_dir, "qwen2.5")
    user = {"role": "user", "content": "こんにちは"}
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\n"
    )
    system = {"role": "system", "content": "日本語で答えてください。"}
    answer = {"role": "assistant", "content": "はい。"}
    assert tok.apply_chat_template([system, user, answer], tokenize=False) == (
        "<|im_start|>system\n日本語で答えてください。<|im_end|>\n"
        "<|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\nはい。<|im_end|>\n"
    )


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama3-elyza", "llm-jp-3", "qwen2.5", "gemma2")])
def test_no_chat_template(tiny_model_dir: BuildDir, family: str) -> None:
    assert _load(tiny_model_dir, family).chat_template is None


@pytest.mark.parametrize("family", FAMILIES)
def test_model_matches_tokenizer_and_trains(tiny_model_dir: BuildDir, family: str) -> None:
    path = tiny_model_dir(family)
    tok = _load(tiny_model_dir, family)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    config = model.config
    arch = LAYOUT[family][0]
    assert type(model).__name__ == arch and config.architectures == [arch]
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    head = "embed_out.weight" if arch.startswith("GPTNeoX") else "lm_head.weight"
    assert head in keys or config.tie_word_embeddings
    assert config.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.intermediate_size == 128 and config.max_position_embeddings >= 2048

    expected_pad = 0 if family in LLAMA2_LIKE else tok.pad_token_id
    expected_bos = tok.convert_tokens_to_ids("<|endoftext|>") if family == "qwen2.5" else tok.bos_token_id
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        expected_bos,
        tok.eos_token_id,
        expected_pad,
    )
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert (NEOX_MODULES if arch.startswith("GPTNeoX") else LLAMA_MODULES) <= leaves

    if family in ("llama3-elyza", "qwen2.5"):
        assert config.num_key_value_heads < config.num_attention_heads
    theta = {"elyza-codellama": 1e6, "llama3-elyza": 5e5, "qwen2.5": 1e6}.get(family)
    if theta is not None:
        assert config.rope_parameters["rope_theta"] == theta
    if family == "qwen2.5":
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.o_proj.bias is None

    texts = ["吾輩は猫である。", "鰻丼と𩸽を食べた。"]
    batch = tok(texts if tok.pad_token else texts[:1], return_tensors="pt", padding=tok.pad_token is not None)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape[-1] == len(tok)
    out.loss.backward()


def test_corpus_prefers_project_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert japanese_corpus() and all(isinstance(s, str) and s for s in japanese_corpus())
    record = {"instruction": "日本の首都は？", "output": "東京です。" * 500, "meta": {"tags": ["地理"]}}
    (tmp_path / tiny_models.TOKENIZER_TEXT[0]).write_text(
        json.dumps(record, ensure_ascii=False) + "\n{broken\n", encoding="utf-8"
    )
    monkeypatch.setattr(tiny_models, "DATA_DIR", tmp_path)
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "使われない"}, ensure_ascii=False), encoding="utf-8")
    assert japanese_corpus() == ["日本の首都は？", "東京です。" * 500, "地理"]
    (tmp_path / tiny_models.TOKENIZER_TEXT[0]).write_text(
        json.dumps({"text": "短い"}, ensure_ascii=False), encoding="utf-8"
    )
    corpus = japanese_corpus()
    assert corpus[0] == "短い" and len(corpus) > 10  # small data is topped up with built-in sentences
