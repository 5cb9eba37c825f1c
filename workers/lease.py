"""The heartbeat of a running job: a thread that renews the job's lease every third of its length.

When the lease turns out to be another worker's, or could not be renewed for a whole lease period (the
database was unreachable so long that another worker may have taken the job), `lost` is set: the job's
hooks then stop the pipeline and the runner writes nothing more.
"""

import logging
import threading
import time

from app.db.retry import is_transient
from app.db.session import session_scope
from app.services.job_runs import Lease, LeaseLost, renew_lease

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews `lease` in the background until stopped or lost."""

    def __init__(self, database_url: str, lease: Lease, lease_s: float) -> None:
        self.database_url, self.lease, self.lease_s = database_url, lease, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)
        self.last_renewed = time.monotonic()

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (the lease then expires unless the job ended and freed it)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def check(self) -> None:
        """Raise LeaseLost if the lease is lost."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.lease.job_id}: lease {self.lease.epoch} lost")

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with session_scope(self.database_url) as session:
                    renew_lease(session, lease=self.lease, lease_s=self.lease_s)
                self.last_renewed = time.monotonic()
            except LeaseLost:
                log.warning("job %s: lease %d taken by another worker; stopping", self.lease.job_id, self.lease.epoch)
                self.lost.set()
                return
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("job %s: renewing the lease failed", self.lease.job_id)
                else:
                    log.warning("job %s: database unreachable while renewing the lease: %s", self.lease.job_id,
                                type(exc).__name__)  # fmt: skip
                if time.monotonic() - self.last_renewed >= self.lease_s:
                    log.warning("job %s: lease %d not renewed for %.0f s; stopping", self.lease.job_id,
                                self.lease.epoch, self.lease_s)  # fmt: skip
                    self.lost.set()
                    return
