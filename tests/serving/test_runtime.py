"""The serving runtime: ranks like the fp32 ensemble, batches concurrent questions, caches by version."""

import asyncio
import shutil
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY

from app.distill.data import Pair
from app.distill.export import load_ensemble
from app.serving.runtime import Answer, ServedVersion, ServingRuntime
from app.settings import Settings


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(home=tmp_path / "home", serve_device="cpu", serve_threads=1, **overrides)


def version_of(folder: Path, name: str = "qa", number: int = 1) -> ServedVersion:
    return ServedVersion(id=f"mv_{name}_{number}", name=name, version=number, artifact_uri=str(folder))


async def answer_all(runtime: ServingRuntime, calls: list[tuple[ServedVersion, str, list[str]]]) -> list[Answer]:
    await runtime.start()
    try:
        return list(await asyncio.gather(*(runtime.answer(v, q, p, explain=True) for v, q, p in calls)))
    finally:
        await runtime.aclose()


def questions_of(pairs: list[Pair]) -> list[tuple[str, list[str]]]:
    grouped: dict[str, tuple[str, list[str]]] = {}
    for pair in pairs:
        grouped.setdefault(pair.qid, (pair.question, []))[1].append(pair.passage)
    return list(grouped.values())


def test_ranking_equals_the_fp32_ensembles_own_scores(
    tiny_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    ensemble = load_ensemble(tiny_ensemble)
    question, passages = questions_of(eval_pairs)[0]
    expected = ensemble.score_pairs([question] * len(passages), passages)

    runtime = ServingRuntime(make_settings(tmp_path))
    (answer,) = asyncio.run(answer_all(runtime, [(version_of(tiny_ensemble), question, passages)]))

    assert [r.index for r in answer.passages] == list(np.argsort(-expected.scores, kind="stable"))
    np.testing.assert_allclose([r.score for r in answer.passages], np.sort(expected.scores)[::-1], atol=1e-5)
    best = answer.passages[0]
    assert best.passage == passages[best.index]
    np.testing.assert_allclose(best.members, expected.member_scores[best.index], atol=1e-5)
    assert set(best.heads) == {"teacher-a", "teacher-b"}
    head_means = expected.head_scores[best.index].mean(axis=0)
    np.testing.assert_allclose(list(best.heads.values()), head_means, atol=1e-5)
    assert answer.version.version == 1 and answer.took_ms > 0


RUNTIME_SAMPLES = (
    "qadistill_batch_requests_count",
    "qadistill_batch_requests_sum",
    "qadistill_answer_latency_seconds_count",
)


def test_concurrent_questions_are_batched_and_each_gets_its_own_ranking(
    tiny_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path
) -> None:
    ensemble = load_ensemble(tiny_ensemble)
    questions = questions_of(eval_pairs)
    version = version_of(tiny_ensemble, name="concurrent")
    runtime = ServingRuntime(make_settings(tmp_path, serve_max_wait_ms=50.0))
    # The metrics are process-wide (no per-model label): compare before and after.
    before = {name: REGISTRY.get_sample_value(name, {}) or 0.0 for name in RUNTIME_SAMPLES}

    answers = asyncio.run(answer_all(runtime, [(version, q, p) for q, p in questions]))

    for (question, passages), answer in zip(questions, answers, strict=True):
        own = ensemble.score_pairs([question] * len(passages), passages).scores
        assert [r.index for r in answer.passages] == list(np.argsort(-own, kind="stable"))
    batches, merged, latency = ((REGISTRY.get_sample_value(name, {}) or 0.0) - before[name] for name in RUNTIME_SAMPLES)
    assert merged == len(questions)
    assert batches < len(questions), "concurrent questions should share inference batches"
    assert latency == len(questions)


def test_top_k_keeps_the_best_passages(tiny_ensemble: Path, eval_pairs: list[Pair], tmp_path: Path) -> None:
    question, passages = questions_of(eval_pairs)[1]
    runtime = ServingRuntime(make_settings(tmp_path))

    async def scenario() -> tuple[Answer, Answer]:
        await runtime.start()
        try:
            everything = await runtime.answer(version_of(tiny_ensemble), question, passages)
            best = await runtime.answer(version_of(tiny_ensemble), question, passages, top_k=3)
            return everything, best
        finally:
            await runtime.aclose()

    everything, best = asyncio.run(scenario())
    assert [r.index for r in best.passages] == [r.index for r in everything.passages[:3]]
    assert best.passages[0].members is None and best.passages[0].heads is None


def test_cache_keeps_versions_apart_and_evicts_the_least_recently_used(tiny_ensemble: Path, tmp_path: Path) -> None:
    other = shutil.copytree(tiny_ensemble, tmp_path / "other")
    v1, v2 = version_of(tiny_ensemble, number=1), version_of(other, number=2)
    one_model = load_ensemble(tiny_ensemble)
    size = sum(p.numel() * p.element_size() for m in one_model.members for p in m.parameters())
    runtime = ServingRuntime(make_settings(tmp_path, serve_cache_bytes=int(size * 1.5)))

    async def scenario() -> list[list[int]]:
        await runtime.start()
        try:
            seen = []
            await runtime.answer(v1, "q ?", ["a", "b"])
            seen.append([m["version"] for m in runtime.loaded()])
            await runtime.answer(v2, "q ?", ["a", "b"])
            seen.append([m["version"] for m in runtime.loaded()])
            await runtime.answer(v1, "q ?", ["a", "b"])
            seen.append([m["version"] for m in runtime.loaded()])
            return seen
        finally:
            await runtime.aclose()

    assert asyncio.run(scenario()) == [[1], [2], [1]]


def test_cache_holds_several_versions_most_recent_first(tiny_ensemble: Path, tmp_path: Path) -> None:
    runtime = ServingRuntime(make_settings(tmp_path))
    v1, v2 = version_of(tiny_ensemble, number=1), version_of(tiny_ensemble, number=2)

    async def scenario() -> list[dict]:
        await runtime.start()
        try:
            await asyncio.gather(runtime.answer(v1, "q ?", ["a"]), runtime.answer(v1, "q ?", ["b"]))
            await runtime.answer(v2, "q ?", ["a"])
            await runtime.answer(v1, "q ?", ["a"])
            return runtime.loaded()
        finally:
            await runtime.aclose()

    loaded = asyncio.run(scenario())
    assert [m["version"] for m in loaded] == [1, 2]
    assert all(m["backend"] == "torch-fp32" and m["bytes"] > 0 for m in loaded)
