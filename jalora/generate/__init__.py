"""Answers from a base model plus adapter: decoding settings, penalties, stop strings, streaming, chat, batch, UI."""
