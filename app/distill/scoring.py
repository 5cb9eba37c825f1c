"""The one encode-and-score path: training, evaluation, registration and serving score pairs through here.

A pair is tokenised on its own (`PairEncoder`, over data.encode_texts), so its tokens never depend on
its batch-mates; pairs are sorted by length and cut into chunks, each padded to its own longest pair
(`score_encoded`); every member gives logits [N, heads, 2], and `combine_logits` turns them into
P(relevant) per head, averaged over heads and then over members. Backends (torch, ONNX Runtime) only
supply the members' forwards.

A bi-encoder member reads the two sides of a pair apart, so it is served as an `EmbeddingMember`: the
pairs' tokens are split into their sides (`split_sides`: `[CLS] question [SEP]` and `[CLS] passage [SEP]`,
exactly the tokens the pair form keeps), each distinct side is encoded once per batch, and
`cosine_head_logits` scores the pairs from the unit vectors. A question asked with ten passages is then
encoded once instead of ten times, and attention runs over one side's columns instead of both.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from app.distill.data import EncodedPairs, encode_texts
from app.distill.students import BiEncoderStudent

Batch = dict[str, np.ndarray]  # model inputs, int64 [pairs, tokens]
MemberForward = Callable[[Batch], np.ndarray]  # logits [pairs, heads, 2]
SideForward = Callable[[Batch], np.ndarray]  # input_ids, attention_mask [sides, tokens] -> unit vectors [sides, D]
# Small chunks of length-sorted pairs (or sides) keep padding low (WikiQA pairs vary from ~15 to 64 tokens)
# while the matrices stay large enough for efficient kernels. Measured on all-MiniLM-L6-v2 sides with
# ONNX Runtime on 2 cores: chunks of 8 sides beat 12 and 16 (one question with 10 passages: 108 ms vs 136;
# 8 questions: 541 ms vs 595), because two chunks of one question run side by side.
DEFAULT_CHUNK_PAIRS = 8


@dataclass(frozen=True)
class EmbeddingMember:
    """A bi-encoder member as served: a side encoder and its cosine heads' weights (float32 numpy)."""

    embed: SideForward
    weight: np.ndarray  # [H, D]
    bias: np.ndarray  # [H]
    cls_token_id: int  # the passage side's own first token


Member = MemberForward | EmbeddingMember


@dataclass(frozen=True)
class PairSides:
    """The distinct sides of some pairs, and which side each pair's question and passage is."""

    sides: EncodedPairs  # each distinct side once, unpadded
    question: np.ndarray  # [N] row in `sides` of each pair's question side
    passage: np.ndarray  # [N] row in `sides` of each pair's passage side


def split_sides(encoded: EncodedPairs, cls_token_id: int) -> PairSides:
    """Each pair `[CLS] q [SEP] p [SEP]` as its sides `[CLS] q [SEP]` and `[CLS] p [SEP]`, distinct ones once.

    The sides are cut from the pair's own tokens, so they keep exactly what the pair's truncation kept
    (the passage cut to fit, a too-long question cut too): a side's vector is the one the pair form gives.
    """
    if encoded.token_type_ids is None:
        raise ValueError("a bi-encoder member needs token_type_ids to tell the question from the passage")
    rows: dict[tuple[int, ...], int] = {}
    question = np.empty(len(encoded), dtype=np.int64)
    passage = np.empty(len(encoded), dtype=np.int64)
    for i, (ids, types) in enumerate(zip(encoded.input_ids, encoded.token_type_ids, strict=True)):
        split = types.index(1) if 1 in types else len(ids)
        question[i] = rows.setdefault(tuple(ids[:split]), len(rows))
        passage[i] = rows.setdefault((cls_token_id, *ids[split:]), len(rows))
    sides = EncodedPairs(input_ids=[list(ids) for ids in rows], token_type_ids=None, pad_token_id=encoded.pad_token_id)
    return PairSides(sides, question, passage)


