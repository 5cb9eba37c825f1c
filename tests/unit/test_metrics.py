"""Ranking and pair metrics against examples worked by hand."""

import math

import pytest

from app.distill.metrics import ranking_metrics

# q1 ranks neg, pos, pos; q2 ranks pos first; q3 has no positive.
QIDS = ["q1", "q1", "q1", "q2", "q2", "q3", "q3"]
SCORES = [0.9, 0.8, 0.1, 0.7, 0.2, 0.5, 0.05]
LABELS = [0, 1, 1, 1, 0, 0, 0]


def test_ranking_metrics_on_a_hand_worked_example() -> None:
    got = ranking_metrics(QIDS, SCORES, LABELS)
    # AP(q1) = (1/2 + 2/3) / 2 = 7/12, AP(q2) = 1; RR = 1/2 and 1; P@1 = 0 and 1.
    assert got["map"] == pytest.approx((7 / 12 + 1) / 2)
    assert got["mrr"] == pytest.approx(0.75)
    assert got["p_at_1"] == pytest.approx(0.5)
    # Right at threshold 0.5: 0.8, 0.7, 0.2 and 0.05; wrong: 0.9, 0.1 and 0.5 (0.5 counts as relevant).
    assert got["accuracy"] == pytest.approx(4 / 7)
    # Positive above negative in 3 + 1 + 3 of the 3 x 4 pairs.
    assert got["roc_auc"] == pytest.approx(7 / 12)
    assert (got["questions"], got["questions_without_positive"], got["pairs"]) == (3, 1, 7)


def test_questions_need_not_be_consecutive() -> None:
    order = [3, 0, 5, 1, 4, 6, 2]
    shuffled = ranking_metrics(
        [QIDS[i] for i in order], [SCORES[i] for i in order], [LABELS[i] for i in order]
    )
    assert shuffled == pytest.approx(ranking_metrics(QIDS, SCORES, LABELS))


def test_equal_scores_keep_input_order() -> None:
    assert ranking_metrics(["q"] * 3, [0.5] * 3, [0, 0, 1])["mrr"] == pytest.approx(1 / 3)
    assert ranking_metrics(["q"] * 3, [0.5] * 3, [1, 0, 0])["mrr"] == pytest.approx(1.0)


def test_perfect_ranking_scores_one() -> None:
    got = ranking_metrics(["a", "a", "b", "b"], [0.9, 0.1, 0.2, 0.8], [1, 0, 0, 1])
    assert (got["map"], got["mrr"], got["p_at_1"], got["accuracy"], got["roc_auc"]) == (
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
    )


def test_one_class_gives_nan_roc_auc_and_no_positive_gives_nan_ranking() -> None:
    got = ranking_metrics(["a", "a", "b"], [0.9, 0.2, 0.4], [0, 0, 0])
    assert math.isnan(got["roc_auc"])
    assert math.isnan(got["map"]) and math.isnan(got["mrr"]) and math.isnan(got["p_at_1"])
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["questions_without_positive"] == 2


def test_refuses_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="length"):
        ranking_metrics(["a", "a"], [0.1], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        ranking_metrics(["a"], [0.1], [2])
    with pytest.raises(ValueError, match="no pairs"):
        ranking_metrics([], [], [])
