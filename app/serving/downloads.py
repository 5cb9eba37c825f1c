"""The API's local copies of model folders kept in a remote artifact store (S3): bounded in bytes on disk,
least recently used evicted. A local store needs none: its folders are read where they are."""

import hashlib
import logging
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from app.serving.metrics import DOWNLOAD_CACHE_BYTES, DOWNLOAD_EVICTIONS
from app.storage import ArtifactStore

log = logging.getLogger(__name__)

PARTIAL = ".partial"


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class DownloadCache:
    """Model folders fetched from `store` into `folder`, at most `capacity_bytes` of them on disk (the one just
    fetched is kept even when it alone is larger). Thread-safe; copies left by an earlier process are reused."""

    def __init__(self, store: ArtifactStore, folder: Path, capacity_bytes: int) -> None:
        self.store, self.folder, self.capacity_bytes = store, folder, capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        if not store.is_local:
            self._adopt_existing()

    @property
    def used_bytes(self) -> int:
        """Bytes of the copies on disk."""
        return sum(self._entries.values())

    def fetch(self, uri: str) -> Path:
        """A local folder holding the stored folder `uri`: downloaded on a miss, evicting others to make room."""
        if self.store.is_local:
            return self.store.local_dir(uri, self.folder)
        name = hashlib.sha256(uri.encode()).hexdigest()[:32]
        target = self.folder / name
        with self._lock:
            if name in self._entries and target.is_dir():
                self._entries.move_to_end(name)
                os.utime(target)  # the order survives a restart
                return target
            staging = self.folder / f"{name}{PARTIAL}"
            self.store.get_dir(uri, staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)
            os.utime(target)
            self._entries[name] = folder_bytes(target)
            self._entries.move_to_end(name)
            self._evict(keep=name)
            DOWNLOAD_CACHE_BYTES.set(self.used_bytes)
            return target

    def _evict(self, *, keep: str) -> None:
        while self.used_bytes > self.capacity_bytes and len(self._entries) > 1:
            name = next(n for n in self._entries if n != keep)
            size = self._entries.pop(name)
            shutil.rmtree(self.folder / name, ignore_errors=True)
            DOWNLOAD_EVICTIONS.inc()
            log.info("removed the local copy %s (%.1f MB) to stay under %.1f MB", name, size / 1e6,
                     self.capacity_bytes / 1e6)  # fmt: skip
        if self.used_bytes > self.capacity_bytes:
            log.warning("model copy %s alone (%.1f MB) exceeds the download cache of %.1f MB; kept",
                        keep, self.used_bytes / 1e6, self.capacity_bytes / 1e6)  # fmt: skip

    def _adopt_existing(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in self.folder.iterdir():
            if not entry.is_dir():
                entry.unlink(missing_ok=True)
            elif entry.name.endswith(PARTIAL):  # a download cut short by a stop
                shutil.rmtree(entry, ignore_errors=True)
            else:
                found.append((entry.stat().st_mtime, entry.name, folder_bytes(entry)))
        for _, name, size in sorted(found):
            self._entries[name] = size
        self._evict(keep="")
        DOWNLOAD_CACHE_BYTES.set(self.used_bytes)