def cosine_head_logits(question: np.ndarray, passage: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Logits [N, H, 2] of unit vectors [N, D]: relevance_h = sum_d weight[h, d] q_d p_d + bias[h], as CosineHeads."""
    relevance = (question * passage) @ weight.T + bias
    return np.stack([np.zeros_like(relevance), relevance], axis=-1)


@dataclass(frozen=True, slots=True)
class PairScores:
    """Scores of N pairs: P(relevant) overall, per member and per member's head."""

    scores: np.ndarray  # [N]: mean over members of member_scores
    member_scores: np.ndarray  # [N, K]: mean over heads of head_scores
    head_scores: np.ndarray  # [N, K, H]: softmax(logits)[..., 1]

    def rows(self, start: int, stop: int) -> Self:
        """The scores of pairs start..stop-1."""
        return type(self)(self.scores[start:stop], self.member_scores[start:stop], self.head_scores[start:stop])


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
    members: Sequence[Member],
    *,
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    run: Callable[[Callable[[Callable[[Batch], np.ndarray], Batch], np.ndarray], Iterable, Iterable], Iterable] = map,
) -> PairScores:
    """Scores of encoded pairs: length-sorted chunks, each padded on its own, every member on every chunk.

    A pair member's chunks are of pairs; an EmbeddingMember's are of the pairs' distinct sides (at most
    `chunk_pairs` sides each). `run` maps (forward, batch) over the (chunk, member) pieces: `map`, or an
    executor's map to run them side by side.
    """
    if not len(encoded):
        raise ValueError("no pairs to score")
    pair_chunks = _sorted_chunks(encoded, chunk_pairs)
    pair_batches: list[Batch] | None = None
    sides: dict[int, tuple[PairSides, list[list[int]], list[Batch]]] = {}
    forwards, inputs, counts = [], [], []
    for member in members:
        if isinstance(member, EmbeddingMember):
            if member.cls_token_id not in sides:
                split = split_sides(encoded, member.cls_token_id)
                chunks = _sorted_chunks(split.sides, chunk_pairs)
                sides[member.cls_token_id] = (split, chunks, [split.sides.pad(rows) for rows in chunks])
            batches, forward = sides[member.cls_token_id][2], member.embed
        else:
            if pair_batches is None:
                pair_batches = [encoded.pad(rows) for rows in pair_chunks]
            batches, forward = pair_batches, member
        forwards += [forward] * len(batches)
        inputs += batches
        counts.append(len(batches))
    outputs = list(run(_call, forwards, inputs))
    logits, start = [], 0
    for member, count in zip(members, counts, strict=True):
        parts = outputs[start : start + count]
        start += count
        if isinstance(member, EmbeddingMember):
            split, chunks, _ = sides[member.cls_token_id]
            vectors = _in_rows(parts, chunks)
            question, passage = vectors[split.question], vectors[split.passage]
            logits.append(cosine_head_logits(question, passage, member.weight, member.bias))
        else:
            logits.append(_in_rows(parts, pair_chunks))
    return combine_logits(logits)


def torch_forward(member: nn.Module, device: torch.device | str = "cpu") -> MemberForward:
    """A torch member as a MemberForward: numpy inputs in, float32 numpy logits out, under inference mode."""
    device = torch.device(device)

    def forward(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            logits = member(**{k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()})
        return logits.float().cpu().numpy()

    return forward


def torch_member(member: nn.Module, device: torch.device | str = "cpu") -> Member:
    """A torch member as served: an EmbeddingMember for a bi-encoder student, else its pair forward."""
    if not isinstance(member, BiEncoderStudent):
        return torch_forward(member, device)
    device = torch.device(device)
    heads = member.heads

    def embed(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            vectors = member.embed(*(torch.from_numpy(batch[k]).to(device) for k in ("input_ids", "attention_mask")))
        return vectors.float().cpu().numpy()

    weight, bias = (t.detach().float().cpu().numpy() for t in (heads.weight, heads.bias))
    return EmbeddingMember(embed, weight, bias, member.cls_token_id)


def _sorted_chunks(encoded: EncodedPairs, most: int) -> list[list[int]]:
    """Row indices sorted by length, cut into even chunks of at most `most`."""
    return even_chunks(np.argsort(encoded.lengths(), kind="stable").tolist(), most)


def _in_rows(parts: list[np.ndarray], chunks: list[list[int]]) -> np.ndarray:
    """The chunks' outputs put back in row order."""
    rows = np.concatenate([np.asarray(p) for p in parts])
    out = np.empty_like(rows)
    out[np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks])] = rows
    return out


def _call(forward: Callable[[Batch], np.ndarray], batch: Batch) -> np.ndarray:
    return forward(batch)
