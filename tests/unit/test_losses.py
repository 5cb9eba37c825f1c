"""Distillation losses against values computed by hand."""

import math

import pytest
import torch

from app.distill.losses import (
    hard_loss,
    kd_loss,
    listwise_hard_loss,
    listwise_soft_loss,
    multi_head_listwise_loss,
    multi_head_loss,
    soft_loss,
)

STUDENT = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, -0.5]])
TEACHER = torch.tensor([[1.0, 1.0], [-1.0, 2.0], [3.0, 0.0]])
LABELS = torch.tensor([0, 1, 1])


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def hand_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return sum(
        -math.log(softmax(row)[y]) for row, y in zip(logits.tolist(), labels.tolist(), strict=True)
    ) / len(labels)


def hand_soft(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    pairs = zip(teacher.tolist(), student.tolist(), strict=True)
    mean_kl = sum(kl(softmax(t, temperature), softmax(s, temperature)) for t, s in pairs) / len(student)
    return temperature**2 * mean_kl


def test_hard_loss_is_mean_cross_entropy() -> None:
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 3
    assert hard_loss(STUDENT, LABELS).item() == pytest.approx(expected, rel=1e-6)
    assert hard_loss(STUDENT, LABELS).item() == pytest.approx(hand_cross_entropy(STUDENT, LABELS), rel=1e-6)


def test_soft_loss_at_t1_is_kl_of_teacher_to_student() -> None:
    # Row 0 by hand: teacher (0.5, 0.5), student (e^2, 1) / (e^2 + 1).
    q0 = math.exp(2) / (math.exp(2) + 1)
    row0 = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1 - q0))
    assert soft_loss(STUDENT[:1], TEACHER[:1], temperature=1.0).item() == pytest.approx(row0, rel=1e-6)
    assert soft_loss(STUDENT, TEACHER, temperature=1.0).item() == pytest.approx(
        hand_soft(STUDENT, TEACHER, 1.0), rel=1e-6
    )


def test_soft_loss_is_scaled_by_t_squared() -> None:
    tempered_kl = hand_soft(STUDENT, TEACHER, 2.0) / 4
    assert soft_loss(STUDENT, TEACHER, temperature=2.0).item() == pytest.approx(4 * tempered_kl, rel=1e-6)
    assert soft_loss(STUDENT, TEACHER, temperature=5.0).item() == pytest.approx(
        hand_soft(STUDENT, TEACHER, 5.0), rel=1e-6
    )


