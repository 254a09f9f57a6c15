"""Prompt templates and the one place where prompts become token ids.

Training and generation both call `Prompter.render` and `Prompter.encode`, so the ids a
model is trained on and the ids it is asked with are the same by construction.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from jalora.errors import UserError
from jalora.presets import Preset

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates"
PLACEHOLDERS = ("instruction", "input", "system")
# User messages a chat template must pass through untouched before its rendering is reused as a frame:
# edge whitespace and newlines (templates that trim fail here), braces, quotes, backslashes, Japanese.
FRAME_PROBES = ("x", "  前後に空白\n\n", "\n改行\nあり ", "{{ '{%' }} {x} \"'\\", "。")
# How much of the text before a piece is joined to it to find the piece's ids (see `encode_after`).
CONTEXT_CHARS = 16


@dataclass(frozen=True)
class Template:
    """An alpaca-lora style template (`prompt_input`, `prompt_no_input`, `response_split`),
    optionally with a default `system` prompt, or a pointer to the tokenizer's chat template."""

    name: str
    description: str = ""
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str = ""
    system: str | None = None
    use_chat_template: bool = False


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(name_or_path: str) -> Template:
    """Load a template by name (templates/NAME.json) or from a .json path. Templates are data only."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = TEMPLATE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise UserError(f"unknown template {name_or_path!r}; choose one of: {', '.join(template_names())}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read template: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a template is a JSON object")
    known = set(Template.__dataclass_fields__) - {"name"}
    fields = {k: v for k, v in raw.items() if k in known}
    for key, value in fields.items():
        expected = bool if key == "use_chat_template" else str
        if not isinstance(value, expected) and not (key == "system" and value is None):
            raise UserError(f"{path}: field {key!r} must be a {expected.__name__}")
    template = Template(name=path.stem, **fields)
    if not template.use_chat_template:
        for key in ("prompt_input", "prompt_no_input"):
            check_placeholders(path, key, getattr(template, key))
            if "{instruction}" not in getattr(template, key):
                raise UserError(f"{path}: field {key!r} must contain {{instruction}}")
        if "{input}" not in template.prompt_input:
            raise UserError(f"{path}: field 'prompt_input' must contain {{input}}")
    return template


def fold_system(messages: list[dict]) -> list[dict]:
    """A leading system message written at the head of the user message after it (`{system}\n\n{user}`),
    the way Gemma 3's -it template does it; Gemma 2's template raises on a system message instead."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    system, user, *rest = messages
    return [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *rest]


