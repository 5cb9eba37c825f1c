"""The reconciliation loop of a worker process: report this worker alive and repair stranded jobs.

It runs as a thread of the worker's main process (not of a pool process, which may be busy training), every
quarter of a lease period, so that a job whose worker died is sent again within two lease periods of its
last heartbeat. Every worker runs one; a conditional update elects which of them sends a given job again.
"""

import logging
import os
import socket
import threading
from collections.abc import Sequence

from celery import Celery

from app.db.session import session_scope
from app.services.queue import enqueue_job
from app.services.reconcile import record_worker, sweep_jobs
from app.services.routing import has_gpu
from app.settings import Settings
from app.storage import ArtifactStore
from workers.workspace import discard_snapshots

log = logging.getLogger(__name__)


class Sweeper:
    """A daemon thread running `sweep_once` every `settings.lease_s / 4` seconds until stopped; `queues` are
    the ones this worker consumes, reported with its heartbeat so that jobs are routed where a worker is."""

    def __init__(self, celery: Celery, settings: Settings, queues: Sequence[str]) -> None:
        self.celery, self.settings, self.queues = celery, settings, list(queues)
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
            record_worker(session, name=self.name, gpu=self.gpu, queues=self.queues)
            sweep = sweep_jobs(
                session, lease_s=s.lease_s, max_takeovers=s.max_takeovers, requeue_after_s=s.requeue_after_s
            )
        for job_id, queue in sweep.resend:
            enqueue_job(self.celery, job_id, queue)
        for tenant_id, job_id in sweep.ended:
            discard_snapshots(self.store, tenant_id=tenant_id, job_id=job_id)
