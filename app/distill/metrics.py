"""Answer-selection quality: MAP, MRR and P@1 over questions; accuracy and ROC-AUC over pairs."""

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def ranking_metrics(qids: Sequence[str], scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    """Quality of P(relevant) scores against 0/1 labels; pairs are grouped into questions by qid.

    map, mrr and p_at_1 average over the questions with at least one positive (the others are counted
    in questions_without_positive; all three are nan when no question has one). Within a question, equal
    scores keep their input order. accuracy counts score >= 0.5 as relevant. roc_auc is over all pairs,
    nan when the labels hold one class only. questions and pairs count all the input.
    """
    if not len(qids) == len(scores) == len(labels):
        raise ValueError(
            f"qids, scores and labels differ in length: {len(qids)}, {len(scores)}, {len(labels)}"
        )
    if not len(qids):
        raise ValueError("no pairs to measure")
    score_array = np.asarray(scores, dtype=np.float64)
    label_array = np.asarray(labels)
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    label_array = label_array.astype(np.int64)

    groups: dict[str, list[int]] = {}
    for i, qid in enumerate(qids):
        groups.setdefault(qid, []).append(i)
    average_precisions, reciprocal_ranks, precisions_at_1 = [], [], []
    without_positive = 0
    for indices in groups.values():
        order = np.asarray(indices)[np.argsort(-score_array[indices], kind="stable")]
        relevant = label_array[order]
        if not relevant.any():
            without_positive += 1
            continue
        ranks = np.flatnonzero(relevant) + 1
        average_precisions.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
        reciprocal_ranks.append(1.0 / ranks[0])
        precisions_at_1.append(float(relevant[0]))

    both_classes = 0 < label_array.sum() < len(label_array)
    return {
        "map": _mean(average_precisions),
        "mrr": _mean(reciprocal_ranks),
        "p_at_1": _mean(precisions_at_1),
        "accuracy": float(np.mean((score_array >= 0.5) == (label_array == 1))),
        "roc_auc": float(roc_auc_score(label_array, score_array)) if both_classes else math.nan,
        "questions": len(groups),
        "questions_without_positive": without_positive,
        "pairs": len(label_array),
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
