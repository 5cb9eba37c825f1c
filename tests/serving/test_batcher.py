"""Micro-batching: concurrent questions share batches, each gets its own answer, overload is refused."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import REGISTRY

from app.distill.scoring import PairScores
from app.serving.batcher import MicroBatcher, QueueFullError


class LengthScorer:
    """Scores a pair by its passage length; records each batch it is given and on which thread."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # set when a batch is handed over

    def __call__(self, questions: list[str], passages: list[str]) -> PairScores:
        self.entered.set()
        self.release.wait(5)
        time.sleep(self.delay_s)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(passages))
        if self.fail_on is not None and self.fail_on in passages:
            raise ValueError(f"cannot score {self.fail_on!r}")
        scores = np.array([len(p) + len(q) / 1000 for q, p in zip(questions, passages, strict=True)])
        return PairScores(scores, scores[:, None], scores[:, None, None])


async def until_set(event: threading.Event) -> None:
    """Wait, off the event loop, until a scoring thread sets `event` (a fixed sleep can be too short on busy cores)."""
    assert await asyncio.to_thread(event.wait, 5), "the batch never reached the scorer"


def make_batcher(scorer: LengthScorer, executor: ThreadPoolExecutor, model: str, **limits: float) -> MicroBatcher:
    options = {"max_batch_pairs": 64, "max_wait_ms": 20.0, "max_queue": 100} | limits
    return MicroBatcher(scorer, model=model, executor=executor, **options)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A metric's value now; the metrics are process-wide (no per-model label), so tests compare deltas."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_concurrent_questions_are_batched_and_each_gets_its_own_scores() -> None:
    scorer = LengthScorer()
    batches_before = sample("qadistill_batch_requests_count")
    questions_before = sample("qadistill_batch_requests_sum")

    async def scenario() -> list[PairScores]:
        with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
            batcher = make_batcher(scorer, pool, "batched")
            batcher.start()
            answers = await asyncio.gather(
                *(batcher.submit(f"q{i}", ["a" * (i + 1), "b" * (10 * (i + 1))]) for i in range(8))
            )
            await batcher.aclose()
            return answers

    answers = asyncio.run(scenario())
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer.scores, [i + 1 + 0.002, 10 * (i + 1) + 0.002])
    assert len(scorer.batches) < 8, "eight concurrent questions should share batches"
    assert all(name.startswith("infer") for name in scorer.threads), "scoring must run off the event loop"
    assert sample("qadistill_batch_requests_count") - batches_before == len(scorer.batches)
    questions = sample("qadistill_batch_requests_sum") - questions_before
    assert questions > len(scorer.batches), "the batch-size metric shows more than one question per batch"


def test_batch_never_exceeds_max_pairs_but_a_large_question_still_runs() -> None:
    scorer = LengthScorer()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = make_batcher(scorer, pool, "capped", max_batch_pairs=5)
            batcher.start()
            await asyncio.gather(batcher.submit("big", ["x"] * 7), *(batcher.submit("q", ["y", "z"]) for _ in range(4)))
            await batcher.aclose()

    asyncio.run(scenario())
    sizes = sorted(len(b) for b in scorer.batches)
    assert sizes[-1] == 7 and all(size <= 5 for size in sizes[:-1])
    assert sum(sizes) == 15


def test_an_idle_model_answers_a_lone_question_without_waiting_for_a_batch() -> None:
    scorer = LengthScorer()

    async def scenario() -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = make_batcher(scorer, pool, "idle", max_wait_ms=5000.0)
            batcher.start()
            started = time.perf_counter()
            await batcher.submit("q", ["alone"])
            took = time.perf_counter() - started
            await batcher.aclose()
            return took

    assert asyncio.run(scenario()) < 2.5, "a lone question must not sit out max_wait_ms"


def test_under_load_a_batch_waits_for_more_questions() -> None:
    scorer = LengthScorer()
    scorer.release.clear()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = make_batcher(scorer, pool, "loaded", max_wait_ms=1000.0)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit("q1", ["first"]))
            await until_set(scorer.entered)  # q1's batch is running (held by the scorer)
            second = asyncio.ensure_future(batcher.submit("q2", ["second"]))
            await asyncio.sleep(0.05)
            scorer.release.set()
            await first
            await asyncio.sleep(0.05)  # q2 is queued, its batch waiting for company
            await asyncio.gather(second, batcher.submit("q3", ["third"]))
            await batcher.aclose()

    asyncio.run(scenario())
    assert scorer.batches == [["first"], ["second", "third"]]


