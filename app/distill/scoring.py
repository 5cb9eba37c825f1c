"""The one encode-and-score path: training, evaluation, registration and serving score pairs through here.

A pair is tokenised on its own (`PairEncoder`, over data.encode_texts), so its tokens never depend on
its batch-mates; pairs are sorted by length and cut into chunks, each padded to its own longest pair
(`score_encoded`); every member gives logits [N, heads, 2], and `combine_logits` turns them into
P(relevant) per head, averaged over heads and then over members. Backends (torch, ONNX Runtime) only
supply the members' forwards.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from app.distill.data import EncodedPairs, encode_texts

Batch = dict[str, np.ndarray]  # model inputs, int64 [pairs, tokens]
MemberForward = Callable[[Batch], np.ndarray]  # logits [pairs, heads, 2]
# Small chunks of length-sorted pairs keep padding low (WikiQA pairs vary from ~15 to 64 tokens) while
# the matrices stay large enough for efficient kernels.
DEFAULT_CHUNK_PAIRS = 8


@dataclass(frozen=True, slots=True)
class PairScores:
    """Scores of N pairs: P(relevant) overall, per member and per member's head."""

    scores: np.ndarray  # [N]: mean over members of member_scores
    member_scores: np.ndarray  # [N, K]: mean over heads of head_scores
    head_scores: np.ndarray  # [N, K, H]: softmax(logits)[..., 1]

    def rows(self, start: int, stop: int) -> Self:
        """The scores of pairs start..stop-1."""
        return type(self)(self.scores[start:stop], self.member_scores[start:stop], self.head_scores[start:stop])

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


def combine_logits(member_logits: Sequence[np.ndarray]) -> PairScores:
    """Turn each member's [N, H, 2] logits into P(relevant) per head, per member and overall (means).

    The mean is over probabilities, not logits: a confident head is not outvoted by a large logit of
    another (the standard folders of app/distill/standard.py use the mean logit instead).
    """
    logits = np.stack([np.asarray(m, dtype=np.float64) for m in member_logits], axis=1)  # [N, K, H, 2]
    # softmax(l)[1] == sigmoid(l1 - l0): stable and cheaper than a full softmax.
    head = 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))
    member = head.mean(axis=2)
    return PairScores(member.mean(axis=1), member, head)


@dataclass(frozen=True)
class PairEncoder:
    """Tokenises (question, passage) pairs for a student: each pair alone, cut to max_length."""

    tokenizer: Any
    max_length: int

    @property
    def pad_id(self) -> int:
        """The token id padding uses."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def __call__(self, questions: Sequence[str], passages: Sequence[str]) -> EncodedPairs:
        """The unpadded token ids of every pair."""
        return encode_texts(questions, passages, self.tokenizer, self.max_length)


def even_chunks(items: list[int], most: int) -> list[list[int]]:
    """`items` cut into the fewest consecutive chunks of at most `most`, their sizes differing by one at most."""
    count = -(-len(items) // most)
    size, extra = divmod(len(items), count)
    chunks, start = [], 0
    for i in range(count):
        stop = start + size + (i < extra)
        chunks.append(items[start:stop])
        start = stop
    return chunks


def score_encoded(
    encoded: EncodedPairs,
    members: Sequence[MemberForward],
    *,
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    run: Callable[[Callable[[MemberForward, Batch], np.ndarray], Iterable, Iterable], Iterable] = map,
) -> PairScores:
    """Scores of encoded pairs: length-sorted chunks, each padded on its own, every member on every chunk.

    `run` maps (forward, batch) over the (chunk, member) pieces: `map`, or an executor's map to run
    them side by side.
    """
    if not len(encoded):
        raise ValueError("no pairs to score")
    order = np.argsort(encoded.lengths(), kind="stable").tolist()
    batches = [encoded.pad(rows) for rows in even_chunks(order, chunk_pairs)]
    forwards = [forward for _ in batches for forward in members]
    inputs = [batch for batch in batches for _ in members]
    logits = list(run(_call, forwards, inputs))
    k = len(members)
    parts = [combine_logits(logits[i * k : (i + 1) * k]) for i in range(len(batches))]
    return PairScores.concat(parts).take(np.argsort(order))


def torch_forward(member: nn.Module, device: torch.device | str = "cpu") -> MemberForward:
    """A torch member as a MemberForward: numpy inputs in, float32 numpy logits out, under inference mode."""
    device = torch.device(device)

    def forward(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            logits = member(**{k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()})
        return logits.float().cpu().numpy()

    return forward


def _call(forward: MemberForward, batch: Batch) -> np.ndarray:
    return forward(batch)
