"""The training prompt, written for chat clients: a Jinja chat template (GGUF) and an Ollama Modelfile.

Both are built from one rendering of the training prompt with marker strings in the system and user
slots (`prompt_frame`), so they reproduce the prompt jalora trained on byte for byte, whatever the
template: alpaca_ja, llama2_ja or a tokenizer's chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jalora.data.prompts import Prompter

SYSTEM_MARK = "\x00jalora-system\x00"
USER_MARK = "\x00jalora-user\x00"
MODELFILE = "Modelfile"
# preset.generation key -> Ollama PARAMETER name
OLLAMA_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}


@dataclass(frozen=True)
class PromptFrame:
    """The training prompt of one user message as literal pieces around the system and user slots:
    `before_system + SYSTEM + before_user + USER + after_user`; without a system slot, `before_system`
    is empty and `system` is None. `folded`: the family has no system role (Gemma), so a system prompt,
    when there is one, opens the user message and `before_user` is what separates them."""

    before_system: str
    before_user: str
    after_user: str
    system: str | None
    bos: str
    folded: bool = False


def prompt_frame(prompter: Prompter) -> PromptFrame:
    """Render the prompt once with markers in place of the system prompt and the user message."""
    system = prompter.system_prompt
    folded = prompter.template.use_chat_template and not getattr(prompter.preset, "system_role", True)
    marked = Prompter(prompter.template, prompter.tokenizer, prompter.preset, SYSTEM_MARK if system or folded else None)
    text = marked.render(USER_MARK)
    before_user, after_user = text.split(USER_MARK)
    before_system, before_user = before_user.split(SYSTEM_MARK) if system or folded else ("", before_user)
    bos = prompter.tokenizer.bos_token if prompter.add_bos and prompter.tokenizer.bos_token else ""
    return PromptFrame(before_system, before_user, after_user, system, bos, folded)


def _literal(text: str) -> str:
    """Text as a Jinja string expression (JSON string syntax is valid Jinja, escapes included)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def jinja_chat_template(prompter: Prompter) -> str:
    """A chat template that renders the training prompt for each user turn and `reply + eos` for each
    assistant turn; a system message replaces the default system prompt. It writes the BOS the
    training prompt starts with (llama.cpp drops a leading BOS its tokenizer adds anyway)."""
    frame = prompt_frame(prompter)
    system = _literal(frame.before_system) + "{{ system }}" if frame.system is not None else ""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- else -%}{%- set system = "
        + json.dumps(frame.system or "", ensure_ascii=False)
        + " -%}{%- endif -%}"
        + ("{{ bos_token }}" if frame.bos else "")
        + "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}"
        + system
        + _literal(frame.before_user)
        + "{{ message['content'] }}"
        + _literal(frame.after_user)
        + "{%- else -%}{{ message['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
    )


def modelfile(prompter: Prompter, gguf_name: str, stops: list[str]) -> str:
    """An Ollama Modelfile: the GGUF, the training prompt as TEMPLATE, the system prompt, one stop per
    end-of-turn string and the preset's recommended sampling."""
    frame = prompt_frame(prompter)
    if frame.folded:  # no system turn: a system prompt, if any, heads the user message
        system = "{{ if .System }}{{ .System }}" + frame.before_user + "{{ end }}"
        template = frame.before_system + system + "{{ .Prompt }}" + frame.after_user
    else:
        system = "{{ .System }}" if frame.system is not None else ""
        template = frame.before_system + system + frame.before_user + "{{ .Prompt }}" + frame.after_user
    template = template.removeprefix(frame.bos)  # Ollama adds the BOS itself (add_bos_token in the GGUF)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if frame.system is not None:
        lines.append(f'SYSTEM """{frame.system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    for key, name in OLLAMA_PARAMETERS.items():
        if key in prompter.preset.generation:
            lines.append(f"PARAMETER {name} {prompter.preset.generation[key]}")
    return "\n".join(lines) + "\n"