def test_a_question_that_missed_a_running_batch_does_not_wait_for_it() -> None:
    held = threading.Event()
    slow_started = threading.Event()
    scorer = LengthScorer()

    def score(questions: list[str], passages: list[str]) -> PairScores:
        if "slow" in passages:
            slow_started.set()
            held.wait(5)
        return scorer(questions, passages)

    async def scenario() -> tuple[bool, bool]:
        with ThreadPoolExecutor(2) as pool:
            batcher = MicroBatcher(
                score,
                model="inflight",
                executor=pool,
                max_batch_pairs=64,
                max_wait_ms=0.0,
                max_queue=10,
                max_inflight=2,
            )
            batcher.start()
            slow = asyncio.ensure_future(batcher.submit("q1", ["slow"]))
            await until_set(slow_started)
            fast = await asyncio.wait_for(batcher.submit("q2", ["fast"]), timeout=2)
            slow_still_running = not slow.done()
            held.set()
            await slow
            await batcher.aclose()
            return slow_still_running, float(fast.scores[0]) == 4.002

    assert asyncio.run(scenario()) == (True, True)


def test_full_queue_refuses_at_once_instead_of_waiting() -> None:
    scorer = LengthScorer()
    refusals_before = sample("qadistill_answer_errors_total", {"reason": "queue_full"})
    scorer.release.clear()  # hold the first batch so that the queue fills up behind it

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = make_batcher(scorer, pool, "full", max_queue=2, max_wait_ms=0.0)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit("q", ["running"]))
            await until_set(scorer.entered)
            queued = [asyncio.ensure_future(batcher.submit("q", ["queued"])) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError) as refused:
                await asyncio.wait_for(batcher.submit("q", ["refused"]), timeout=1)
            assert refused.value.retry_after_s >= 1
            scorer.release.set()
            await asyncio.gather(first, *queued)
            await batcher.aclose()

    asyncio.run(scenario())
    assert sample("qadistill_answer_errors_total", {"reason": "queue_full"}) - refusals_before == 1


def test_retry_after_is_how_long_the_queue_takes_to_drain_at_the_recent_pace() -> None:
    scorer = LengthScorer(delay_s=0.11)  # one pair per batch: at least 0.11 s a pair

    async def scenario() -> int:
        with ThreadPoolExecutor(1) as pool:
            batcher = make_batcher(scorer, pool, "paced", max_batch_pairs=1, max_queue=10, max_wait_ms=0.0)
            batcher.start()
            await batcher.submit("q", ["timed"])  # sets the pace
            scorer.release.clear()
            scorer.entered.clear()
            running = asyncio.ensure_future(batcher.submit("q", ["running"]))
            await until_set(scorer.entered)
            queued = [asyncio.ensure_future(batcher.submit("q", ["queued"])) for _ in range(10)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError) as refused:
                await batcher.submit("q", ["refused"])
            for question in queued:  # callers that leave are skipped, not scored
                question.cancel()
            scorer.release.set()
            await running
            await batcher.aclose()
            return refused.value.retry_after_s

    # 10 queued pairs at 0.11 s each, one batch at a time: 1.1 s, rounded up. The timed batch may overrun
    # its sleep by up to 90 ms on busy cores and still give 2.
    assert asyncio.run(scenario()) == 2


def test_a_failing_batch_fails_only_its_own_questions() -> None:
    scorer = LengthScorer(fail_on="poison")

    async def scenario() -> tuple[list, PairScores]:
        with ThreadPoolExecutor(1) as pool:
            batcher = make_batcher(scorer, pool, "failing", max_wait_ms=10.0)
            batcher.start()
            together = await asyncio.gather(
                batcher.submit("q", ["poison"]), batcher.submit("q", ["fine"]), return_exceptions=True
            )
            later = await batcher.submit("q", ["later"])
            await batcher.aclose()
            return together, later

    together, later = asyncio.run(scenario())
    assert all(isinstance(result, ValueError) for result in together)
    assert later.scores.tolist() == [5.001]
