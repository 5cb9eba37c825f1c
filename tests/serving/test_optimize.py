"""Registration-time optimisation: the fastest batch-invariant backend within 0.5 MAP points of fp32 is served."""

import json
import shutil
from pathlib import Path

import pytest

from app.distill.data import Pair
from app.distill.metrics import ranking_metrics
from app.serving import optimize
from app.serving.backends import CPU_BACKENDS, ONNX_FILES, load_runner
from app.serving.optimize import optimize_for_serving


def test_chosen_backend_is_the_fastest_acceptable_and_keeps_map(
    tiny_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    folder = shutil.copytree(tiny_ensemble, tmp_path / "ensemble")

    serving = optimize_for_serving(folder, eval_pairs, threads=1)

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["serving"] == serving
    candidates = {c["backend"]: c for c in serving["candidates"]}
    assert set(candidates) == set(CPU_BACKENDS)
    measured = [c for c in candidates.values() if "ms_per_question" in c]
    assert {"torch-fp32", "torch-int8", "onnx-fp32"} <= {c["backend"] for c in measured}
    acceptable = [c for c in measured if c["map"] >= serving["map_fp32"] - 0.005 and c["batch_drift"] <= 1e-4]
    assert serving["backend"] == min(acceptable, key=lambda c: c["ms_per_question"])["backend"]
    # Dynamic int8 scales activations per batch: a pair's score would move with its batch-mates, so never served.
    assert candidates["torch-fp32"]["batch_drift"] <= 1e-4
    assert candidates["torch-int8"]["batch_drift"] > 1e-4 and not candidates["torch-int8"]["acceptable"]
    assert serving["backend"] in ("torch-fp32", "onnx-fp32")

    # A pair's served score does not depend on the pairs that share its batch.
    runner = load_runner(folder)
    pair, others = eval_pairs[0], eval_pairs[1:12]
    alone = runner.score([pair.question], [pair.passage]).scores[0]
    batched = runner.score([pair.question] + [p.question for p in others], [pair.passage] + [p.passage for p in others])
    assert abs(batched.scores[0] - alone) <= 1e-4
    runner.close()

    # What is served from the folder now reproduces the recorded quality.
    runner = load_runner(folder)
    assert runner.backend == serving["backend"]
    scores = runner.score([p.question for p in eval_pairs], [p.passage for p in eval_pairs]).scores
    labels = [p.label for p in eval_pairs]
    served_map = ranking_metrics([p.qid for p in eval_pairs], scores.tolist(), labels)["map"]
    assert abs(served_map - serving["map_backend"]) < 1e-9
    assert served_map >= serving["map_fp32"] - 0.005
    kept = {f.name for f in folder.glob("member-*/*.onnx")}
    assert kept == ({ONNX_FILES[serving["backend"]]} if serving["backend"] in ONNX_FILES else set())


def test_a_busy_spell_during_timing_weighs_on_every_candidate_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two equally fast candidates; the CPU is busy (5x slower) for the 30 runs after the warm-up rounds.
    # Timed one after the other, the first would take the whole spell and lose; taking turns, neither does.
    clock = {"now": 0.0, "runs": 0}

    class Candidate:
        def score(self, questions: list[str], passages: list[str]) -> None:
            clock["runs"] += 1
            clock["now"] += 0.005 if 4 < clock["runs"] <= 34 else 0.001

    monkeypatch.setattr(optimize.time, "perf_counter", lambda: clock["now"])
    times = optimize.time_interleaved({"a": Candidate(), "b": Candidate()}, "q", ["p"] * 10)

    assert times["a"] == pytest.approx(times["b"])
