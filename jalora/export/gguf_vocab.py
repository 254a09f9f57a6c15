"""The tokenizer as llama.cpp reads it from a GGUF: tokens, their types, scores or merges, and the
pre-tokenizer id that tells llama.cpp how to split text before BPE.

SentencePiece vocabularies come from the `tokenizer.model` file through gguf's own
`SentencePieceVocab` (the scores llama.cpp's SentencePiece tokenizer needs exist only there);
byte-level BPE vocabularies from `tokenizer.json` with gguf's `SpecialVocab` for the merges. A base
that is itself a GGUF hands its tokenizer fields over unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from jalora.errors import UserError

# The regex of the Split pre-tokenizer in tokenizer.json -> llama.cpp's pre-tokenizer id.
# Llama-3 and Qwen2 differ only in how many digits form a piece.
_SPLIT_PATTERNS = {
    r"\p{N}{1,3}": "llama-bpe",
    r"\p{N}|": "qwen2",
}
TOKENIZER_FIELDS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.add_space_prefix",
)


@dataclass
class GgufVocab:
    """What goes under tokenizer.ggml.*: model ("llama" = SentencePiece, "gpt2" = byte-level BPE);
    add_space_prefix None leaves llama.cpp's default (SentencePiece: a "▁" before the text)."""

    model: str
    tokens: list[bytes]
    types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    add_space_prefix: bool | None = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def pre_tokenizer_id(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE.

    llama.cpp recognises a pre-tokenizer by hashing the tokens of a probe text and looking the hash
    up in a table; here the same families are recognised from the pre-tokenizer's definition itself.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex", "")
        for marker, name in _SPLIT_PATTERNS.items():
            if marker in regex:
                return name
    raise UserError(
        f"{where}: pre-tokenizer {json.dumps(pre)[:120]} is not one llama.cpp is known to split the same way "
        "(GPT-2, Llama-3, Qwen2, SmolLM); the GGUF would tokenize differently from training"
    )


def token_types(tokenizer) -> list[int]:
    """CONTROL for special added tokens (so llama.cpp parses `<|im_end|>` as one token and may end a
    turn on it), USER_DEFINED for other added tokens, BYTE for `<0xNN>` pieces, else NORMAL."""
    added = tokenizer.added_tokens_decoder
    types = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return [int(t) for t in types]


def bpe_vocab(tokenizer, folder: Path) -> GgufVocab:
    """Byte-level BPE: tokens in their byte-level spelling, merges, and the pre-tokenizer id."""
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # its guesses about special tokens are noise here: we set them ourselves
    try:
        merges = gguf.SpecialVocab(folder, load_merges=True).merges
    finally:
        gguf_log.setLevel(level)
    tokens = [t.encode("utf-8") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    return GgufVocab(
        "gpt2", tokens, token_types(tokenizer), merges=merges, pre=pre_tokenizer_id(tokenizer_json, folder)
    )


def sentencepiece_vocab(tokenizer, folder: Path) -> GgufVocab:
    """SentencePiece: pieces, scores and types from tokenizer.model; added tokens (ids past the
    model's pieces) appended as gguf's helper does."""
    spm = gguf.SentencePieceVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in spm.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    added = tokenizer.added_tokens_decoder
    for i in range(len(tokens), len(tokenizer)):
        tokens.append(added[i].content.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
    return GgufVocab("llama", tokens, types, scores=scores)


def hf_vocab(tokenizer, folder: Path) -> GgufVocab:
    """The vocabulary of a transformers tokenizer saved in `folder`: SentencePiece when a
    tokenizer.model is there, byte-level BPE when tokenizer.json says so; else a one-line error."""
    if (folder / "tokenizer.model").is_file():
        return sentencepiece_vocab(tokenizer, folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder}: neither tokenizer.model nor tokenizer.json found; the GGUF needs one of them")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    if (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel":
        return bpe_vocab(tokenizer, folder)
    raise UserError(
        f"{folder}: tokenizer.model not found; this is a SentencePiece-style tokenizer "
        f"({tokenizer_json['model']['type']} in tokenizer.json), whose scores llama.cpp reads from tokenizer.model: "
        "put the base model's tokenizer.model into this folder"
    )


def gguf_file_vocab(path: Path) -> GgufVocab:
    """The tokenizer fields of an existing GGUF, unchanged (a GGUF base keeps its own vocabulary)."""
    reader = gguf.GGUFReader(path)
    values = {name: reader.fields[name].contents() for name in TOKENIZER_FIELDS if name in reader.fields}
    return GgufVocab(
        model=values["tokenizer.ggml.model"],
        tokens=[t.encode("utf-8") for t in values["tokenizer.ggml.tokens"]],
        types=list(values["tokenizer.ggml.token_type"]),
        scores=list(values.get("tokenizer.ggml.scores", [])),
        merges=list(values.get("tokenizer.ggml.merges", [])),
        pre=values.get("tokenizer.ggml.pre"),
        add_space_prefix=values.get("tokenizer.ggml.add_space_prefix"),
    )
