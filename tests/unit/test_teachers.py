"""Teachers: weight-space averaging with the base checkpoint after fine-tuning (keep_base)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.distill.data import read_pairs
from app.distill.devices import resolve_device
from app.distill.hooks import Hooks
from app.distill.spec import TeacherSpec
from app.distill.teachers import prepare_teacher
from tests.unit.helpers import MAX_LENGTH, Recorder, make_tiny_base, tiny_data


def _train(tmp_path: Path, sample_data: Path, kind: str, keep_base: float, hooks: Hooks | None = None) -> dict:
    base = make_tiny_base(tmp_path)
    spec = TeacherSpec(
        name=f"t-{kind}-{keep_base:g}",
        kind=kind,
        base=str(base),
        batch_size=8,
        max_length=MAX_LENGTH,
        max_steps=3,
        learning_rate=1e-2,
        keep_base=keep_base,
    )
    folder = prepare_teacher(
        spec,
        train_pairs=read_pairs(tiny_data(tmp_path, sample_data)["train"]).pairs,
        out_dir=tmp_path / "run",
        cache_dir=None,
        device=resolve_device("cpu"),
        hooks=hooks or Hooks(),
        checkpoint_every=100,
    )
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("kind", ["bi-encoder", "cross-encoder"])
def test_keep_base_averages_the_fine_tuned_weights_with_the_bases(
    tmp_path: Path, sample_data: Path, kind: str
) -> None:
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
