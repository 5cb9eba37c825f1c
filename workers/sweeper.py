"""The reconciliation loop of a worker process: report this worker alive and repair stranded jobs.

It runs as a thread of the worker's main process (not of a pool process, which may be busy training), every
quarter of a lease period, so that a job whose worker died is sent again within two lease periods of its
last heartbeat. Every worker runs one; a conditional update elects which of them sends a given job again.
"""

import logging
import os
import socket
import threading
from pathlib import Path

from celery import Celery

from app.db.session import session_scope
from app.services.queue import enqueue_job
from app.services.reconcile import record_worker, sweep_jobs
from app.settings import Settings
from app.storage import ArtifactStore
from workers.workspace import discard_snapshots

log = logging.getLogger(__name__)


def has_gpu() -> bool:
    """Whether this host shows this process an NVIDIA GPU (read from the driver, without importing torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


class Sweeper:
    """A daemon thread running `sweep_once` every `settings.lease_s / 4` seconds until stopped."""

    def __init__(self, celery: Celery, settings: Settings) -> None:
        self.celery, self.settings = celery, settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.gpu = has_gpu()
        self.store = ArtifactStore(settings.artifacts_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        """Start sweeping."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current sweep."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                self.sweep_once()
            except Exception as exc:
                # A database or broker that is down now is retried at the next round.
                log.warning("reconciliation failed, retrying in %.1f s: %s", self.settings.lease_s / 4, exc)
            if self._stop.wait(self.settings.lease_s / 4):
                return

    def sweep_once(self) -> None:
        """One round: note this worker alive, then send again or end the jobs that need it."""
        s = self.settings
        with session_scope(s.database_url) as session:
            record_worker(session, name=self.name, gpu=self.gpu)
            sweep = sweep_jobs(
                session, lease_s=s.lease_s, max_takeovers=s.max_takeovers, requeue_after_s=s.requeue_after_s
            )
        for job_id in sweep.resend:
            enqueue_job(self.celery, job_id)
        for tenant_id, job_id in sweep.ended:
            discard_snapshots(self.store, tenant_id=tenant_id, job_id=job_id)
