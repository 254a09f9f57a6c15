"""Statistics of JCommonsenseQA prediction rows (`q_id`, `label`, `pred`, ...): 95 % intervals for
accuracies and for the paired gain of one model over another, and counts of the kinds of mistakes.
Plain Python, so they run on result files without loading torch. Questions use JGLUE's fields
(`question`, `choice0`..`choice4`, `label`)."""

from __future__ import annotations

import math
from collections import Counter

Z95 = 1.959964


def wilson(right: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: unlike the normal one it stays inside [0, 1] and
    keeps its coverage near chance-level accuracies on a few hundred questions."""
    if n == 0:
        return (0.0, 1.0)
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def scored(rows: list[dict], field: str) -> dict:
    """Accuracy of the `field` predictions with its count and 95 % Wilson interval."""
    right = sum(r[field] == r["label"] for r in rows)
    low, high = wilson(right, len(rows))
    return {"acc": right / len(rows), "right": right, "n": len(rows), "ci95": [low, high]}


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as a fair-coin binomial."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_gain(new: list[bool], old: list[bool], z: float = Z95) -> dict:
    """Gain in accuracy of `new` over `old` on the same questions, with the paired (McNemar-style)
    normal interval: only the discordant questions carry information, so the interval is much
    narrower than two independent Wilson intervals would suggest.

    b = questions only `new` gets right, c = only `old`; gain (b - c) / n, standard error
    sqrt(b + c - (b - c)^2 / n) / n.
    """
    n = len(new)
    b = sum(x and not y for x, y in zip(new, old))
    c = sum(y and not x for x, y in zip(new, old))
    gain = (b - c) / n
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return {"gain": gain, "ci95": [gain - z * se, gain + z * se], "only_new": b, "only_old": c, "n": n,
            "mcnemar_p": mcnemar_p(b, c)}  # fmt: skip


def correct(rows: list[dict], field: str) -> list[bool]:
    return [r[field] == r["label"] for r in rows]


def char_overlap(a: str, b: str) -> float:
    """Share of the shorter text's characters found in the other (a crude surface similarity)."""
    short, long = sorted((a, b), key=len)
    return sum(ch in long for ch in short) / len(short)


def error_profile(rows: list[dict], questions: list[dict], field: str = "pred") -> dict:
    """Counts that say what kind of mistakes the `field` predictions make.

    - position: how often each choice position is predicted, against how often it is right;
    - surface_similar: wrong picks sharing at least half their characters with the answer;
    - in_question: wrong picks whose text occurs in the question itself (an echo of the prompt);
    - shorter / longer: wrong picks shorter or longer than the answer (length bias of `acc`).
    """
    by_id = {q["q_id"]: q for q in questions}
    wrong = [(r, by_id[r["q_id"]]) for r in rows if r[field] != r["label"]]
    picked = [(q[f"choice{r[field]}"], q[f"choice{r['label']}"], q["question"]) for r, q in wrong]
    return {
        "wrong": len(wrong),
        "predicted_position": dict(sorted(Counter(r[field] for r in rows).items())),
        "label_position": dict(sorted(Counter(r["label"] for r in rows).items())),
        "surface_similar": sum(char_overlap(pick, right) >= 0.5 for pick, right, _ in picked),
        "in_question": sum(pick in question for pick, _, question in picked),
        "shorter": sum(len(pick) < len(right) for pick, right, _ in picked),
        "longer": sum(len(pick) > len(right) for pick, right, _ in picked),
    }
