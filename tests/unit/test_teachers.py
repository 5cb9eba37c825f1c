"""Teachers: weight-space averaging with the base checkpoint after fine-tuning (keep_base), keeping the
base's embeddings while fine-tuning (embedding_weight), and soups of other teachers (average_of)."""

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from app.distill.biencoder import embed_pairs, load_bi_encoder
from app.distill.data import group_by_question, read_pairs
from app.distill.hooks import Hooks
from app.distill.spec import TeacherSpec
from app.distill.teachers import prepare_teacher
from app.distill.train import TrainConfig, pairs_read
from tests.unit.helpers import CPU, MAX_LENGTH, TEST_DEVICE, Recorder, make_tiny_base, tiny_data, tiny_spec


def _prepare(
    tmp_path: Path,
    sample_data: Path,
    hooks: Hooks | None = None,
    teacher_dirs: dict | None = None,
    anchor: Any = None,
    **fields: Any,
) -> Path:
    fields = {"base": str(make_tiny_base(tmp_path)), "batch_size": 8, "max_length": MAX_LENGTH, "max_steps": 3} | fields
    return prepare_teacher(
        TeacherSpec(**fields),
        train_pairs=read_pairs(tiny_data(tmp_path, sample_data)["train"]).pairs,
        out_dir=tmp_path / "run",
        cache_dir=None,
        device=TEST_DEVICE,
        hooks=hooks or Hooks(),
        checkpoint_every=100,
        teacher_dirs=teacher_dirs,
        anchor=anchor,
    )


def _train(
    tmp_path: Path,
    sample_data: Path,
    kind: str,
    keep_base: float = 0.0,
    hooks: Hooks | None = None,
    embedding_weight: float = 0.0,
) -> dict:
    folder = _prepare(
        tmp_path,
        sample_data,
        hooks,
        name=f"t-{kind}-{keep_base:g}-{embedding_weight:g}",
        kind=kind,
        learning_rate=1e-2,
        keep_base=keep_base,
        embedding_weight=embedding_weight,
    )
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("kind", ["bi-encoder", "cross-encoder"])
def test_keep_base_averages_the_fine_tuned_weights_with_the_bases(tmp_path: Path, sample_data: Path, kind: str) -> None:
    base = load_file(make_tiny_base(tmp_path) / "model.safetensors")
    tuned = _train(tmp_path, sample_data, kind, 0.0)
    recorder = Recorder()
    mixed = _train(tmp_path, sample_data, kind, 0.25, hooks=recorder.hooks())

    prefix = "bert." if kind == "cross-encoder" else ""
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(tuned[prefix + name], base[name])
    torch.testing.assert_close(mixed[prefix + name], 0.25 * base[name] + 0.75 * tuned[prefix + name])
    if kind == "cross-encoder":  # the fresh classifier has no base weights: kept as trained
        torch.testing.assert_close(mixed["classifier.weight"], tuned["classifier.weight"])
    assert any("weights averaged: 0.25" in message for _, message in recorder.events)


def test_keep_base_is_off_by_default_and_below_one() -> None:
    assert TeacherSpec(name="a").keep_base == 0.0
    with pytest.raises(ValueError, match="keep_base"):
        TeacherSpec(name="d", keep_base=1.0)


def _base_distance(tmp_path: Path, sample_data: Path, weights: dict) -> float:
    """Mean squared distance between unit embeddings of the training texts under `weights` and the base's."""
    base = make_tiny_base(tmp_path)
    reference, tokenizer = load_bi_encoder(base, CPU)
    tuned, _ = load_bi_encoder(base, CPU)
    tuned.encoder.load_state_dict(weights)
    pairs = read_pairs(tiny_data(tmp_path, sample_data)["train"]).pairs
    texts = sorted({text for p in pairs for text in (p.question, p.passage)})
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.inference_mode():
        mine = tuned.embed(encoded["input_ids"], encoded["attention_mask"])
        theirs = reference.embed(encoded["input_ids"], encoded["attention_mask"])
    return float((mine - theirs).pow(2).sum(-1).mean())


def test_embedding_weight_keeps_a_bi_encoder_teacher_near_its_base(tmp_path: Path, sample_data: Path) -> None:
    free = _train(tmp_path, sample_data, "bi-encoder")
    recorder = Recorder()
    anchored = _train(tmp_path, sample_data, "bi-encoder", embedding_weight=50, hooks=recorder.hooks())

    assert any("for the teacher to keep" in message for _, message in recorder.events)
    assert _base_distance(tmp_path, sample_data, anchored) < 0.5 * _base_distance(tmp_path, sample_data, free)


@pytest.mark.parametrize("max_steps", [1, 3])
def test_a_teacher_reading_under_half_its_pairs_embeds_only_those(
    tmp_path: Path, sample_data: Path, max_steps: int
) -> None:
    pairs = read_pairs(tiny_data(tmp_path, sample_data)["train"]).pairs
    base = make_tiny_base(tmp_path)
    model, tokenizer = load_bi_encoder(base, CPU)
    questions, passages = embed_pairs(model, tokenizer, pairs, max_length=MAX_LENGTH, device=CPU, hooks=Hooks())
    asked: list[list[int] | None] = []

    def anchor(rows: list[int] | None) -> dict[str, torch.Tensor]:
        asked.append(rows)
        picked = torch.arange(len(pairs)) if rows is None else torch.tensor(rows)
        return {"question_embedding": questions[picked], "passage_embedding": passages[picked]}

    _prepare(tmp_path, sample_data, anchor=anchor, name=f"t{max_steps}", max_steps=max_steps, seed=4)

    config = TrainConfig(learning_rate=2e-5, batch_size=8, epochs=1.0, seed=4, max_steps=max_steps)
    read = pairs_read(config, group_by_question(pairs), len(pairs))
    # One step of 8 pairs reads under half: those only. Three read most: all of them, one cached set for every
    # teacher of the base.
    assert (2 * len(read) < len(pairs)) == (max_steps == 1)
    assert asked == [read if max_steps == 1 else None]


