"""Platt scaling: a relevance logit made into P(relevant) by one fitted scale and shift.

Ranking losses and cosine scores fix the order of a question's candidates, not the level of the scores;
averaging teachers, heads and members by P(relevant), and accuracy at 0.5, need both.
"""

import math

import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor

# The least spread (in logits, one standard deviation of the scores) a calibration leaves: enough to keep
# the order of nearby scores in float32.
MIN_SPREAD = 0.01


def platt_scaling(relevance: Tensor, labels: Tensor) -> tuple[float, float]:
    """(scale, shift) such that sigmoid(scale * relevance + shift) fits the 0/1 labels best; scale > 0.

    Calibration never reverses a model's ranking: scores that do worse than chance on these labels keep
    their order with a scale near 0 (about the base rate everywhere, spread MIN_SPREAD).
    """
    if labels.min() == labels.max():
        return 1.0, 0.0  # one class only: nothing to fit, keep the scores as they are
    values = relevance.double()
    # Standardised for the solver (raw spreads range from 1e-3 to 1e2), then mapped back.
    mean, std = float(values.mean()), max(float(values.std()), 1e-12)
    fit = LogisticRegression(C=1e4).fit(((values - mean) / std).reshape(-1, 1).numpy(), labels.long().numpy())
    scale = float(fit.coef_[0, 0]) / std
    shift = float(fit.intercept_[0]) - scale * mean
    if scale * std < MIN_SPREAD:
        rate = float(labels.float().mean())
        scale = MIN_SPREAD / std
        return scale, math.log(rate / (1 - rate)) - scale * mean
    return scale, shift


def calibrated(logits: Tensor, scale: float, shift: float) -> Tensor:
    """2-class logits [N, 2] rewritten as [0, scale * relevance + shift]."""
    relevance = scale * (logits[:, 1] - logits[:, 0]) + shift
    return torch.stack([torch.zeros_like(relevance), relevance], dim=-1)
