"""A job's working folder, mirrored to the artifact store so that any worker on any host resumes it.

The pipeline writes checkpoints and stage outputs to a local folder. Every so often, between two training
steps (never while a checkpoint is half written), the folder is copied whole to the store as a new snapshot
`<key>/snap-<epoch>-<n>/`, then `<key>/CURRENT` is pointed at it and the older snapshot removed: a reader
sees one whole snapshot or the previous one. A worker that takes the job over starts from CURRENT. The
snapshots are deleted when the job reaches a final status.
"""

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from app.storage import ArtifactStore

log = logging.getLogger(__name__)

CURRENT = "CURRENT"


def workspace_key(tenant_id: str, job_id: str) -> str:
    """The store key under which a job's snapshots live."""
    return f"{tenant_id}/jobs/{job_id}/work"


def teacher_key(tenant_id: str, job_id: str, teacher: str) -> str:
    """The store key of the snapshots of one teacher's task (its checkpoints, then its trained folder)."""
    return f"{tenant_id}/jobs/{job_id}/teachers/{teacher}"


def folder_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Each file's (relative path, size, mtime): changes whenever the pipeline writes something."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return tuple(sorted((str(p.relative_to(folder)), s.st_size, s.st_mtime_ns) for p in files for s in [p.stat()]))


class Workspace:
    """The local folder of one run of a job (one lease), restored from and copied to the store."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        key: str,
        local: Path,
        epoch: int,
        every_s: float,
        still_leased: Callable[[], None],
    ) -> None:
        self.store, self.key, self.local, self.epoch, self.every_s = store, key, local, epoch, every_s
        self.still_leased = still_leased
        self.count = 0
        self.last_sync = time.monotonic()
        self.last_fingerprint: tuple[tuple[str, int, int], ...] = ()

    def restore(self) -> bool:
        """Start from the store's latest snapshot, if there is one (a takeover); whether there was."""
        shutil.rmtree(self.local, ignore_errors=True)
        current = self.store.read_text(self.store.uri(f"{self.key}/{CURRENT}"))
        if current is None:
            self.local.mkdir(parents=True, exist_ok=True)
            return False
        self.store.get_dir(self.store.uri(f"{self.key}/{current.strip()}"), self.local)
        self.last_fingerprint = folder_fingerprint(self.local)
        log.info("restored %s from snapshot %s", self.local, current.strip())
        return True

    def maybe_sync(self) -> None:
        """Copy the folder to the store when `every_s` seconds passed since the last copy and it changed."""
        if time.monotonic() - self.last_sync >= self.every_s:
            self.sync()

    def sync(self) -> None:
        """Copy the folder to the store as a new snapshot, if it changed; raises when the lease is lost."""
        self.last_sync = time.monotonic()
        fingerprint = folder_fingerprint(self.local)
        if fingerprint == self.last_fingerprint:
            return
        self.still_leased()
        self.count += 1
        name = f"snap-{self.epoch:04d}-{self.count:06d}"
        self.store.put_dir(self.local, f"{self.key}/{name}")
        # A worker that lost the job must not point CURRENT at its own snapshot (the new holder's would be lost),
        # nor leave it behind: the job may have ended and had its snapshots deleted while this one was copied.
        try:
            self.still_leased()
        except BaseException:
            self.store.delete(self.store.uri(f"{self.key}/{name}"))
            raise
        self.store.put_text(name, f"{self.key}/{CURRENT}")
        self.last_fingerprint = fingerprint
        for old in self.store.list_names(self.store.uri(self.key)):
            if old.startswith("snap-") and old != name and not old.endswith(".partial"):
                self.store.delete(self.store.uri(f"{self.key}/{old}"))

    def discard_local(self) -> None:
        """Remove the local folder (the store keeps what a later run needs)."""
        shutil.rmtree(self.local, ignore_errors=True)


def discard_snapshots(store: ArtifactStore, *, tenant_id: str, job_id: str) -> None:
    """Delete a finished job's snapshots, its teachers' included, from the store."""
    store.delete(store.uri(f"{tenant_id}/jobs/{job_id}"))