def test_soft_loss_is_zero_when_student_matches_teacher() -> None:
    assert soft_loss(TEACHER.clone(), TEACHER, temperature=3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_loss_sends_no_gradient_to_the_teacher() -> None:
    student = STUDENT.clone().requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    soft_loss(student, teacher, temperature=2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_kd_loss_weighs_the_soft_term_by_alpha(alpha: float) -> None:
    expected = (1 - alpha) * hand_cross_entropy(STUDENT, LABELS) + alpha * hand_soft(STUDENT, TEACHER, 2.0)
    got = kd_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_alpha_extremes_are_pure_terms() -> None:
    pure_ce = kd_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.0)
    pure_soft = kd_loss(STUDENT, TEACHER, None, temperature=2.0, alpha=1.0)
    assert pure_ce.item() == pytest.approx(hard_loss(STUDENT, LABELS).item(), rel=1e-7)
    assert pure_soft.item() == pytest.approx(soft_loss(STUDENT, TEACHER, 2.0).item(), rel=1e-7)


def test_kd_loss_needs_labels_unless_alpha_is_1() -> None:
    with pytest.raises(ValueError, match="labels"):
        kd_loss(STUDENT, TEACHER, None, temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_kd_loss_refuses_alpha_outside_0_1(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=alpha)


def test_soft_loss_refuses_bad_temperature_and_shapes() -> None:
    with pytest.raises(ValueError, match="temperature"):
        soft_loss(STUDENT, TEACHER, temperature=0.0)
    with pytest.raises(ValueError, match="differ"):
        soft_loss(STUDENT, TEACHER[:2], temperature=1.0)


def test_multi_head_loss_sums_kd_over_heads() -> None:
    heads = torch.stack([STUDENT, STUDENT.flip(-1)], dim=1)
    teachers = torch.stack([TEACHER, TEACHER * 0.5], dim=1)
    expected = sum(
        0.7 * hand_cross_entropy(heads[:, h], LABELS) + 0.3 * hand_soft(heads[:, h], teachers[:, h], 2.0)
        for h in range(2)
    )
    got = multi_head_loss(heads, teachers, LABELS, temperature=2.0, alpha=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_multi_head_loss_without_labels_is_soft_only() -> None:
    heads = torch.stack([STUDENT, STUDENT.flip(-1)], dim=1)
    teachers = torch.stack([TEACHER, TEACHER * 0.5], dim=1)
    expected = hand_soft(heads[:, 0], teachers[:, 0], 3.0) + hand_soft(heads[:, 1], teachers[:, 1], 3.0)
    got = multi_head_loss(heads, teachers, None, temperature=3.0, alpha=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_multi_head_loss_refuses_mismatched_heads() -> None:
    heads = torch.stack([STUDENT, STUDENT], dim=1)
    with pytest.raises(ValueError, match=r"\[B, H, 2\]"):
        multi_head_loss(heads, TEACHER.unsqueeze(1), LABELS, temperature=1.0, alpha=0.5)


# Listwise losses: two questions (groups 7 and 3) of three and two candidates, relevance logits.
SCORES = torch.tensor([2.0, 0.0, -1.0, 0.5, 1.5])
GROUPS = torch.tensor([7, 7, 7, 3, 3])


def test_listwise_soft_loss_is_the_mean_over_questions_of_their_candidates_kl() -> None:
    teacher = torch.tensor([1.0, 1.0, 0.0, 2.0, -2.0])
    first = kl(softmax([1.0, 1.0, 0.0], 2), softmax([2.0, 0.0, -1.0], 2))
    second = kl(softmax([2.0, -2.0], 2), softmax([0.5, 1.5], 2))
    expected = 4 * (first + second) / 2
    assert listwise_soft_loss(SCORES, teacher, GROUPS, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_listwise_soft_loss_ignores_the_level_of_a_questions_scores() -> None:
    shifted = SCORES + torch.tensor([5.0, 5.0, 5.0, -3.0, -3.0])
    assert listwise_soft_loss(shifted, SCORES, GROUPS, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # A question with a single candidate carries no ranking: no loss, no gradient.
    lone = torch.tensor([1.0], requires_grad=True)
    loss = listwise_soft_loss(lone, torch.tensor([-4.0]), torch.tensor([0]), 1.0)
    loss.backward()
    assert loss.item() == 0.0 and lone.grad.abs().sum() == 0


def test_listwise_hard_loss_is_minus_log_probability_of_the_relevant_candidates() -> None:
    labels = torch.tensor([0, 1, 1, 1, 1])  # the second question has no irrelevant candidate: left out
    p = softmax([2.0, 0.0, -1.0])
    assert listwise_hard_loss(SCORES, labels, GROUPS).item() == pytest.approx(-math.log(p[1] + p[2]), rel=1e-5)


def test_listwise_losses_do_not_depend_on_where_a_questions_candidates_sit_in_the_batch() -> None:
    teacher = torch.tensor([1.0, 1.0, 0.0, 2.0, -2.0])
    labels = torch.tensor([0, 1, 1, 0, 1])
    mixed = torch.tensor([3, 0, 4, 1, 2])  # the two questions' candidates interleaved
    soft = listwise_soft_loss(SCORES, teacher, GROUPS, 2.0)
    assert listwise_soft_loss(SCORES[mixed], teacher[mixed], GROUPS[mixed], 2.0).item() == pytest.approx(soft.item())
    hard = listwise_hard_loss(SCORES, labels, GROUPS)
    assert listwise_hard_loss(SCORES[mixed], labels[mixed], GROUPS[mixed]).item() == pytest.approx(hard.item())


def test_multi_head_listwise_loss_sums_heads_and_uses_labels_only_with_alpha_below_one() -> None:
    heads = torch.stack([torch.zeros(5), SCORES], dim=-1)[:, None].repeat(1, 2, 1)  # [5, 2, 2]
    teacher = torch.stack([torch.zeros(5), -SCORES], dim=-1)[:, None].repeat(1, 2, 1)
    labels = torch.tensor([1, 0, 0, 0, 1])
    one_head = listwise_soft_loss(SCORES, -SCORES, GROUPS, 2.0)
    both = multi_head_listwise_loss(heads, teacher, None, GROUPS, temperature=2.0, alpha=0.3)
    assert both.item() == pytest.approx(2 * one_head.item(), rel=1e-5)  # stage 1: alpha taken as 1
    mixed = multi_head_listwise_loss(heads, teacher, labels, GROUPS, temperature=2.0, alpha=0.3)
    hard = listwise_hard_loss(SCORES, labels, GROUPS)
    assert mixed.item() == pytest.approx(2 * (0.7 * hard.item() + 0.3 * one_head.item()), rel=1e-5)
    with pytest.raises(ValueError, match=r"\[B, H, 2\]"):
        multi_head_listwise_loss(heads[:, 0], teacher[:, 0], labels, GROUPS, temperature=1.0, alpha=0.5)
