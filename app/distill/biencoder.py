"""Bi-encoders: the question and the passage encoded apart, mean-pooled, compared by cosine.

Sentence-embedding checkpoints (all-MiniLM-L6-v2, all-mpnet-base-v2) were trained this way, so scoring
them this way keeps what they know. Used zero-shot they are the floors a distilled model must beat;
fine-tuned with a ranking loss over each question's candidates and the batch's other passages they are
teachers that learn the task without forgetting it (a fresh classifier on a cross-encoder's [CLS] token
starts from nothing the checkpoint learned).
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.data import EncodedPairs, Pair, iter_batches
from app.distill.devices import Device
from app.distill.hooks import Cancelled, Hooks
from app.distill.losses import embedding_loss

# cosine * COSINE_SCALE is the relevance logit: cosines live in [-1, 1], and a softmax over a question's
# candidates needs a wider range to be confident (the scale sentence-transformers' ranking loss uses).
COSINE_SCALE = 20.0
INFERENCE_BATCH = 64
# On the CPU a batch is encoded in chunks of this many rows of similar length (see by_length).
CPU_CHUNK_ROWS = 16


def by_length(
    embed: Callable[[Tensor, Tensor], Tensor], input_ids: Tensor, attention_mask: Tensor, rows: int | None = None
) -> Tensor:
    """embed(input_ids, attention_mask) [B, D] of right-padded rows, on the CPU in chunks of `rows` rows sorted by
    length, each cut to its longest row.

    A row's vector does not depend on its batch-mates, but its cost does: a batch pads every row to the longest, and
    a training batch of short and long texts spends half its compute or more on padding. On a GPU, one pass (its
    cost is the number of kernel launches, not the padding), and when traced for export (one graph for any batch).
    """
    rows = rows or CPU_CHUNK_ROWS
    if input_ids.device.type != "cpu" or len(input_ids) <= rows or torch.jit.is_tracing():
        return embed(input_ids, attention_mask)
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    parts = []
    for chunk in order.split(rows):
        width = int(lengths[chunk].max())
        parts.append(embed(input_ids[chunk, :width], attention_mask[chunk, :width]))
    return torch.cat(parts)[torch.argsort(order)]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of the token states where mask is 1, L2-normalised: [B, T, D] -> [B, D]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed, dim=-1)


class BiEncoder(nn.Module):
    """One encoder for both sides; forward(q_*, p_*) -> 2-class logits [B, 2] = [0, scale * cosine]."""

    def __init__(self, encoder: PreTrainedModel, scale: float = COSINE_SCALE) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = scale

    @property
    def width(self) -> int:
        """The embeddings' dimension D."""
        return self.encoder.config.hidden_size

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-length text embeddings [B, D] of right-padded rows."""
        return by_length(self._embed, input_ids, attention_mask)

    def _embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self, q_input_ids: Tensor, q_attention_mask: Tensor, p_input_ids: Tensor, p_attention_mask: Tensor
    ) -> Tensor:
        """Logits [B, 2] of each (question, passage) pair."""
        questions = self.embed(q_input_ids, q_attention_mask)
        return cosine_logits(questions, self.embed(p_input_ids, p_attention_mask), self.scale)


class TextEncoder(Protocol):
    """What embed_texts runs: a BiEncoder, or its export on ONNX Runtime (app/distill/onnx_runtime.py)."""

    @property
    def width(self) -> int:
        """The embeddings' dimension D."""

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-length text embeddings [B, D] of right-padded rows."""


def cosine_logits(questions: Tensor, passages: Tensor, scale: float = COSINE_SCALE) -> Tensor:
    """2-class logits [N, 2] = [0, scale * cosine] of unit question and passage vectors [N, D]."""
    cosine = (questions * passages).sum(-1)
    return torch.stack([torch.zeros_like(cosine), scale * cosine], dim=-1)


def in_batch_ranking_loss(model: BiEncoder, batch: dict[str, Tensor], embedding_weight: float = 0.0) -> Tensor:
    """-log P(a relevant passage) for each question, softmax over every passage of the batch.

    The question's own candidates are hard negatives, the other questions' passages easy ones (in-batch
    negatives); a batch holds whole questions (`group` ids) with their hard labels. With embedding_weight,
    plus that weight times the squared distance of the batch's question and passage embeddings to the
    batch's `question_embedding` and `passage_embedding` (the base checkpoint's, for a teacher).
    """
    groups, labels = batch["group"], batch["labels"]
    owners, first = torch.unique(groups, return_inverse=True)
    # The first pair of each question carries its question text.
    index = torch.full((len(owners),), len(groups), device=groups.device).scatter_reduce(
        0, first, torch.arange(len(groups), device=groups.device), reduce="amin"
    )
    questions = model.embed(batch["q_input_ids"][index], batch["q_attention_mask"][index])
    passages = model.embed(batch["p_input_ids"], batch["p_attention_mask"])
    with torch.autocast(questions.device.type, enabled=False):  # float32 logits, as in CosineHeads
        scores = model.scale * questions.float() @ passages.float().T  # [questions, passages]
    relevant = (first[None, :] == torch.arange(len(owners), device=groups.device)[:, None]) & (labels[None, :] == 1)
    useful = relevant.any(dim=1)
    anchor = scores.new_zeros((), dtype=torch.float32)
    if embedding_weight:
        distance = embedding_loss(questions, batch["question_embedding"][index])
        anchor = embedding_weight * (distance + embedding_loss(passages, batch["passage_embedding"]))
    if not useful.any():
        return scores.sum() * 0.0 + anchor
    log_p = torch.log_softmax(scores.float(), dim=1)
    return -torch.logsumexp(log_p.masked_fill(~relevant, float("-inf")), dim=1)[useful].mean() + anchor


def load_bi_encoder(folder: Path, device: Device) -> tuple[BiEncoder, PreTrainedTokenizerBase]:
    """A bi-encoder over the model folder's encoder, ready for inference on `device`, and its tokenizer."""
    encoder = AutoModel.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    model = BiEncoder(encoder).to(device.torch_device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def embed_texts(
    model: TextEncoder,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    device: Device,
    hooks: Hooks,
    on_batch: Callable[[], None] | None = None,
) -> Tensor:
    """Unit-length embeddings [N, D] (float32, CPU) of `texts`, in order, batched by length."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
    encoded = EncodedPairs(input_ids=ids, token_type_ids=None, pad_token_id=tokenizer.pad_token_id or 0)
    out = torch.empty(len(texts), model.width)
    if isinstance(model, nn.Module):
        model.eval()
    with torch.inference_mode():
        for indices in iter_batches(encoded, batch_size=INFERENCE_BATCH, shuffle=False, seed=0):
            if hooks.cancel_requested():
                raise Cancelled("soft_labels: cancelled")
            batch = device.move(encoded.collate(indices))
            out[torch.tensor(indices)] = model.embed(batch["input_ids"], batch["attention_mask"]).float().cpu()
            if on_batch is not None:
                on_batch()
    return out


def text_index(pairs: Sequence[Pair]) -> tuple[list[str], Tensor, Tensor]:
    """The pairs' distinct texts (sorted), and each pair's question row and passage row in that list."""
    texts = sorted({text for p in pairs for text in (p.question, p.passage)})
    row = {text: i for i, text in enumerate(texts)}
    return texts, torch.tensor([row[p.question] for p in pairs]), torch.tensor([row[p.passage] for p in pairs])


def embed_pairs(
    model: BiEncoder,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    *,
    max_length: int,
    device: Device,
    hooks: Hooks,
    on_batch: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Unit embeddings [N, D] of each pair's question and of its passage; each distinct text is encoded once."""
    texts, questions, passages = text_index(pairs)
    vectors = embed_texts(model, tokenizer, texts, max_length=max_length, device=device, hooks=hooks, on_batch=on_batch)
    return vectors[questions], vectors[passages]
