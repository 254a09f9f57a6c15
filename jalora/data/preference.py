"""Preference pairs for DPO/ORPO: read and validate, then tokenize with the SFT tokenizer.

Three forms are accepted, one per line of JSONL (or rows of .json/.csv/.parquet):
dolly-style `instruction` / `input` / `chosen` / `rejected`; `prompt` / `chosen` / `rejected`;
and chat, `messages` (ending with a user turn) plus `chosen` / `rejected` assistant replies
(a string, an assistant message, or a list holding one). The prompt is rendered by the same
Prompter as SFT and each side is tokenized by `tokenize_records`, so the ids follow the SFT
token rules: eos ends each reply, padding is never eos, and the reply ids are those of the
joint prompt + reply text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jalora.data.prompts import Prompter
from jalora.data.records import IGNORE_INDEX, Record, TokenizeStats, _messages, read_rows, tokenize_records
from jalora.errors import UserError

PAIR_FIELDS = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One prompt with a preferred and a dispreferred reply. `where` is "file:line" for errors."""

    chosen: str
    rejected: str
    instruction: str = ""
    input: str = ""
    messages: list[dict] = field(default_factory=list)
    where: str = ""

    def as_record(self, reply: str) -> Record:
        """The SFT record whose answer is `reply`: the prompt is the same for both sides."""
        if self.messages:
            return Record(messages=[*self.messages, {"role": "assistant", "content": reply}], where=self.where)
        return Record(instruction=self.instruction, input=self.input, output=reply, where=self.where)


def _reply(row: dict, name: str, where: str) -> str:
    """`chosen` / `rejected` as text: a string, {"role": "assistant", "content": ...}, or a list of one such."""
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: field {name!r} is missing (a preference pair needs both 'chosen' and 'rejected')")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise UserError(f"{where}: field {name!r} must be an assistant reply, got role {value.get('role')!r}")
        value = value.get("content")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string or an assistant message")
    if not value.strip():
        raise UserError(f"{where}: field {name!r} is empty")
    return value


def _text(row: dict, name: str, where: str, required: bool) -> str:
    value = row.get(name, "")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: field {name!r} is {'empty' if name in row else 'missing'}")
    return value


def to_pair(row: object, where: str) -> PreferencePair:
    """Validate one raw row and normalise it to a PreferencePair."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    chosen, rejected = _reply(row, "chosen", where), _reply(row, "rejected", where)
    if chosen.strip() == rejected.strip():
        raise UserError(f"{where}: field 'rejected' equals 'chosen'; a pair must prefer one reply over another")
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            if messages[-1].get("role") != "user":
                raise UserError(f"{where}: field 'messages' must end with a user turn (the replies are the answers)")
        with_reply = _messages({"messages": [*messages, {"role": "assistant", "content": chosen}]}, where)
        return PreferencePair(chosen, rejected, messages=with_reply[:-1], where=where)
    if "prompt" in row:
        return PreferencePair(chosen, rejected, instruction=_text(row, "prompt", where, True), where=where)
    if "instruction" in row:
        instruction = _text(row, "instruction", where, True)
        return PreferencePair(chosen, rejected, instruction, _text(row, "input", where, False), where=where)
    raise UserError(f"{where}: a preference pair needs a prompt: field 'prompt', 'instruction' or 'messages'")


def load_pairs(data_path: str) -> list[PreferencePair]:
    """All pairs of a local file or hub dataset, validated."""
    pairs = [to_pair(row, where) for where, row in read_rows(data_path)]
    if not pairs:
        raise UserError(f"{data_path}: no preference pairs found")
    return pairs


def _prompt_length(example: dict) -> int:
    """Positions before the last reply: everything up to the last masked label."""
    masked = [i for i, label in enumerate(example["labels"]) if label == IGNORE_INDEX]
    return masked[-1] + 1 if masked else 0


def tokenize_pairs(
    pairs: list[PreferencePair], prompter: Prompter, cutoff_len: int
) -> tuple[list[dict], TokenizeStats]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} per pair, as trl's preference collator takes them.

    Both sides go through `tokenize_records` (the SFT tokenizer: eos after each reply, truncation
    keeps it). A pair is dropped for the same reason an SFT record is: its prompt alone fills
    `cutoff_len`; that depends on the shared prompt only, so both sides are kept or dropped together.
    """
    chosen, chosen_stats = tokenize_records([p.as_record(p.chosen) for p in pairs], prompter, cutoff_len)
    rejected, rejected_stats = tokenize_records([p.as_record(p.rejected) for p in pairs], prompter, cutoff_len)
    if chosen_stats.dropped != rejected_stats.dropped:
        raise AssertionError("chosen and rejected sides were dropped differently")
    examples = []
    for good, bad in zip(chosen, rejected):
        n = min(_prompt_length(good), _prompt_length(bad))
        if good["input_ids"][:n] != bad["input_ids"][:n]:
            raise AssertionError("chosen and rejected prompts tokenized differently")
        examples.append(
            {
                "prompt_ids": good["input_ids"][:n],
                "chosen_ids": good["input_ids"][n:],
                "rejected_ids": bad["input_ids"][n:],
            }
        )
    stats = TokenizeStats(
        kept=len(examples),
        truncated=max(chosen_stats.truncated, rejected_stats.truncated),
        dropped=chosen_stats.dropped,
    )
    return examples, stats
