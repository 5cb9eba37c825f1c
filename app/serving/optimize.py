"""Choose, at registration, the fastest CPU form of an ensemble that keeps its quality.

Candidates: fp32 torch, torch int8 dynamic quantisation (Linear layers), ONNX Runtime fp32 and ONNX
Runtime int8, all loaded at once. Each is timed on one question with 10 passages, the candidates taking
turns so that a busy moment of a shared CPU weighs on all of them alike, and scored on the job's evaluation set;
a candidate is acceptable when its MAP is at most 0.5 points (0.005) below fp32's and a pair's score does not
depend on its batch-mates (scored alone and in one batch, within BATCH_TOLERANCE). Dynamic int8 quantisation
(torch's and ONNX Runtime's) scales activations per batch, so it fails the second test: served, a pair's score
would change with the other requests that share its batch. The fastest acceptable candidate is written into
the ensemble folder and recorded in its manifest (`serving`).
"""

import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from app.distill.data import Pair
from app.distill.export import StudentEnsemble, load_ensemble
from app.distill.manifest import EnsembleManifest, ServingChoice, read_manifest, write_manifest
from app.distill.metrics import ranking_metrics
from app.distill.onnx_runtime import export_onnx
from app.serving.backends import (
    CPU_BACKENDS,
    ONNX_FILES,
    EnsembleRunner,
    load_runner,
    member_dirs,
    quantize_onnx,
    serving_module,
    torch_runner,
)

log = logging.getLogger(__name__)

MAX_MAP_DROP = 0.005  # 0.5 MAP points
TIMING_PAIRS = 10
TIMING_RUNS = 20
BATCH_CHECK_PAIRS = 16
BATCH_TOLERANCE = 1e-4


def optimize_for_serving(ensemble_dir: Path, eval_pairs: list[Pair], *, threads: int = 0) -> dict:
    """Time every CPU backend, keep the fastest within 0.5 MAP points of fp32; returns manifest["serving"]."""
    if not eval_pairs or any(p.label is None for p in eval_pairs):
        raise ValueError("eval_pairs: optimising for serving needs labelled evaluation pairs")
    manifest = read_manifest(ensemble_dir)
    ensemble = load_ensemble(ensemble_dir, device="cpu")
    _write_onnx_files(ensemble_dir, manifest, ensemble)

    torch_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)  # time the torch candidates as they will be served
    runners, failed = _load_candidates(ensemble_dir, ensemble, threads)
    try:
        timing = [eval_pairs[i % len(eval_pairs)] for i in range(TIMING_PAIRS)]
        times = time_interleaved(runners, timing[0].question, [p.passage for p in timing])
        measured = {
            backend: {
                "backend": backend,
                "ms_per_question": round(times[backend], 3),
                "map": runner_map(runner, eval_pairs),
                "batch_drift": _batch_drift(runner, eval_pairs[:BATCH_CHECK_PAIRS]),
            }
            for backend, runner in runners.items()
        }
    finally:
        torch.set_num_threads(torch_threads)
        for runner in runners.values():
            runner.close()
    if "torch-fp32" not in measured:
        raise RuntimeError(f"the fp32 reference could not be loaded: {failed.get('torch-fp32')}")
    map_fp32 = measured["torch-fp32"]["map"]
    if math.isnan(map_fp32):
        raise ValueError("eval_pairs: no question has a relevant passage, so MAP is undefined")
    for candidate in measured.values():
        candidate["acceptable"] = (
            candidate["map"] >= map_fp32 - MAX_MAP_DROP and candidate["batch_drift"] <= BATCH_TOLERANCE
        )
    candidates = [measured.get(backend) or failed[backend] for backend in CPU_BACKENDS]
    for candidate in candidates:
        log.info("serving candidate %s", candidate)

    acceptable = [c for c in candidates if c.get("acceptable")]
    chosen = min(acceptable, key=lambda c: c["ms_per_question"])
    serving = ServingChoice(
        backend=chosen["backend"],
        ms_per_question=chosen["ms_per_question"],
        map_fp32=map_fp32,
        map_backend=chosen["map"],
        max_map_drop=MAX_MAP_DROP,
        eval_pairs=len(eval_pairs),
        candidates=candidates,
    )
    _remove_unused_onnx(ensemble_dir, manifest, keep=serving.backend)
    write_manifest(ensemble_dir, manifest.model_copy(update={"serving": serving}))
    log.info("%s: serving with %s (%.1f ms per question, MAP %.4f vs fp32 %.4f)",
             ensemble_dir, serving.backend, serving.ms_per_question, serving.map_backend, map_fp32)
    return serving.model_dump(mode="json")


