"""Student models: one shared encoder with one 2-class output head per teacher (TMKD's multi-head student).

Three kinds, each taking a tokenised (question, passage) pair and giving logits [B, heads, 2]:
- `bi-encoder` (the default): a BERT encoder initialised from chosen layers of a sentence-embedding model
  that splits each pair into its question and its passage and encodes each alone (its own positions and
  [CLS] token; a question the batch repeats, once), mean-pools each side and scores their cosine with a
  per-teacher weighting of the dimensions. It starts where its checkpoint's
  zero-shot ranking is, instead of from a fresh classifier.
- `transformer`: a cross-encoder (an `AutoModel`, so its folder opens with `transformers.AutoModel`),
  initialised from chosen layers of a bigger model or from scratch, pooled by its first ([CLS]) token;
- `bilstm`: the TMKD paper's BiLSTM, pooled by a max over the non-padding time steps.
"""

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.biencoder import COSINE_SCALE, by_length, mean_pool
from app.distill.calibration import platt_scaling
from app.distill.spec import StudentSpec

log = logging.getLogger(__name__)

HEAD_DROPOUT = 0.1
_LAYER_KEY = re.compile(r"(^|\.)layer\.(\d+)\.")


class BiLSTMEncoder(nn.Module):
    """Token embeddings, a bidirectional LSTM, and a max over time of the states at real tokens."""

    def __init__(self, *, vocab_size: int, embedding_dim: int, lstm_hidden: int, pad_token_id: int) -> None:
        super().__init__()
        self.config = {
            "vocab_size": vocab_size,
            "embedding_dim": embedding_dim,
            "lstm_hidden": lstm_hidden,
            "pad_token_id": pad_token_id,
        }
        self.embeddings = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_token_id)
        self.lstm = nn.LSTM(embedding_dim, lstm_hidden, batch_first=True, bidirectional=True)

    @property
    def output_size(self) -> int:
        """Width of the pooled vector: both directions."""
        return 2 * self.config["lstm_hidden"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] token ids -> [B, 2 * lstm_hidden] pooled states."""
        # Packed, so the backward direction starts at each pair's last real token, not in the padding.
        lengths = attention_mask.sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embeddings(input_ids), lengths, batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=input_ids.shape[1])
        # Padding must never win the max, whatever sign the real states have.
        states = states.masked_fill(attention_mask.unsqueeze(-1) == 0, torch.finfo(states.dtype).min)
        return states.max(dim=1).values


class MultiHeadStudent(nn.Module):
    """A shared encoder and one Linear(hidden, 2) head per teacher; forward(**batch) -> logits [B, H, 2]."""

    def __init__(self, encoder: nn.Module, *, kind: str, hidden_size: int, heads: Sequence[str]) -> None:
        super().__init__()
        if kind not in ("transformer", "bilstm"):
            raise ValueError(f"student.kind: expected 'transformer' or 'bilstm', got {kind!r}")
        self.kind = kind
        self.head_names = list(heads)
        self.encoder = encoder
        self.dropout = nn.Dropout(HEAD_DROPOUT)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, 2) for _ in self.head_names)

    def encode(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """The pooled pair vector [B, hidden]: first-token state (transformer) or max-pool (BiLSTM)."""
        if self.kind == "bilstm":
            return self.encoder(input_ids, attention_mask)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state[:, 0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Logits of every head: [B, H, 2]."""
        pooled = self.dropout(self.encode(input_ids, attention_mask, token_type_ids))
        return torch.stack([head(pooled) for head in self.heads], dim=1)


class CosineHeads(nn.Module):
    """One head per teacher: relevance = sum_d weight[h, d] * u_d * v_d + bias[h] for unit vectors u, v.

    Every head starts as COSINE_SCALE * cosine(u, v), the checkpoint's own zero-shot score, and learns which
    dimensions its teacher weighs more.
    """

    def __init__(self, hidden_size: int, count: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((count, hidden_size), COSINE_SCALE))
        self.bias = nn.Parameter(torch.zeros(count))

    def forward(self, question: Tensor, passage: Tensor) -> Tensor:
        """Relevance logits [B, H] of unit vectors [B, D], in float32 also under autocast (bf16 would round a logit
        near 20 to steps of 0.125, coarser than the gaps between a question's candidates)."""
        with torch.autocast(question.device.type, enabled=False):
            return (question.float() * passage.float()) @ self.weight.T + self.bias


