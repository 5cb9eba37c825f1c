"""The serving runtime: loads model versions on demand, batches their questions and ranks the passages.

The inference threads (one per batch in flight) are shared by every loaded model, so that models do not
fight over the CPU cores; loading runs on its own thread, so that a model being loaded does not stall the
others' answers.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.distill.scoring import PairScores
from app.serving.backends import EnsembleRunner, load_runner
from app.serving.batcher import BatcherClosedError, MicroBatcher
from app.serving.cache import ModelCache
from app.serving.metrics import ERRORS, MODEL_LATENCY, MODEL_LOAD, REQUEST_LATENCY
from app.settings import Settings

log = logging.getLogger(__name__)

WARMUP_PASSAGES = 10


class ModelLoadError(RuntimeError):
    """A registered version's artifact could not be loaded (missing, unreadable or not an ensemble)."""


@dataclass(frozen=True, slots=True)
class ServedVersion:
    """A registered model version, as far as serving is concerned."""

    id: str  # the cache key: one loaded copy per version, whatever alias points at it
    name: str
    version: int
    artifact_uri: str


@dataclass(frozen=True, slots=True)
class RankedPassage:
    """One passage of an answer: its index in the request, its score and, when asked, the parts of it."""

    index: int
    passage: str
    score: float
    members: list[float] | None = None
    heads: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The passages ranked by score, best first, and who answered how fast."""

    version: ServedVersion
    passages: list[RankedPassage]
    took_ms: float


@dataclass
class LoadedModel:
    """A model version in memory with its batcher."""

    version: ServedVersion
    runner: EnsembleRunner
    batcher: MicroBatcher
    load_ms: float
    loaded_at: float = field(default_factory=time.time)

    @property
    def size_bytes(self) -> int:
        """Bytes of the weights in use."""
        return self.runner.size_bytes

    async def aclose(self) -> None:
        """Answer what is queued, then stop batching."""
        await self.batcher.aclose()
        self.runner.close()


class ServingRuntime:
    """Answers questions with registered model versions, loading and batching them as needed."""

    def __init__(self, settings: Settings, *, fetch_dir: Callable[[str], Path] = Path) -> None:
        self._settings = settings
        self._fetch_dir = fetch_dir
        self._device = _resolve_device(settings.serve_device)
        self._cache: ModelCache[LoadedModel] = ModelCache(settings.serve_cache_bytes)
        self._infer_pool: ThreadPoolExecutor | None = None
        self._load_pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Create the inference and loading threads (call from the app's lifespan)."""
        if self._settings.serve_threads > 0:
            torch.set_num_threads(self._settings.serve_threads)
        self._infer_pool = ThreadPoolExecutor(
            self._settings.serve_max_inflight_batches, thread_name_prefix="serve-infer"
        )
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="serve-load")

    async def aclose(self) -> None:
        """Answer what is queued, unload every model and stop the threads."""
        await self._cache.aclose()
        for pool in (self._infer_pool, self._load_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._infer_pool = self._load_pool = None

    def loaded(self) -> list[dict]:
        """The loaded model versions, most recently used first (for /readyz)."""
        return [
            {
                "name": model.version.name,
                "version": model.version.version,
                "backend": model.runner.backend,
                "bytes": model.size_bytes,
                "load_ms": round(model.load_ms, 1),
                "queued": model.batcher.queued,
            }
            for _, model in self._cache.loaded()
        ]

    async def answer(
        self,
        version: ServedVersion,
        question: str,
        passages: Sequence[str],
        *,
        top_k: int | None = None,
        explain: bool = False,
    ) -> Answer:
        """Rank `passages` for `question` with `version`; raises QueueFullError when it is overloaded."""
        started = time.perf_counter()
        model, scores = await self._score(version, question, passages)
        ranked = _rank(scores, passages, heads=model.runner.heads, top_k=top_k, explain=explain)
        took = time.perf_counter() - started
        REQUEST_LATENCY.observe(took)
        MODEL_LATENCY.labels(version.name, str(version.version)).observe(took)
        return Answer(version, ranked, took * 1000)

    async def load(self, version: ServedVersion) -> None:
        """Load (and warm up) `version` ahead of its first question."""
        await self._cache.get(version.id, lambda: self._load(version))

    async def _score(
        self, version: ServedVersion, question: str, passages: Sequence[str]
    ) -> tuple[LoadedModel, PairScores]:
        # A model may be unloaded between finding it and queueing on it: then load it again, once.
        for attempt in range(2):
            model = await self._cache.get(version.id, lambda: self._load(version))
            try:
                return model, await model.batcher.submit(question, passages)
            except BatcherClosedError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _load(self, version: ServedVersion) -> LoadedModel:
        if self._infer_pool is None or self._load_pool is None:
            raise RuntimeError("the serving runtime is not started")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(self._load_pool, self._load_runner, version)
        except Exception as err:
            ERRORS.labels("load").inc()
            log.exception("could not load %s:%d from %s", version.name, version.version, version.artifact_uri)
            raise ModelLoadError(
                f"model {version.name}:{version.version} could not be loaded: {type(err).__name__}: {err}"
            ) from err
        batcher: MicroBatcher[PairScores] = MicroBatcher(
            runner.score,
            model=version.name,
            executor=self._infer_pool,
            max_batch_pairs=self._settings.serve_max_batch_pairs,
            max_wait_ms=self._settings.serve_max_wait_ms,
            max_queue=self._settings.serve_max_queue,
            max_inflight=self._settings.serve_max_inflight_batches,
        )
        batcher.start()
        load_ms = (time.perf_counter() - started) * 1000
        MODEL_LOAD.observe(load_ms / 1000)
        log.info("serving %s:%d (%s) on %s, loaded in %.0f ms",
                 version.name, version.version, version.id, runner.backend, load_ms)
        return LoadedModel(version, runner, batcher, load_ms)

    def _load_runner(self, version: ServedVersion) -> EnsembleRunner:
        folder = self._fetch_dir(version.artifact_uri)
        runner = load_runner(folder, device=self._device, threads=self._settings.serve_threads)
        # Warm-up: the first batches pay for lazy initialisation (allocators, kernels, ORT's plan).
        for _ in range(2):
            runner.score(["warm-up question"] * WARMUP_PASSAGES, ["a warm-up passage"] * WARMUP_PASSAGES)
        return runner


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"serve_device: expected 'auto', 'cpu' or 'cuda', got {name!r}")
    return name


def _rank(
    scores: PairScores, passages: Sequence[str], *, heads: list[str], top_k: int | None, explain: bool
) -> list[RankedPassage]:
    order = sorted(range(len(passages)), key=lambda i: -float(scores.scores[i]))
    if top_k is not None:
        order = order[:top_k]
    ranked = []
    for i in order:
        members = heads_by_name = None
        if explain:
            members = [float(s) for s in scores.member_scores[i]]
            head_means = scores.head_scores[i].mean(axis=0)
            heads_by_name = {name: float(s) for name, s in zip(heads, head_means, strict=True)}
        ranked.append(RankedPassage(i, passages[i], float(scores.scores[i]), members, heads_by_name))
    return ranked
