"""The intervals and error counts bench/jcqa.py reports for JCommonsenseQA runs (bench/jcqa_stats.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from jcqa_stats import error_profile, mcnemar_p, paired_gain, wilson  # noqa: E402


def test_wilson_matches_the_textbook_value_and_stays_in_bounds():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 20)[0] == pytest.approx(0.0, abs=1e-12) and wilson(20, 20)[1] == pytest.approx(1.0)
    assert wilson(0, 20)[1] > 0.1  # zero right out of 20 is not "certainly 0"


def test_paired_gain_counts_only_discordant_questions():
    # 100 questions: 30 both right, 20 only new, 5 only old, 45 both wrong
    new = [True] * 30 + [True] * 20 + [False] * 5 + [False] * 45
    old = [True] * 30 + [False] * 20 + [True] * 5 + [False] * 45
    gain = paired_gain(new, old)
    assert gain["gain"] == pytest.approx(0.15)
    assert (gain["only_new"], gain["only_old"]) == (20, 5)
    se = (25 - 15**2 / 100) ** 0.5 / 100
    assert gain["ci95"] == pytest.approx([0.15 - 1.959964 * se, 0.15 + 1.959964 * se])
    assert gain["mcnemar_p"] == pytest.approx(0.004077, abs=1e-5)  # binomial(25, 0.5), two-sided, k <= 5
    same = paired_gain(new, new)
    assert same["gain"] == 0 and same["ci95"] == [0, 0] and same["mcnemar_p"] == 1.0


def test_mcnemar_is_symmetric_and_capped():
    assert mcnemar_p(3, 9) == mcnemar_p(9, 3) and mcnemar_p(4, 4) == 1.0


def test_error_profile_counts_positions_echoes_and_look_alikes():
    questions = [
        {"q_id": 1, "question": "赤い果物は？", "choice0": "りんご", "choice1": "赤い", "choice2": "青りんご",
         "choice3": "空", "choice4": "海", "label": 0},
        {"q_id": 2, "question": "冬に降るのは？", "choice0": "雪", "choice1": "雨", "choice2": "花",
         "choice3": "葉", "choice4": "星", "label": 0},
        {"q_id": 3, "question": "空を飛ぶのは？", "choice0": "鳥", "choice1": "魚", "choice2": "犬",
         "choice3": "猫", "choice4": "牛", "label": 0},
    ]  # fmt: skip
    rows = [{"q_id": 1, "label": 0, "pred": 2}, {"q_id": 2, "label": 0, "pred": 0}, {"q_id": 3, "label": 0, "pred": 1}]
    profile = error_profile(rows, questions)
    assert profile["wrong"] == 2
    assert profile["predicted_position"] == {0: 1, 1: 1, 2: 1} and profile["label_position"] == {0: 3}
    assert profile["surface_similar"] == 1  # 青りんご contains りんご
    assert profile["in_question"] == 0 and profile["longer"] == 1 and profile["shorter"] == 0
    rows[0]["pred"] = 1  # 赤い is in the question
    assert error_profile(rows, questions)["in_question"] == 1
