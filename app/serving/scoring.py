"""Ensemble scores of a batch of pairs, combined from the members' logits the way the core combines them."""

from dataclasses import dataclass
from typing import Self

import numpy as np


@dataclass(frozen=True, slots=True)
class PairScores:
    """Scores of N pairs: P(relevant) overall, per member and per member's head."""

    scores: np.ndarray  # [N]: mean over members of member_scores
    member_scores: np.ndarray  # [N, K]: mean over heads of head_scores
    head_scores: np.ndarray  # [N, K, H]: softmax(logits)[..., 1]

    def rows(self, start: int, stop: int) -> Self:
        """The scores of pairs start..stop-1."""
        return type(self)(
            self.scores[start:stop], self.member_scores[start:stop], self.head_scores[start:stop]
        )

    def take(self, indices: np.ndarray) -> Self:
        """The scores of the pairs at `indices`, in that order."""
        return type(self)(self.scores[indices], self.member_scores[indices], self.head_scores[indices])

    @classmethod
    def concat(cls, parts: list[Self]) -> Self:
        """Stack the scores of consecutive chunks of pairs."""
        return cls(
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.member_scores for p in parts]),
            np.concatenate([p.head_scores for p in parts]),
        )


def combine_logits(member_logits: list[np.ndarray]) -> PairScores:
    """Turn each member's [N, H, 2] logits into P(relevant) per head, per member and overall (means)."""
    logits = np.stack([np.asarray(m, dtype=np.float64) for m in member_logits], axis=1)  # [N, K, H, 2]
    # softmax(l)[1] == sigmoid(l1 - l0): stable and cheaper than a full softmax.
    head = 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))
    member = head.mean(axis=2)
    return PairScores(member.mean(axis=1), member, head)
