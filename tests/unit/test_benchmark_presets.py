"""The quality benchmark's presets are valid pipeline specs, first run and reused teachers alike (the benchmark
itself needs the real weights and data, so it is not run here)."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_each_preset_is_a_valid_spec_and_reuses_its_trained_teachers(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    quality = importlib.import_module("quality")
    spec = quality.build_spec(quality.PRESETS[name], seed=0)
    assert spec.student.init_from in {t.name for t in spec.teachers}

    ready = quality.ready_teachers(spec, {t.name: Path("/runs", t.name) for t in spec.teachers if not t.average_of})
    later = quality.build_spec(quality.PRESETS[name], seed=1, teachers=ready)
    assert [t.name for t in later.teachers] == [t.name for t in spec.teachers]
    for first, reused in zip(spec.teachers, later.teachers, strict=True):
        # Trained teachers come back as ready-made folders; a soup is averaged again from them.
        assert reused.path == (None if first.average_of else f"/runs/{first.name}")
        assert reused.average_of == first.average_of
        assert reused.keep_base == (first.keep_base if first.average_of else 0)  # folders hold their mix already
