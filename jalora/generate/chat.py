"""`--interactive`: a chat loop on stdin.

Chat-template families (Llama-3-ELYZA, Qwen2.5, llm-jp-3, ...) see the whole conversation
each turn, rendered by the tokenizer's template exactly as in training. Alpaca-style
templates have no notion of turns, so every question is answered on its own.
"""

from __future__ import annotations

import sys

from jalora.data.prompts import Prompter
from jalora.generate.generator import Generator, Sampling, show_answer

HELP = "/reset clears the history, /exit (or Ctrl-D) quits"


class ChatSession:
    """The conversation so far and the prompt it gives for the next user message."""

    def __init__(self, prompter: Prompter):
        self.prompter = prompter
        self.messages: list[dict] = []

    @property
    def multi_turn(self) -> bool:
        return self.prompter.template.use_chat_template

    def prompt(self, user: str) -> str:
        if not self.multi_turn:
            return self.prompter.render(user)
        return self.prompter.render_chat([*self.messages, {"role": "user", "content": user}])

    def record(self, user: str, reply: str) -> None:
        if self.multi_turn:
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.messages.clear()


def chat_loop(generator: Generator, sampling: Sampling, stream: bool = True, report: bool = False) -> None:
    """Read a message per line from stdin, answer it, until /exit or end of input."""
    session = ChatSession(generator.prompter)
    mode = "keeps the history" if session.multi_turn else f"single-turn ({generator.prompter.template.name} template)"
    print(f"chat: {mode}; {HELP}", flush=True)
    while True:
        print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            print()
            return
        user = line.strip()
        if user == "/exit":
            return
        if user == "/reset":
            session.reset()
            print("(history cleared)", flush=True)
        elif user.startswith("/"):
            print(f"unknown command {user}; {HELP}", flush=True)
        elif user:
            reply = show_answer(generator, session.prompt(user), sampling, stream, report)
            session.record(user, reply)
