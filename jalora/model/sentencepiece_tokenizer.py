"""A SentencePiece tokenizer that behaves like the model's own, for rinna-style repositories.

rinna's repositories ship `spiece.model` and declare `T5Tokenizer`. In transformers 5 that
class is fast-only and converts the file with T5's assumptions (unknown characters become
id 2 `<s>`, a forced `▁` prefix, whitespace collapsed), and `use_fast=False` is ignored. So
we skip AutoTokenizer and run the `.model` file through SentencePiece itself. transformers'
generic `SentencePieceBackend` encodes exactly like SentencePiece but decodes by joining
piece strings (byte-fallback pieces come out as `<0xE9>`, edge spaces are stripped), so
decoding here is SentencePiece's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import SentencePieceBackend

from jalora.errors import UserError

SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
# What AutoTokenizer can reload from a saved folder: the generic class, with `tokenizer.model`.
SAVED_CLASS = "SentencePieceBackend"


class SentencePieceTokenizer(SentencePieceBackend):
    """`SentencePieceBackend` whose decode is SentencePiece's own (bytes and spaces come back intact)."""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as the generic class, so `AutoTokenizer.from_pretrained(adapter_dir)` loads it too."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_path = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = SAVED_CLASS
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return files


def _find(path: str, names: tuple[str, ...], **hub_kwargs) -> str | None:
    """The first of `names` in a local folder or hub repo, or None."""
    from transformers.utils import cached_file

    for name in names:
        found = cached_file(
            path,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if found:
            return found
    return None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def load_sentencepiece_tokenizer(path: str, model_files: tuple[str, ...]) -> SentencePieceTokenizer:
    """Build the tokenizer from the repo's SentencePiece file and the special tokens its config names.

    Nothing is appended on encode (the real T5Tokenizer added `</s>`): jalora writes every
    special token itself, so the ids are exactly SentencePiece's.
    """
    model_file = _find(path, model_files)
    if model_file is None:
        raise UserError(f"{path}: no SentencePiece model file ({' or '.join(model_files)}) found")
    config_file = _find(path, ("tokenizer_config.json",))
    config = json.loads(Path(config_file).read_text(encoding="utf-8")) if config_file else {}
    kwargs = {role: _token_text(config[role]) for role in SPECIAL_ROLES if config.get(role)}
    if "model_max_length" in config:
        kwargs["model_max_length"] = config["model_max_length"]
    # legacy=True: encode with the model file's own settings (rinna has no dummy prefix)
    return SentencePieceTokenizer(vocab_file=model_file, legacy=True, **kwargs)
