"""The training loop: it learns, it resumes bit for bit after an interruption, it stops when asked."""

import functools
import random
from pathlib import Path

import pytest
import torch

from app.distill.data import Pair, encode_pairs, group_by_question, read_pairs
from app.distill.devices import resolve_device
from app.distill.hooks import Cancelled, Hooks
from app.distill.pipeline import distillation_loss
from app.distill.spec import StudentSpec
from app.distill.students import MultiHeadStudent, build_student
from app.distill.train import TrainConfig, count_steps, pairs_read, train
from tests.unit.helpers import CPU, MAX_LENGTH, make_tiny_base, tiny_data

LOSS = functools.partial(distillation_loss, temperature=2.0, alpha=0.5)
FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"]
VEHICLES = ["car", "truck", "train", "plane", "boat", "bus", "bike", "ship"]


def fruit_pairs(count: int, seed: int) -> list[Pair]:
    """Passages of fruit words are relevant to the question, passages of vehicle words are not."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        label = i % 2
        words = rng.choices(FRUIT if label else VEHICLES, k=rng.randint(3, 8))
        pairs.append(Pair(f"q{i}", "which passage is about fruit ?", " ".join(words), label))
    return pairs


def targets_for(pairs: list[Pair], heads: int) -> dict[str, torch.Tensor]:
    """Hard labels and a confident teacher per head that agrees with them."""
    labels = torch.tensor([p.label for p in pairs])
    logits = torch.stack([-3.0 * (2 * labels - 1), 3.0 * (2 * labels - 1)], dim=-1).float()
    return {"labels": labels, "teacher_logits": logits.unsqueeze(1).repeat(1, heads, 1)}


def tiny_student(base: Path, seed: int = 0) -> tuple[MultiHeadStudent, object]:
    spec = StudentSpec(init_from=str(base), layers=[0, 1], max_length=MAX_LENGTH)
    return build_student(spec, ["a", "b"], source_dir=base, tokenizer_dir=base, seed=seed)


def test_a_student_learns_a_separable_task(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    student, tokenizer = tiny_student(base)
    train_pairs, test_pairs = fruit_pairs(96, seed=1), fruit_pairs(40, seed=2)
    losses = []
    hooks = Hooks(on_progress=lambda p: losses.append(p.loss) if p.loss is not None else None)

    result = train(
        student,
        stage="stage2:test",
        encodings=encode_pairs(train_pairs, tokenizer, MAX_LENGTH),
        targets=targets_for(train_pairs, heads=2),
        loss_fn=LOSS,
        config=TrainConfig(learning_rate=3e-3, batch_size=16, epochs=8, seed=0, log_every=6),
        checkpoint_dir=tmp_path / "ckpt",
        device=CPU,
        hooks=hooks,
    )

    assert result.steps == 48
    assert losses[-1] < losses[0] / 3
    student.eval()
    batch = encode_pairs(test_pairs, tokenizer, MAX_LENGTH).collate(range(len(test_pairs)))
    with torch.no_grad():
        predicted = student(**batch).argmax(-1)  # [N, H]
    labels = torch.tensor([p.label for p in test_pairs]).unsqueeze(1)
    assert (predicted == labels).float().mean() >= 0.95


class StopAt:
    """should_cancel that answers True (or raises, like a crash) on its n-th poll, i.e. after n-1 steps."""

    def __init__(self, poll: int, *, crash: bool = False) -> None:
        self.poll, self.crash, self.calls = poll, crash, 0

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == self.poll and self.crash:
            raise KeyboardInterrupt("killed")
        return self.calls == self.poll


@pytest.fixture
def wikiqa_slice(tmp_path: Path, sample_data: Path) -> list[Pair]:
    return read_pairs(tiny_data(tmp_path, sample_data)["train"]).pairs[:24]


def run_stage(base: Path, pairs: list[Pair], checkpoint_dir: Path, hooks: Hooks) -> MultiHeadStudent:
    """9 steps over 3 epochs of 3 batches, checkpoints every 4 steps, with dropout on: the RNG matters."""
    student, tokenizer = tiny_student(base, seed=7)
    train(
        student,
        stage="stage1:test",
        encodings=encode_pairs(pairs, tokenizer, MAX_LENGTH),
        targets=targets_for(pairs, heads=2)
        | {"teacher_logits": torch.randn(len(pairs), 2, 2, generator=torch.Generator().manual_seed(3))},
        loss_fn=LOSS,
        config=TrainConfig(learning_rate=1e-3, batch_size=8, epochs=3, seed=5, checkpoint_every=4),
        checkpoint_dir=checkpoint_dir,
        device=CPU,
        hooks=hooks,
    )
    return student


@pytest.mark.parametrize(
    ("stop", "resumes_at"),
    [(StopAt(6), 5), (StopAt(7, crash=True), 4)],
    ids=["cancelled-mid-epoch", "crashed-after-a-checkpoint"],
)
def test_an_interrupted_run_resumes_to_identical_weights(
    tmp_path: Path, wikiqa_slice: list[Pair], stop: StopAt, resumes_at: int
) -> None:
    base = make_tiny_base(tmp_path)
    uninterrupted = run_stage(base, wikiqa_slice, tmp_path / "a", Hooks())

    with pytest.raises((Cancelled, KeyboardInterrupt)):
        run_stage(base, wikiqa_slice, tmp_path / "b", Hooks(should_cancel=stop))
    events: list[str] = []
    resumed = run_stage(base, wikiqa_slice, tmp_path / "b", Hooks(on_event=lambda s, m: events.append(m)))

    assert f"resuming from the checkpoint at step {resumes_at} of 9" in events
    expected, got = uninterrupted.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_finished_stage_is_not_trained_again(tmp_path: Path, wikiqa_slice: list[Pair]) -> None:
    base = make_tiny_base(tmp_path)
    first = run_stage(base, wikiqa_slice, tmp_path / "ckpt", Hooks())
    steps: list[int] = []
    again = run_stage(base, wikiqa_slice, tmp_path / "ckpt", Hooks(on_progress=lambda p: steps.append(p.step)))

    assert steps == [9]  # one report: already at the end, no training steps
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())


def test_should_cancel_stops_training_with_a_checkpoint(tmp_path: Path, wikiqa_slice: list[Pair]) -> None:
    base = make_tiny_base(tmp_path)
    with pytest.raises(Cancelled, match="cancelled at step 2 of 9"):
        run_stage(base, wikiqa_slice, tmp_path / "ckpt", Hooks(should_cancel=StopAt(3)))
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-00000002"
    assert not (tmp_path / "ckpt" / "done.json").exists()


def test_checkpoint_state_loads_without_unpickling_objects(tmp_path: Path, wikiqa_slice: list[Pair]) -> None:
    run_stage(make_tiny_base(tmp_path), wikiqa_slice, tmp_path / "ckpt", Hooks())
    state = torch.load(tmp_path / "ckpt" / "step-00000009" / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["position"]) == (9, 3, 0)  # after the 3rd epoch


def test_count_steps_covers_fractional_epochs_and_caps_at_max_steps() -> None:
    assert count_steps(10, 4, 1.0) == 3
    assert count_steps(10, 4, 2.5) == 8
    assert count_steps(10, 4, 2.5, max_steps=5) == 5


@pytest.mark.parametrize(("epochs", "max_steps"), [(0.25, None), (1.5, None), (3.0, 2)])
def test_pairs_read_are_the_pairs_a_question_batched_stage_trains_on(
    tmp_path: Path, sample_data: Path, epochs: float, max_steps: int | None
) -> None:
    pairs = read_pairs(tiny_data(tmp_path, sample_data)["train"]).pairs
    groups = group_by_question(pairs)
    config = TrainConfig(learning_rate=1e-3, batch_size=8, epochs=epochs, seed=3, max_steps=max_steps)
    seen: set[int] = set()

    def record(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.update(batch["row"].tolist())
        return model.weight.sum() * 0.0

    _, tokenizer = tiny_student(make_tiny_base(tmp_path))
    train(
        torch.nn.Linear(1, 1),
        stage="teacher:test",
        encodings=encode_pairs(pairs, tokenizer, MAX_LENGTH),
        targets={"row": torch.arange(len(pairs))},
        loss_fn=record,
        config=config,
        checkpoint_dir=tmp_path / "ckpt",
        device=CPU,
        hooks=Hooks(),
        groups=groups,
    )

    read = pairs_read(config, groups, len(pairs))
    assert read == sorted(seen)
    assert (len(read) == len(pairs)) == (epochs >= 1 and max_steps is None)


def test_auto_picks_the_cpu_without_a_gpu_and_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").torch_device.type == "cpu"
    with pytest.raises(ValueError, match="device: 'cuda' was asked for but no CUDA GPU is visible"):
        resolve_device("cuda")


def test_a_short_stage_still_draws_a_curve(tmp_path: Path, wikiqa_slice: list[Pair]) -> None:
    losses: list[tuple[int, float]] = []
    hooks = Hooks(on_progress=lambda p: losses.append((p.step, p.loss)) if p.loss is not None else None)
    run_stage(make_tiny_base(tmp_path), wikiqa_slice, tmp_path / "ckpt", hooks)
    assert [step for step, _ in losses] == list(range(1, 10))  # 9 steps, one point each (not one at the end)


def test_heads_learn_at_their_own_rate(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path)
    pairs = fruit_pairs(64, seed=1)
    moved = {}
    for head_rate in (None, 1e-2):
        student, tokenizer = tiny_student(base)
        start = {k: v.clone() for k, v in student.state_dict().items()}
        train(
            student,
            stage="stage2:test",
            encodings=encode_pairs(pairs, tokenizer, MAX_LENGTH),
            targets=targets_for(pairs, heads=2),
            loss_fn=LOSS,
            config=TrainConfig(learning_rate=1e-5, batch_size=16, epochs=2, seed=0, head_learning_rate=head_rate),
            checkpoint_dir=tmp_path / f"ckpt-{head_rate}",
            device=CPU,
            hooks=Hooks(),
        )
        end = student.state_dict()
        moved[head_rate] = {
            part: max((end[k] - start[k]).abs().max().item() for k in end if k.startswith(part))
            for part in ("heads.", "encoder.")
        }

    # Adam moves each weight by about its rate a step: 8 steps at 1e-2 against 1e-5.
    assert moved[1e-2]["heads."] > 100 * moved[None]["heads."]
    assert moved[1e-2]["heads."] > 1e-2
    assert moved[1e-2]["encoder."] < 1e-3