class BiEncoderStudent(nn.Module):
    """A BERT encoder reading each side of the pair apart, and CosineHeads; forward(**batch) -> [B, H, 2].

    The pair comes tokenised as `[CLS] question [SEP] passage [SEP]` with token types 0 and 1 (what the
    trainer and the serving formats hand every student). Inside the forward each side is split off and
    encoded alone, the passage behind a [CLS] of its own: its vector is exactly the one serving's `embed` gives.
    """

    kind = "bi-encoder"

    def __init__(self, encoder: PreTrainedModel, *, heads: Sequence[str], cls_token_id: int) -> None:
        super().__init__()
        if not supports_side_attention(encoder):
            raise ValueError("student.kind: a bi-encoder student needs a BERT encoder (e.g. all-MiniLM-L6-v2)")
        self.head_names = list(heads)
        self.encoder = encoder
        self.cls_token_id = cls_token_id
        self.dropout = nn.Dropout(0.0)  # kept for the member format; the pooled means need none
        self.heads = CosineHeads(encoder.config.hidden_size, len(self.head_names))

    def encode(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-length question and passage vectors [B, D] each, every side encoded alone by `embed`.

        The question is the pair's `[CLS] question [SEP]`, the passage its `passage [SEP]` behind a [CLS] of
        its own. A side the batch holds more than once (a listwise batch holds each question's candidates;
        questions about one paragraph share its sentences) is encoded once.
        """
        side, real = token_type_ids, attention_mask.bool()
        question_length = ((side == 0) & real).sum(dim=1)
        passage_length = ((side == 1) & real).sum(dim=1) + 1  # with its [CLS]
        q_columns = torch.arange(int(question_length.max()), device=input_ids.device)
        q_mask = q_columns[None, :] < question_length[:, None]
        p_columns = torch.arange(int(passage_length.max()), device=input_ids.device)
        p_mask = p_columns[None, :] < passage_length[:, None]
        source = (question_length[:, None] + p_columns[None, :] - 1).clamp(0, input_ids.shape[1] - 1)
        passages = torch.where(p_columns[None, :] == 0, self.cls_token_id, input_ids.gather(1, source)) * p_mask
        return self._embed_once(input_ids[:, : len(q_columns)] * q_mask, q_mask), self._embed_once(passages, p_mask)

    def _embed_once(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """`embed` of right-padded rows (zero past the mask), each distinct row computed once."""
        rows, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        unique_mask = torch.zeros_like(rows, dtype=torch.bool)
        unique_mask[inverse] = mask
        return self.embed(rows, unique_mask)[inverse]

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-length vectors [B, D] of single sides, each tokenised `[CLS] text [SEP]` (token types 0).

        A side's vector equals the one `encode` gives it inside a pair with the same side tokens: serving
        encodes each distinct question and passage once this way (app/distill/scoring.py). Rows are right-padded.
        """
        return by_length(self._embed, input_ids, attention_mask)

    def _embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        hidden = self._layers(hidden, attention_mask.bool()[:, None, None, :])  # [B, 1, 1, T]
        return mean_pool(hidden, attention_mask.bool())

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Logits of every head: [B, H, 2], relevance in [..., 1]."""
        if token_type_ids is None:
            raise ValueError("a bi-encoder student needs token_type_ids to tell the question from the passage")
        return self.score(*self.encode(input_ids, attention_mask, token_type_ids))

    def score(self, question: Tensor, passage: Tensor) -> Tensor:
        """Logits of every head [B, H, 2] of unit vectors [B, D] (`encode`'s), relevance in [..., 1]."""
        relevance = self.heads(question, passage)
        return torch.stack([torch.zeros_like(relevance), relevance], dim=-1)

    def _layers(self, hidden: Tensor, allowed: Tensor) -> Tensor:
        """The encoder's layers over `hidden`, attention where `allowed` ([B, 1, 1, T]: the real tokens)."""
        additive = (~allowed).to(hidden.dtype) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.encoder.layer:
            hidden = layer(hidden, additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden


def supports_side_attention(encoder: nn.Module) -> bool:
    """Whether `encoder` is a plain BERT whose embeddings and layers a BiEncoderStudent can drive."""
    config = getattr(encoder, "config", None)
    return (
        getattr(config, "model_type", None) == "bert"
        and not config.is_decoder
        and hasattr(encoder, "embeddings")
        and hasattr(encoder, "encoder")
    )


def calibrate_heads(student: nn.Module, relevance: Tensor, labels: Tensor) -> None:
    """Rescale each head so that sigmoid(relevance) is P(relevant) on these pairs (Platt scaling).

    A ranking loss fixes the order of a question's candidates, not the level of its scores; averaging
    heads, members and teachers by P(relevant) needs both. relevance [N, H] are the heads' logits.
    """
    fits = [platt_scaling(relevance[:, h], labels) for h in range(relevance.shape[1])]
    device = next(student.parameters()).device  # the fits are CPU floats; the heads may be on a GPU
    scale, shift = (torch.tensor([f[i] for f in fits], device=device) for i in (0, 1))
    with torch.no_grad():
        if isinstance(student, BiEncoderStudent):
            student.heads.weight.mul_(scale[:, None])
            student.heads.bias.mul_(scale).add_(shift)
        else:  # Linear(hidden, 2) heads: relevance = (w1 - w0) x + (b1 - b0)
            for h, head in enumerate(student.heads):
                head.weight[1] = head.weight[0] + scale[h] * (head.weight[1] - head.weight[0])
                head.bias[1] = head.bias[0] + scale[h] * (head.bias[1] - head.bias[0]) + shift[h]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def default_layers(source_layers: int, keep: int) -> list[int]:
    """`keep` layers spread evenly over the source's, starting at the first: 6 -> 3 gives [0, 2, 4]."""
    keep = min(keep, source_layers)
    return [i * source_layers // keep for i in range(keep)]


def build_transformer_encoder(
    spec: StudentSpec, *, source_dir: Path | None, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """An `AutoModel` encoder: chosen layers of `source_dir` (embeddings copied too), or a fresh BERT."""
    if source_dir is None:
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=max(512, spec.max_length),
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        return _from_config(config)
    source = _load_encoder(source_dir)
    total = source.config.num_hidden_layers
    layers = list(spec.layers) if spec.layers is not None else default_layers(total, spec.num_layers)
    bad = [i for i in layers if i >= total]
    if bad:
        raise ValueError(f"student.layers: {source_dir.name} has layers 0..{total - 1}, not {bad}")
    config = AutoConfig.from_pretrained(source_dir)
    config.num_hidden_layers = len(layers)
    student = _from_config(config)
    student.load_state_dict(select_layers(source.state_dict(), layers))
    log.info("student encoder: layers %s of %s (%d layers)", layers, source_dir, total)
    return student


def select_layers(state: dict[str, Tensor], layers: Sequence[int]) -> dict[str, Tensor]:
    """Keep the listed encoder layers of a state dict, renumbered 0..n-1; other tensors (embeddings) as is."""
    renumber = {str(src): str(dst) for dst, src in enumerate(layers)}
    kept = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.search(key)
        if match is None:
            kept[key] = tensor.clone()
        elif match.group(2) in renumber:
            new_key = key[: match.start(2)] + renumber[match.group(2)] + key[match.end(2) :]
            kept[new_key] = tensor.clone()
    return kept


def build_student(
    spec: StudentSpec,
    heads: Sequence[str],
    *,
    source_dir: Path | None,
    tokenizer_dir: Path,
    seed: int,
) -> tuple[MultiHeadStudent | BiEncoderStudent, PreTrainedTokenizerBase]:
    """A new student and its tokenizer; `seed` fixes the random parts (heads, fresh weights).

    `source_dir` is `spec.init_from` resolved to a folder (None: from scratch); the tokenizer comes from
    `tokenizer_dir` (the source, or the first teacher when training from scratch).
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    if spec.kind == "bi-encoder":
        encoder = build_transformer_encoder(spec, source_dir=source_dir, tokenizer=tokenizer)
        return BiEncoderStudent(encoder, heads=heads, cls_token_id=tokenizer.cls_token_id), tokenizer
    if spec.kind == "transformer":
        encoder = build_transformer_encoder(spec, source_dir=source_dir, tokenizer=tokenizer)
        hidden = encoder.config.hidden_size
    else:
        encoder = BiLSTMEncoder(
            vocab_size=len(tokenizer),
            embedding_dim=spec.embedding_dim,
            lstm_hidden=spec.lstm_hidden,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        hidden = encoder.output_size
    return MultiHeadStudent(encoder, kind=spec.kind, hidden_size=hidden, heads=heads), tokenizer


def _from_config(config: AutoConfig) -> PreTrainedModel:
    """A fresh `AutoModel` without the BERT-style pooler, which the student does not use."""
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:  # architectures without a pooler option
        return AutoModel.from_config(config)


def _load_encoder(folder: Path) -> PreTrainedModel:
    """The encoder weights of a model folder (a classifier's head and pooler are left out)."""
    try:
        return AutoModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True, dtype=torch.float32)
    except TypeError:
        return AutoModel.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
