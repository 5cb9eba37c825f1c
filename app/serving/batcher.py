"""Dynamic micro-batching: concurrent questions are merged into one inference batch.

The event loop only queues and hands out results; scoring (tokenisation included) runs on an executor
thread. While a batch runs, the next one fills up; up to `max_inflight` batches run at once, so that the
questions that just missed a batch need not wait for all of it to finish. Under load (a batch running, or
questions left queued by the last one) a batch also waits until it holds `max_batch_pairs` pairs or its
oldest question has waited `max_wait_ms`, whichever comes first; an idle model answers a lone question at once.
A full queue refuses at once, with the time it should take to drain at the pace of the recent batches.
"""

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, Protocol, Self, TypeVar

from app.serving.metrics import BATCH_PAIRS, BATCH_REQUESTS, ERRORS, QUEUE_TIME

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60
PACE_WEIGHT = 0.3  # weight of the newest batch in the moving average of seconds per pair


class Sliceable(Protocol):
    """A batch result whose rows are the batch's pairs, in order."""

    def rows(self, start: int, stop: int) -> Self: ...


R = TypeVar("R", bound=Sliceable)
ScoreFn = Callable[[list[str], list[str]], R]


class QueueFullError(Exception):
    """The model's queue is full: the caller should retry after `retry_after_s` seconds."""

    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(f"model {model!r} is busy: its request queue is full; retry in {retry_after_s} s")
        self.model = model
        self.retry_after_s = retry_after_s


class BatcherClosedError(Exception):
    """The batcher was closed (its model was unloaded) before the question was queued or answered."""


@dataclass(eq=False)
class _Pending:
    question: str
    passages: Sequence[str]
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[R]):
    """Queues questions for one model and scores them in merged batches on `executor`."""

    def __init__(
        self,
        score: ScoreFn,
        *,
        model: str,
        executor: Executor,
        max_batch_pairs: int,
        max_wait_ms: float,
        max_queue: int,
        max_inflight: int = 1,
    ) -> None:
        self._score = score
        self._model = model
        self._executor = executor
        self._max_pairs = max(1, max_batch_pairs)
        self._max_wait_s = max(0.0, max_wait_ms) / 1000
        self._max_queue = max(1, max_queue)
        self._pending: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._under_load = False  # questions were left queued when the last batch finished
        self._max_inflight = max(1, max_inflight)
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._seconds_per_pair: float | None = None  # moving average over the recent batches
        self._running: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Questions waiting for a batch."""
        return len(self._pending)

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self._model}")

    async def submit(self, question: str, passages: Sequence[str]) -> R:
        """Score `passages` against `question`; returns this question's rows of its batch's result."""
        if self._closing or self._task is None:
            raise BatcherClosedError(f"model {self._model!r} is not being served")
        if len(self._pending) >= self._max_queue:
            ERRORS.labels("queue_full").inc()
            raise QueueFullError(self._model, retry_after_s=self._drain_seconds())
        item = _Pending(question, passages, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._arrived.set()
        return await item.future

    async def aclose(self) -> None:
        """Stop taking questions, answer those already queued, then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        try:
            while True:
                while not self._pending:
                    if self._closing:
                        await asyncio.gather(*self._running)
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._slots.acquire()
                if self._running or self._under_load:
                    await self._wait_for_more()
                batch = self._take_batch()
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._batch_done)
        finally:
            for task in self._running:
                task.cancel()
            # Only reached early if the task itself is cancelled: nobody may be left waiting forever.
            for item in self._pending:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError(f"model {self._model!r} was unloaded"))
            self._pending.clear()

    def _batch_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()
        self._under_load = bool(self._pending)

    async def _wait_for_more(self) -> None:
        """Wait until the batch is full or its oldest question has waited max_wait."""
        deadline = self._pending[0].enqueued_at + self._max_wait_s
        while not self._closing and self._queued_pairs() < self._max_pairs:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _drain_seconds(self) -> int:
        """Whole seconds the queue takes to drain at the recent pace: 1 until a batch was timed, at most 60."""
        if self._seconds_per_pair is None:
            return 1
        drain = self._queued_pairs() * self._seconds_per_pair / self._max_inflight
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(drain)))

    def _queued_pairs(self) -> int:
        return sum(len(item.passages) for item in self._pending)

    def _take_batch(self) -> list[_Pending]:
        """Pop questions up to max_batch_pairs (always at least one); skip those whose caller left."""
        batch: list[_Pending] = []
        pairs = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():
                self._pending.popleft()
                continue
            if batch and pairs + len(item.passages) > self._max_pairs:
                break
            batch.append(self._pending.popleft())
            pairs += len(item.passages)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        questions = [item.question for item in batch for _ in item.passages]
        passages = [passage for item in batch for passage in item.passages]
        for item in batch:
            QUEUE_TIME.observe(started - item.enqueued_at)
        BATCH_REQUESTS.observe(len(batch))
        BATCH_PAIRS.observe(len(passages))
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._score, questions, passages)
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError(f"model {self._model!r} was unloaded"))
            raise
        except Exception as err:
            log.exception("model %s: inference failed on a batch of %d pairs", self._model, len(passages))
            ERRORS.labels("inference").inc(len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        pace = (time.perf_counter() - started) / len(passages)
        previous = self._seconds_per_pair
        self._seconds_per_pair = pace if previous is None else previous + PACE_WEIGHT * (pace - previous)
        start = 0
        for item in batch:
            stop = start + len(item.passages)
            if not item.future.done():
                item.future.set_result(result.rows(start, stop))
            start = stop
