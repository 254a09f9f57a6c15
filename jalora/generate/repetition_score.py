"""Numbers that say how repetitive an answer is, so penalties can be tuned by measurement.

Counted on characters, not tokens: Japanese has no spaces to split words on, and character
n-grams give the same score for the same text whatever tokenizer produced it.
"""

from __future__ import annotations

from collections import Counter


def _ngrams(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an earlier one: 0.0 none, near 1.0 a loop."""
    grams = _ngrams(text, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct n-grams over all n-grams (distinct-2 for n=2): 1.0 no repeats, low values loops."""
    grams = _ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_report(text: str) -> dict[str, float]:
    """The `--report` figures of one answer."""
    top = Counter(_ngrams(text, 3)).most_common(1)
    return {
        "repeated_3gram_share": round(repeated_ngram_share(text, 3), 4),
        "distinct_2": round(distinct_n(text, 2), 4),
        "top_3gram_count": top[0][1] if top else 0,
    }


def format_report(report: dict[str, float]) -> str:
    return (
        f"repeated 3-grams {report['repeated_3gram_share']:.1%}, distinct-2 {report['distinct_2']:.3f}, "
        f"most frequent 3-gram x{report['top_3gram_count']}"
    )
