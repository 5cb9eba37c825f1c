"""Loaded models, keyed by model version, bounded by their weights' bytes, least recently used evicted."""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from app.serving.metrics import MODEL_CACHE_BYTES, MODEL_CACHE_EVICTIONS

log = logging.getLogger(__name__)


class Cacheable(Protocol):
    """What the cache needs of an entry: its size and how to release it."""

    @property
    def size_bytes(self) -> int: ...

    async def aclose(self) -> None: ...


E = TypeVar("E", bound=Cacheable)


class ModelCache(Generic[E]):
    """An LRU of loaded models; concurrent requests for a model that is loading share that one load."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, E] = OrderedDict()
        self._loading: dict[str, asyncio.Future[E]] = {}
        self._closers: set[asyncio.Task] = set()

    @property
    def used_bytes(self) -> int:
        """Bytes held by the loaded models."""
        return sum(entry.size_bytes for entry in self._entries.values())

    def loaded(self) -> list[tuple[str, E]]:
        """The loaded models, most recently used first."""
        return list(reversed(self._entries.items()))

    async def get(self, key: str, load: Callable[[], Awaitable[E]]) -> E:
        """The model under `key`, loading it with `load()` on a miss and evicting others to make room."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key, load))
            self._loading[key] = pending
        # shield: one caller giving up must not cancel a load that others wait on.
        return await asyncio.shield(pending)

    async def aclose(self) -> None:
        """Unload every model."""
        entries = list(self._entries.values())
        self._entries.clear()
        MODEL_CACHE_BYTES.set(0)
        await asyncio.gather(*(entry.aclose() for entry in entries), *self._closers)

    async def _load(self, key: str, load: Callable[[], Awaitable[E]]) -> E:
        try:
            entry = await load()
        finally:
            del self._loading[key]
        self._entries[key] = entry
        self._evict(keep=key)
        return entry

    def _evict(self, *, keep: str) -> None:
        while self.used_bytes > self.capacity_bytes and len(self._entries) > 1:
            key = next(k for k in self._entries if k != keep)
            entry = self._entries.pop(key)
            MODEL_CACHE_EVICTIONS.inc()
            log.info("unloading model %s (%.1f MB) to stay under %.1f MB",
                     key, entry.size_bytes / 1e6, self.capacity_bytes / 1e6)
            # Its queued questions are still answered: closing drains them in the background.
            closer = asyncio.ensure_future(entry.aclose())
            self._closers.add(closer)
            closer.add_done_callback(self._closers.discard)
        MODEL_CACHE_BYTES.set(self.used_bytes)
        if self.used_bytes > self.capacity_bytes:
            log.warning("model %s alone (%.1f MB) exceeds the serving cache of %.1f MB; kept loaded",
                        keep, self.used_bytes / 1e6, self.capacity_bytes / 1e6)
