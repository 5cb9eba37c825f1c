"""A job's life as its worker sees it: claim a lease, renew it, report progress and events, and finish.

A running job holds a lease: `lease_owner` runs it until `lease_expires_at`, and its worker renews the lease
every third of its length. Each claim adds one to `lease_epoch`, and every write of a worker first checks,
in the same transaction, that the job's epoch is still its own (`fence`): a worker that lost its lease
(stalled past its expiry while another took the job over) can no longer change the job. On PostgreSQL the
check also locks the job's row until the write commits, so a takeover waits for it; SQLite has one writer.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import FINISHED_STATUSES, Dataset, Job, JobDataset, JobEvent, JobLease, Metric

log = logging.getLogger(__name__)

UNFINISHED = ("queued", "running", "cancelling")
RESTARTED = "restarted after an interruption"


class LeaseLost(Exception):
    """Another worker holds the job now (or it ended): this worker must stop writing."""


@dataclass(frozen=True)
class Lease:
    """A worker's right to run one job: valid while the job's lease_epoch and lease_owner are these."""

    job_id: str
    epoch: int
    worker: str


def lease_expired(now: datetime) -> ColumnElement[bool]:
    """The condition of a job whose lease is over (or that never had one)."""
    return or_(Job.lease_owner.is_(None), Job.lease_expires_at.is_(None), Job.lease_expires_at < now)


def claim_job(
    session: Session, *, job_id: str, worker: str, lease_s: float, max_takeovers: int
) -> tuple[Job, Lease] | None:
    """Take the job's lease and mark it running; None when it must not run here.

    Not run: a finished or unknown job, one whose lease another worker holds (a duplicate delivery), one
    asked to cancel (it ends `cancelled` here), and one taken over more than `max_takeovers` times after
    lost workers (it ends `failed` with `worker_lost`). A job that held a lease before resumes from its
    checkpoints: a takeover.
    """
    job = session.get(Job, job_id)
    if job is None:
        log.warning("job %s: no such job, task dropped", job_id)
        return None
    if job.status in FINISHED_STATUSES:
        log.info("job %s: already %s, nothing to do", job_id, job.status)
        return None
    now = utcnow()
    if job.lease_owner is not None and job.lease_expires_at is not None and job.lease_expires_at > now:
        log.info("job %s: leased by %s until %s, this delivery is a duplicate", job_id, job.lease_owner,
                 job.lease_expires_at.isoformat())  # fmt: skip
        return None
    taken_over = job.lease_epoch > 0 or job.status != "queued"
    epoch, takeovers = job.lease_epoch + 1, job.takeovers + int(taken_over)
    expires = now + timedelta(seconds=lease_s)
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_epoch == job.lease_epoch, Job.status.in_(UNFINISHED))
        .values(lease_epoch=epoch, lease_owner=worker, lease_expires_at=expires, takeovers=takeovers, updated_at=now)
    )
    if taken.rowcount != 1:
        session.rollback()
        log.info("job %s: another worker claimed it first", job_id)
        return None
    session.add(JobLease(job_id=job_id, epoch=epoch, worker=worker, acquired_at=now, expires_at=expires))
    session.commit()
    session.refresh(job)
    lease = Lease(job_id, epoch, worker)
    if job.cancel_requested:
        message = "cancelled after its worker was lost" if taken_over else "cancelled before it ran"
        finish_job(session, lease=lease, job_id=job_id, status="cancelled", message=message)
        return None
    if takeovers > max_takeovers:
        message = f"its worker was lost {takeovers} times (at most {max_takeovers} takeovers)"
        finish_job(session, lease=lease, job_id=job_id, status="failed", message=message, error_code="worker_lost")
        return None
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued").values(status="running", started_at=now)
    )
    message = f"{RESTARTED} (takeover {takeovers} of at most {max_takeovers})" if taken_over else "started"
    session.add(JobEvent(job_id=job_id, stage=job.stage or "prepare", message=message))
    session.commit()
    session.refresh(job)
    return job, lease


def fence(session: Session, lease: Lease | None) -> None:
    """Raise LeaseLost unless `lease` still holds its job; locks the job's row until the caller commits.

    None skips the check (a caller outside any worker, such as a test or an operator's script).
    """
    if lease is None:
        return
    held = session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_epoch == lease.epoch, Job.lease_owner == lease.worker)
        .values(updated_at=utcnow())
    )
    if held.rowcount != 1:
        session.rollback()
        raise LeaseLost(f"job {lease.job_id}: lease {lease.epoch} of {lease.worker} is no longer held")


def renew_lease(session: Session, *, lease: Lease, lease_s: float) -> None:
    """Push the lease's expiry `lease_s` seconds ahead; LeaseLost when it is no longer this worker's."""
    fence(session, lease)
    expires = utcnow() + timedelta(seconds=lease_s)
    session.execute(update(Job).where(Job.id == lease.job_id).values(lease_expires_at=expires))
    session.execute(
        update(JobLease)
        .where(JobLease.job_id == lease.job_id, JobLease.epoch == lease.epoch)
        .values(expires_at=expires)
    )
    session.commit()


def job_datasets(session: Session, *, job_id: str) -> dict[str, Dataset]:
    """The datasets a job reads, by role (train, eval, unlabeled)."""
    rows = session.execute(
        select(JobDataset.role, Dataset)
        .join(Dataset, Dataset.id == JobDataset.dataset_id)
        .where(JobDataset.job_id == job_id)
    )
    return {role: dataset for role, dataset in rows}


def record_progress(
    session: Session,
    *,
    job_id: str,
    stage: str,
    progress: float,
    points: Iterable[tuple[str, int, str, float]] = (),
    lease: Lease | None = None,
) -> None:
    """Store where the job stands and new curve points (stage, step, name, value); commits."""
    fence(session, lease)
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(stage=stage, progress=min(max(progress, 0.0), 1.0), updated_at=utcnow())
    )
    session.add_all(Metric(job_id=job_id, stage=s, step=step, name=n, value=v) for s, step, n, v in points)
    session.commit()


def add_event(
    session: Session, *, job_id: str, stage: str, message: str, level: str = "info", lease: Lease | None = None
) -> None:
    """Append a milestone to the job's events; commits."""
    fence(session, lease)
    session.add(JobEvent(job_id=job_id, stage=stage, level=level, message=message))
    session.commit()


def cancel_requested(session: Session, *, job_id: str) -> bool:
    """Whether someone asked the job to stop."""
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish_job(
    session: Session,
    *,
    job_id: str,
    status: str,
    message: str,
    error_code: str | None = None,
    error_param: str | None = None,
    report: dict[str, Any] | None = None,
    lease: Lease | None = None,
) -> None:
    """End the job with `status` (succeeded, failed or cancelled), its error or report, and free its lease."""
    fence(session, lease)
    _end(session, job_id=job_id, status=status, message=message, error_code=error_code, error_param=error_param,
         report=report)  # fmt: skip
    if lease is not None:
        # A lease that ends with its job is released; one whose worker was lost keeps released_at null.
        session.execute(
            update(JobLease)
            .where(JobLease.job_id == job_id, JobLease.epoch == lease.epoch)
            .values(released_at=utcnow())
        )
    session.commit()


def end_abandoned_job(
    session: Session,
    *,
    job: Job,
    status: str,
    message: str,
    error_code: str | None = None,
) -> bool:
    """End a job whose lease expired with no worker to take it (cancelled, or lost too often); commits.

    False, changing nothing, when the job moved meanwhile (a worker renewed or took its lease, or it ended).
    """
    now = utcnow()
    still = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.lease_epoch == job.lease_epoch, Job.status.in_(UNFINISHED), lease_expired(now))
        .values(updated_at=now)
    )
    if still.rowcount != 1:
        session.rollback()
        return False
    _end(session, job_id=job.id, status=status, message=message, error_code=error_code)
    session.commit()
    log.info("job %s %s: %s", job.id, status, message)
    return True


def _end(
    session: Session,
    *,
    job_id: str,
    status: str,
    message: str,
    error_code: str | None = None,
    error_param: str | None = None,
    report: dict[str, Any] | None = None,
) -> None:
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if status == "succeeded":
        values.update(progress=1.0, report=report)
    if error_code:
        values.update(error_code=error_code, error_message=message, error_param=error_param)
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    level = "error" if status == "failed" else "info"
    session.add(JobEvent(job_id=job_id, stage="finish", level=level, message=f"{status}: {message}"))
