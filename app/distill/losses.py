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