def test_embedding_weight_is_for_bi_encoder_teachers(tmp_path: Path, sample_data: Path) -> None:
    # By default a bi-encoder teacher that trains keeps its base's embeddings; nothing else has any to keep.
    assert TeacherSpec(name="a").embedding_weight == 1.0
    assert TeacherSpec(name="a", embedding_weight=0).embedding_weight == 0.0
    assert TeacherSpec(name="c", kind="cross-encoder").embedding_weight == 0.0
    assert TeacherSpec(name="z", epochs=0).embedding_weight == 0.0
    assert TeacherSpec(name="r", path="/models/ready").embedding_weight == 0.0
    assert TeacherSpec(name="s", average_of=["a", "b"]).embedding_weight == 0.0
    teacher = {"name": "t", "kind": "cross-encoder", "embedding_weight": 1}
    with pytest.raises(ValidationError, match="teachers.0.embedding_weight: only a bi-encoder teacher"):
        tiny_spec(tmp_path, sample_data, teachers=[teacher])


def test_a_soup_averages_earlier_teachers_and_keeps_part_of_their_base(tmp_path: Path, sample_data: Path) -> None:
    folders = {
        "a": _prepare(tmp_path, sample_data, name="a", learning_rate=1e-2, seed=1),
        "b": _prepare(tmp_path, sample_data, name="b", learning_rate=3e-2, seed=2),
    }
    recorder = Recorder()
    # epochs 0 does not make a soup its base used zero-shot.
    fields = {"name": "soup", "average_of": ["a", "b"], "keep_base": 0.2, "epochs": 0}
    soup = _prepare(tmp_path, sample_data, recorder.hooks(), folders, **fields)

    weights = {name: load_file(folder / "model.safetensors") for name, folder in folders.items()}
    base = load_file(make_tiny_base(tmp_path) / "model.safetensors")
    mixed = load_file(soup / "model.safetensors")
    name = "encoder.layer.1.output.dense.weight"
    assert not torch.allclose(weights["a"][name], weights["b"][name])
    torch.testing.assert_close(mixed[name], 0.2 * base[name] + 0.4 * weights["a"][name] + 0.4 * weights["b"][name])
    assert recorder.messages("weights averaged over a, b, 0.2 of")
    assert load_bi_encoder(soup, CPU)[1] is not None  # a whole model folder, tokenizer too


@pytest.mark.parametrize(
    ("teachers", "error"),
    [
        ([{"name": "s", "average_of": ["a", "b"]}, {"name": "a"}, {"name": "b"}], "'a' is not a teacher listed before"),
        ([{"name": "a"}, {"name": "s", "average_of": ["a", "a"]}], "each teacher may appear once"),
        ([{"name": "a"}, {"name": "s", "average_of": ["a"]}], "at least 2 items"),
        (
            [{"name": "a"}, {"name": "b"}, {"name": "s", "average_of": ["a", "b"], "embedding_weight": 1}],
            "a soup is not trained",
        ),
        (
            [{"name": "a", "kind": "cross-encoder"}, {"name": "b"}, {"name": "s", "average_of": ["a", "b"]}],
            "'a' must be a bi-encoder teacher",
        ),
        (
            [{"name": "a", "base": "all-mpnet-base-v2"}, {"name": "b"}, {"name": "s", "average_of": ["a", "b"]}],
            "'a' must be a bi-encoder teacher from this teacher's base 'all-MiniLM-L6-v2'",
        ),
        (
            [{"name": "a"}, {"name": "b"}, {"name": "s", "kind": "cross-encoder", "average_of": ["a", "b"]}],
            "a soup is a bi-encoder teacher built here",
        ),
    ],
)
def test_a_soup_must_name_earlier_teachers_of_its_own_base(
    tmp_path: Path, sample_data: Path, teachers: list[dict], error: str
) -> None:
    soup = next(i for i, t in enumerate(teachers) if "average_of" in t)
    with pytest.raises(ValidationError, match=rf"teachers.{soup}.average_of[\s\S]*{error}"):
        tiny_spec(tmp_path, sample_data, teachers=teachers)


def test_a_soup_of_ready_made_teachers_needs_one_architecture(tmp_path: Path, sample_data: Path) -> None:
    folders = {"a": make_tiny_base(tmp_path), "b": make_tiny_base(tmp_path, name="wide", hidden_size=64)}
    with pytest.raises(ValueError, match="average_of: .*tiny-bert and .*wide are not the same architecture"):
        _prepare(tmp_path, sample_data, None, folders, name="soup", average_of=["b", "a"])


def test_a_soup_keeps_only_a_base_of_its_own_architecture(tmp_path: Path, sample_data: Path) -> None:
    folders = {"a": make_tiny_base(tmp_path, seed=1, name="a"), "b": make_tiny_base(tmp_path, seed=2, name="b")}
    spec = TeacherSpec(
        name="soup",
        base=str(make_tiny_base(tmp_path, name="wide", hidden_size=64)),
        average_of=["a", "b"],
        keep_base=0.2,
    )
    with pytest.raises(ValueError, match="average_of: .*wide and .*/a are not the same architecture"):
        prepare_teacher(
            spec,
            train_pairs=[],
            out_dir=tmp_path / "run",
            cache_dir=None,
            device=TEST_DEVICE,
            hooks=Hooks(),
            checkpoint_every=100,
            teacher_dirs=folders,
        )
