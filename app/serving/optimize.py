"""Choose, at registration, the fastest CPU form of an ensemble that keeps its quality.

Candidates: fp32 torch, torch int8 dynamic quantisation (Linear layers), ONNX Runtime fp32 and ONNX
Runtime int8. Each is timed on one question with 10 passages and scored on the job's evaluation set;
a candidate is acceptable when its MAP is at most 0.5 points (0.005) below fp32's. The fastest
acceptable one is written into the ensemble folder and recorded in its manifest under "serving".
"""

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from app.distill.data import Pair
from app.distill.export import StudentEnsemble, load_ensemble, read_manifest
from app.distill.metrics import ranking_metrics
from app.serving.backends import (
    CPU_BACKENDS,
    ONNX_FILES,
    EnsembleRunner,
    export_onnx,
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


def optimize_for_serving(ensemble_dir: Path, eval_pairs: list[Pair], *, threads: int = 0) -> dict:
    """Time every CPU backend, keep the fastest within 0.5 MAP points of fp32; returns manifest["serving"]."""
    if not eval_pairs or any(p.label is None for p in eval_pairs):
        raise ValueError("eval_pairs: optimising for serving needs labelled evaluation pairs")
    manifest = read_manifest(ensemble_dir)
    ensemble = load_ensemble(ensemble_dir, device="cpu")
    _write_onnx_files(ensemble_dir, manifest, ensemble)

    candidates = []
    map_fp32 = math.nan
    torch_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)  # time the torch candidates as they will be served
    try:
        for backend in CPU_BACKENDS:
            candidate = _measure(ensemble_dir, ensemble, backend, eval_pairs, threads)
            if backend == "torch-fp32":
                map_fp32 = candidate["map"]
                if math.isnan(map_fp32):
                    raise ValueError("eval_pairs: no question has a relevant passage, so MAP is undefined")
            if "map" in candidate:
                candidate["acceptable"] = candidate["map"] >= map_fp32 - MAX_MAP_DROP
            candidates.append(candidate)
            log.info("serving candidate %s: %s", backend, candidate)
    finally:
        torch.set_num_threads(torch_threads)

    acceptable = [c for c in candidates if c.get("acceptable")]
    chosen = min(acceptable, key=lambda c: c["ms_per_question"])
    serving = {
        "backend": chosen["backend"],
        "ms_per_question": chosen["ms_per_question"],
        "map_fp32": map_fp32,
        "map_backend": chosen["map"],
        "max_map_drop": MAX_MAP_DROP,
        "eval_pairs": len(eval_pairs),
        "candidates": candidates,
    }
    _remove_unused_onnx(ensemble_dir, manifest, keep=chosen["backend"])
    manifest["serving"] = serving
    _write_manifest(ensemble_dir, manifest)
    log.info("%s: serving with %s (%.1f ms per question, MAP %.4f vs fp32 %.4f)",
             ensemble_dir, chosen["backend"], chosen["ms_per_question"], chosen["map"], map_fp32)
    return serving


def measure_ms_per_question(runner: EnsembleRunner, question: str, passages: Sequence[str]) -> float:
    """Median milliseconds to score one question with its passages, after two warm-up runs."""
    questions = [question] * len(passages)
    for _ in range(2):
        runner.score(questions, passages)
    times = []
    for _ in range(TIMING_RUNS):
        started = time.perf_counter()
        runner.score(questions, passages)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _measure(
    ensemble_dir: Path, ensemble: StudentEnsemble, backend: str, pairs: list[Pair], threads: int
) -> dict:
    try:
        if backend in ONNX_FILES:
            runner = load_runner(ensemble_dir, backend=backend, threads=threads)
        else:
            runner = torch_runner(ensemble, backend)
    except Exception as err:  # a backend that cannot run this ensemble is reported, not fatal
        log.warning("serving candidate %s failed to load: %s", backend, err)
        return {"backend": backend, "error": f"{type(err).__name__}: {err}"}
    timing = [pairs[i % len(pairs)] for i in range(TIMING_PAIRS)]
    try:
        ms = measure_ms_per_question(runner, timing[0].question, [p.passage for p in timing])
        scores = runner.score([p.question for p in pairs], [p.passage for p in pairs])
    finally:
        runner.close()
    quality = ranking_metrics([p.qid for p in pairs], scores.scores.tolist(), [int(p.label) for p in pairs])
    return {"backend": backend, "ms_per_question": round(ms, 3), "map": quality["map"]}


def _write_onnx_files(ensemble_dir: Path, manifest: dict, ensemble: StudentEnsemble) -> None:
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


def _remove_unused_onnx(ensemble_dir: Path, manifest: dict, *, keep: str) -> None:
    for backend, filename in ONNX_FILES.items():
        if backend != keep:
            for folder in member_dirs(ensemble_dir, manifest):
                (folder / filename).unlink(missing_ok=True)


def _write_manifest(ensemble_dir: Path, manifest: dict) -> None:
    path = ensemble_dir / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