def chat_template_file(name: str) -> str:
    """The Jinja text of templates/NAME, a chat template jalora gives tokenizers that have none."""
    path = TEMPLATE_DIR / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot read chat template: {err}") from None


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encode starts with BOS (Llama tokenizers report
    `add_bos_token=False` and still add it, so we look at what it does)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def check_placeholders(path: Path, key: str, text: str) -> None:
    """Templates are data: only the plain fields {instruction}, {input} and {system}. str.format
    would otherwise follow `{instruction.__class__}` or `{input[0]}` into Python objects."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise UserError(f"{path}: field {key!r} has unbalanced braces ({err}); write literal braces doubled") from None
    for _, name, spec, conversion in parsed:
        if name is not None and (name not in PLACEHOLDERS or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(
                f"{path}: field {key!r} has placeholder {shown}; only {{instruction}}, {{input}} and {{system}} "
                "are allowed (no attributes, indexes or format specs)"
            )


class Prompter:
    """Renders (instruction, input) or chat messages into prompt text and token ids."""

    def __init__(self, template: Template, tokenizer, preset: Preset, system_prompt: str | None = None):
        if template.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"template {template.name!r} uses the tokenizer's chat template, but this tokenizer has none; "
                "pass --prompt_template_name alpaca_ja"
            )
        takes_system = template.use_chat_template or "{system}" in template.prompt_input + template.prompt_no_input
        if system_prompt is not None and not takes_system:
            raise UserError(
                f"--system_prompt has no effect: template {template.name!r} has no {{system}} slot; "
                "use a chat-template preset, llama2_ja, or a template of your own"
            )
        self.template = template
        self.tokenizer = tokenizer
        self.preset = preset
        default = template.system or preset.system_prompt
        self.system_prompt = system_prompt if system_prompt is not None else (default if takes_system else None)
        self.add_bos = preset.add_bos if preset.add_bos is not None else tokenizer_adds_bos(tokenizer)

    # --- text -----------------------------------------------------------------------------
    def render(self, instruction: str, input: str = "") -> str:
        """The prompt text for one instruction, exactly as the model sees it (before BOS)."""
        if self.template.use_chat_template:
            user = self.user_message(instruction, input)
            if self._user_frame is None or not user.strip():  # trimming a blank message also trims what precedes it
                return self.render_chat([{"role": "user", "content": user}])
            prefix, write, suffix = self._user_frame
            return prefix + write(user) + suffix
        fmt = self.template.prompt_input if input else self.template.prompt_no_input
        return fmt.format(instruction=instruction, input=input, system=self.system_prompt or "")

    @staticmethod
    def user_message(instruction: str, input: str = "") -> str:
        """The user turn a chat template is given for an (instruction, input) record."""
        return f"{instruction}\n\n{input}" if input else instruction

    def with_system(self, messages: list[dict]) -> list[dict]:
        """The messages a chat template renders: the system prompt first, unless one is there. A family
        without a system role (Gemma) gets it at the head of the first user message instead."""
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if self.preset.system_role:
            return messages
        return fold_system(messages)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Chat messages through the tokenizer's template, with the system prompt added if missing."""
        return self.tokenizer.apply_chat_template(
            self.with_system(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @cached_property
    def _user_frame(self) -> tuple[str, Callable[[str], str], str] | None:
        """(prefix, how the message is written, suffix) around a single user message, when the chat
        template writes the message as is or stripped (Llama-3's `| trim`): then rendering a prompt is
        a concatenation instead of a Jinja call, the largest cost of tokenizing 15k records. None when
        a probe renders otherwise; every prompt is then rendered in full."""
        marker = "\x00jalora-user-message\x00"
        whole = self.render_chat([{"role": "user", "content": marker}])
        if whole.count(marker) != 1:
            return None
        prefix, suffix = whole.split(marker)
        renders = {probe: self.render_chat([{"role": "user", "content": probe}]) for probe in FRAME_PROBES}
        for write in (str, str.strip, str.rstrip):  # rstrip: a trimmed message after a folded system prompt
            if all(renders[probe] == prefix + write(probe) + suffix for probe in FRAME_PROBES):
                return prefix, write, suffix
        return None

    def rendered_answer(self, before: list[dict], content: str) -> str:
        """The assistant reply `content` as the chat template writes it after the messages `before`
        (Llama-3's template trims it), without the end-of-turn token that follows it."""
        prompt = self.render_chat(before, add_generation_prompt=True)
        full = self.render_chat([*before, {"role": "assistant", "content": content}], add_generation_prompt=False)
        eos = self.tokenizer.eos_token or ""
        if not full.startswith(prompt) or eos not in full[len(prompt) :]:
            return content  # the template ends turns with another token: train on the reply as given
        return full[len(prompt) : full.index(eos, len(prompt))]

    @cached_property
    def _answer_write(self) -> Callable[[str], str] | None:
        """How the chat template writes a single-turn reply (as is, or stripped), when every probe
        shows one of those; then single-turn records need no Jinja call for their answer."""
        before = [{"role": "user", "content": "x"}]
        for write in (str, str.strip):
            if all(self.rendered_answer(before, probe) == write(probe) for probe in FRAME_PROBES):
                return write
        return None

    def answer_text(self, output: str) -> str | None:
        """The supervised text of a single-turn record: the output as the template writes it,
        or None when only a full rendering of the conversation can tell (`chat_segments`)."""
        if not self.template.use_chat_template:
            return output
        return self._answer_write(output) if self._answer_write else None

    def chat_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Split a conversation into (text, is_assistant) pieces for masking by position.

        Assistant pieces are the replies as the template writes them (trimmed by Llama-3's), without
        the end-of-turn token (the caller appends the eos id); the template's text between turns,
        after that token, opens the following prompt piece.
        """
        if not self.template.use_chat_template:
            raise UserError(
                f"field 'messages' needs a chat template, but template {self.template.name!r} is not one; "
                "use a chat-template preset (llama3-elyza, llm-jp-3, qwen2.5) or --prompt_template_name chat"
            )
        segments: list[tuple[str, bool]] = []
        consumed = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render_chat(messages[:i], add_generation_prompt=True)
            if not prompt.startswith(consumed):
                raise UserError(
                    f"the chat template of this tokenizer is not prefix-stable, so turn {i} cannot be "
                    "masked exactly; train on single-turn data instead"
                )
            answer = self.rendered_answer(messages[:i], message["content"])
            segments += [(prompt[len(consumed) :], False), (answer, True)]
            consumed = prompt + answer + (self.tokenizer.eos_token or "")
        return segments

    def _map_newlines(self, text: str) -> str:
        return text.replace("\n", self.preset.newline_token) if self.preset.newline_token else text

    # --- ids ------------------------------------------------------------------------------
    def encode(self, texts: list[str], first: bool = True) -> list[list[int]]:
        """Token ids for texts, batched. `first` pieces get the preset's BOS unless the text
        already begins with it; nothing else is ever added (rinna's tokenizer would append </s>)."""
        if not texts:
            return []
        texts = [self._map_newlines(t) for t in texts]
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if first and self.add_bos and bos is not None:
            ids = [row if row[:1] == [bos] else [bos, *row] for row in ids]
        return ids

    def encode_after(self, contexts: list[str], texts: list[str]) -> list[list[int]]:
        """Ids of each text where it continues its context in the joint text `context + text`.

        Encoding a text on its own is wrong for SentencePiece tokenizers: they put their dummy
        prefix `▁` in front, an id the joint text never has there. Encoding every joint text would
        tokenize each prompt twice (a third slower), so only the context's last CONTEXT_CHARS
        characters are joined with the text: tokenizers merge locally, and the ids after that
        window are the joint text's (the tests compare them with whole joint encodings on the real
        tokenizers). Where the window's own ids are not a prefix of the joined ids, the tokenizer
        merges across the boundary (`[/INST] ` + `The` is `]` `▁The`) and no split of the joint ids
        gives the text; then the text is encoded after the eos token, which tokenizers split on
        without a dummy prefix, so its ids decode to exactly the text after the context's ids.
        """
        windows = [context[-CONTEXT_CHARS:] for context in contexts]
        unique = list(dict.fromkeys(windows))
        window_ids = dict(zip(unique, self.encode(unique, first=False)))
        pieces: list[list[int] | None] = []
        for window, ids in zip(windows, self.encode([w + t for w, t in zip(windows, texts)], first=False)):
            head = window_ids[window]
            pieces.append(ids[len(head) :] if ids[: len(head)] == head and len(ids) > len(head) else None)
        merged = [i for i, ids in enumerate(pieces) if ids is None]
        eos_text, eos = self.tokenizer.eos_token, self.tokenizer.eos_token_id
        for i, ids in zip(merged, self.encode([eos_text + texts[i] for i in merged], first=False)):
            pieces[i] = ids[1:] if ids[:1] == [eos] else self.encode([texts[i]], first=False)[0]
        return pieces  # type: ignore[return-value]

    def decode(self, ids: list[int]) -> str:
        """Answer text from generated ids: special tokens dropped, <NL> back to newlines, and no
        dangling replacement character where the last token ended inside a multi-byte character."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        return text.replace(self.preset.newline_token, "\n") if self.preset.newline_token else text
