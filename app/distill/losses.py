"""Distillation losses over 2-class relevance logits ([..., 2], index 1 = relevant).

Conventions (toolkits disagree on both, so they are fixed here and in app.distill.spec):
- `alpha` weighs the *soft* (teacher) term: L = (1 - alpha) * CE(student, label) + alpha * soft.
- The soft term is T^2 * KL(softmax(teacher / T) || softmax(student / T)): the T^2 keeps its gradients
  on the same scale as T changes (Hinton et al. 2015).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def hard_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits [B, 2] against 0/1 labels [B]."""
    return F.cross_entropy(logits, labels.long())


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean; the teacher gets no gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ"
        )
    teacher_log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student_log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(dim=-1)
    return kl.mean() * temperature**2


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *, temperature: float, alpha: float
) -> Tensor:
    """(1 - alpha) * hard_loss + alpha * soft_loss; labels may be None only when alpha == 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # A term with weight 0 is left out, so alpha=1 needs no labels and alpha=0 no teacher.
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if alpha < 1.0:
        if labels is None:
            raise ValueError("labels are needed when alpha < 1 (the hard term has weight 1 - alpha)")
        loss = loss + (1.0 - alpha) * hard_loss(student_logits, labels)
    if alpha > 0.0:
        loss = loss + alpha * soft_loss(student_logits, teacher_logits, temperature)
    return loss


def multi_head_loss(
    head_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *, temperature: float, alpha: float
) -> Tensor:
    """Sum over heads h of kd_loss(head h, teacher h), logits [B, H, 2]; labels None (stage 1): alpha = 1."""
    if head_logits.dim() != 3 or head_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"expected head and teacher logits of one shape [B, H, 2], got {tuple(head_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if labels is None:
        alpha = 1.0
    losses = [
        kd_loss(head_logits[:, h], teacher_logits[:, h], labels, temperature=temperature, alpha=alpha)
        for h in range(head_logits.shape[1])
    ]
    return torch.stack(losses).sum()


def embedding_loss(student: Tensor, reference: Tensor) -> Tensor:
    """Mean over rows of the squared distance of unit vectors [B, D] (2 - 2 cosine); the reference gets no gradient."""
    return (student.float() - reference.detach().float()).pow(2).sum(dim=-1).mean()


def relevance(logits: Tensor) -> Tensor:
    """The relevance logit l1 - l0 of 2-class logits [..., 2]: log-odds of 'relevant'."""
    return logits[..., 1] - logits[..., 0]


def listwise_soft_loss(student: Tensor, teacher: Tensor, groups: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over each question's candidates, mean over questions.

    student and teacher are relevance logits [B]; groups [B] says which question each pair belongs to. A
    question with one candidate carries no ranking and is left out.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_log_q, mask = _group_log_softmax(student.float() / temperature, groups)
    teacher_log_p, _ = _group_log_softmax(teacher.detach().float() / temperature, groups)
    kl = (teacher_log_p.exp() * (teacher_log_p - student_log_q)).masked_fill(~mask, 0.0).sum(dim=1)
    ranked = mask.sum(dim=1) > 1
    if not ranked.any():
        return student.sum() * 0.0
    return kl[ranked].mean() * temperature**2


def listwise_hard_loss(scores: Tensor, labels: Tensor, groups: Tensor) -> Tensor:
    """-log P(a relevant candidate) under softmax(scores) over each question's candidates, mean over questions.

    Questions whose candidates are all relevant or all irrelevant carry no ranking and are left out.
    """
    log_p, mask = _group_log_softmax(scores.float(), groups)
    relevant = _group_values(labels.float(), groups, fill=0.0) > 0.5
    useful = (relevant & mask).any(dim=1) & (~relevant & mask).any(dim=1)
    if not useful.any():
        return scores.sum() * 0.0
    log_p_relevant = torch.logsumexp(log_p.masked_fill(~(relevant & mask), float("-inf")), dim=1)
    return -log_p_relevant[useful].mean()


def multi_head_listwise_loss(
    head_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    groups: Tensor,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Sum over heads h of (1 - alpha) * listwise_hard + alpha * listwise_soft(head h, teacher h), logits [B, H, 2].

    The ranking counterpart of multi_head_loss: only the order of a question's candidates is learned, so a
    teacher's calibration (or a bi-encoder's cosine scale) does not leak into the student. labels None
    (stage 1): alpha = 1.
    """
    if head_logits.dim() != 3 or head_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"expected head and teacher logits of one shape [B, H, 2], got {tuple(head_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if labels is None:
        alpha = 1.0
    student, teacher = relevance(head_logits), relevance(teacher_logits)
    losses = []
    for h in range(head_logits.shape[1]):
        loss = student.new_zeros((), dtype=torch.float32)
        if alpha < 1.0:
            loss = loss + (1.0 - alpha) * listwise_hard_loss(student[:, h], labels, groups)
        if alpha > 0.0:
            loss = loss + alpha * listwise_soft_loss(student[:, h], teacher[:, h], groups, temperature)
        losses.append(loss)
    return torch.stack(losses).sum()


def _group_values(values: Tensor, groups: Tensor, *, fill: float) -> Tensor:
    """values [B] laid out as [questions, most candidates], `fill` where a question has fewer."""
    _, question = torch.unique(groups, return_inverse=True)
    sizes = torch.bincount(question)
    # Each pair's place among its question's pairs, in batch order: its rank in a stable sort by question, less
    # the rank of its question's first pair.
    order = torch.argsort(question, stable=True)
    position = torch.empty_like(question)
    first = torch.cumsum(sizes, 0) - sizes
    position[order] = torch.arange(len(question), device=groups.device) - first[question[order]]
    out = values.new_full((len(sizes), int(sizes.max())), fill)
    out[question, position] = values
    return out


def _group_log_softmax(values: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """log_softmax of values [B] within each question, as [questions, most candidates], and its mask."""
    laid = _group_values(values, groups, fill=float("-inf"))
    mask = _group_values(torch.ones_like(values), groups, fill=0.0) > 0
    return torch.log_softmax(laid, dim=1).masked_fill(~mask, 0.0), mask
