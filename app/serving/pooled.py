"""A faster, exact forward for BERT-style students: the last layer is computed for the pooled token only.

The student's score reads the last layer's first ([CLS]) state alone. Every other position of the last
layer is wasted work: only its keys and values are needed, for the first token's attention. Skipping the
rest (queries, attention output, feed-forward for T-1 tokens) removes about 40% of a 2-layer student's
compute, with the same logits up to float rounding.
"""

import torch
from torch import Tensor, nn

from app.distill.students import MultiHeadStudent


class FirstTokenStudent(nn.Module):
    """Wraps a BERT-encoder MultiHeadStudent; forward(**batch) -> the same logits [B, H, 2], faster."""

    def __init__(self, student: MultiHeadStudent) -> None:
        super().__init__()
        if not supports_first_token(student):
            raise ValueError("FirstTokenStudent needs a transformer student with a BERT encoder")
        self.student = student.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Logits of every head: [B, H, 2]."""
        encoder = self.student.encoder
        hidden = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        # Additive mask [B, 1, 1, T], the form both the eager and the SDPA attention of BERT accept.
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        layers = encoder.encoder.layer
        for layer in layers[:-1]:
            hidden = layer(hidden, additive)
        pooled = _first_token_layer(layers[-1], hidden, additive)
        return torch.stack([head(pooled) for head in self.student.heads], dim=1)


def supports_first_token(member: nn.Module) -> bool:
    """Whether `member` is a student whose encoder is a plain (non-decoder) BERT."""
    if not isinstance(member, MultiHeadStudent) or member.kind != "transformer":
        return False
    config = getattr(member.encoder, "config", None)
    return (
        getattr(config, "model_type", None) == "bert"
        and not config.is_decoder
        and not config.add_cross_attention
        and hasattr(member.encoder, "embeddings")
    )


def _first_token_layer(layer: nn.Module, hidden: Tensor, additive_mask: Tensor) -> Tensor:
    """One BertLayer's output at position 0 only: [B, hidden]."""
    attention = layer.attention.self
    batch, length, _ = hidden.shape
    head_size = attention.attention_head_size
    first = hidden[:, :1]
    query = attention.query(first).view(batch, 1, -1, head_size).transpose(1, 2)  # [B, h, 1, d]
    key = attention.key(hidden).view(batch, length, -1, head_size).transpose(1, 2)  # [B, h, T, d]
    value = attention.value(hidden).view(batch, length, -1, head_size).transpose(1, 2)
    weights = torch.softmax(query @ key.transpose(-1, -2) * attention.scaling + additive_mask, dim=-1)
    context = (weights @ value).transpose(1, 2).reshape(batch, 1, -1)  # [B, 1, hidden]
    attended = layer.attention.output(context, first)
    return layer.output(layer.intermediate(attended), attended)[:, 0]