def time_interleaved(runners: dict[str, EnsembleRunner], question: str, passages: Sequence[str]) -> dict[str, float]:
    """Median milliseconds each runner takes to score one question with its passages.

    The runners take turns, one run each per round, after two warm-up rounds: on a shared CPU a busy moment
    then slows every candidate alike instead of deciding the choice.
    """
    questions = [question] * len(passages)
    times: dict[str, list[float]] = {backend: [] for backend in runners}
    for round_ in range(2 + TIMING_RUNS):
        for backend, runner in runners.items():
            started = time.perf_counter()
            runner.score(questions, passages)
            if round_ >= 2:
                times[backend].append((time.perf_counter() - started) * 1000)
    return {backend: statistics.median(ms) for backend, ms in times.items()}


def _load_candidates(
    ensemble_dir: Path, ensemble: StudentEnsemble, threads: int
) -> tuple[dict[str, EnsembleRunner], dict[str, dict]]:
    """A runner for every CPU backend that loads, and the error of each that does not (reported, not fatal)."""
    runners, failed = {}, {}
    for backend in CPU_BACKENDS:
        try:
            if backend in ONNX_FILES:
                runners[backend] = load_runner(ensemble_dir, backend=backend, threads=threads)
            else:
                runners[backend] = torch_runner(ensemble, backend)
        except Exception as err:
            log.warning("serving candidate %s failed to load: %s", backend, err)
            failed[backend] = {"backend": backend, "error": f"{type(err).__name__}: {err}"}
    return runners, failed


def runner_map(runner: EnsembleRunner, pairs: list[Pair]) -> float:
    """MAP of a runner's scores over labelled pairs."""
    scores = runner.score([p.question for p in pairs], [p.passage for p in pairs])
    return ranking_metrics([p.qid for p in pairs], scores.scores.tolist(), [int(p.label) for p in pairs])["map"]


def _batch_drift(runner: EnsembleRunner, pairs: list[Pair]) -> float:
    """The largest change in a pair's score between scoring it alone and in one batch with the others."""
    together = runner.score([p.question for p in pairs], [p.passage for p in pairs]).scores
    alone = [runner.score([p.question], [p.passage]).scores[0] for p in pairs]
    return float(max(abs(a - b) for a, b in zip(alone, together, strict=True)))


def _write_onnx_files(ensemble_dir: Path, manifest: EnsembleManifest, ensemble: StudentEnsemble) -> None:
    """Export each member to ONNX, and its int8 quantised copy; a failure leaves those backends out."""
    # Pairs of different lengths, so that the traced graph is the one that handles padding.
    sample = ensemble.encode(["a sample question ?"] * 2, ["a passage", "another passage, a longer one"])
    for member, folder in zip(ensemble.members, member_dirs(ensemble_dir, manifest), strict=True):
        try:
            export_onnx(serving_module(member), sample, folder / ONNX_FILES["onnx-fp32"])
            quantize_onnx(folder / ONNX_FILES["onnx-fp32"], folder / ONNX_FILES["onnx-int8"])
        except Exception as err:
            log.warning("ONNX export of %s failed, ONNX backends left out: %s", folder, err)
            return


def _remove_unused_onnx(ensemble_dir: Path, manifest: EnsembleManifest, *, keep: str) -> None:
    for backend, filename in ONNX_FILES.items():
        if backend != keep:
            for folder in member_dirs(ensemble_dir, manifest):
                (folder / filename).unlink(missing_ok=True)
