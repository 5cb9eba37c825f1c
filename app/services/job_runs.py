"""A job's life as its worker sees it: claim, report progress, events and metrics, and finish."""

import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import FINISHED_STATUSES, Dataset, Job, JobDataset, JobEvent, Metric

log = logging.getLogger(__name__)


def claim_job(session: Session, *, job_id: str) -> Job | None:
    """Mark the job running and return it; None when it must not run (finished, cancelled or unknown).

    A job already `running` is returned as is: its task was redelivered and resumes from checkpoints.
    A job asked to cancel before it ran ends `cancelled` here.
    """
    job = session.get(Job, job_id)
    if job is None:
        log.warning("job %s: no such job, task dropped", job_id)
        return None
    if job.status in FINISHED_STATUSES:
        log.info("job %s: already %s, nothing to do", job_id, job.status)
        return None
    if job.cancel_requested:
        finish_job(session, job_id=job_id, status="cancelled", message="cancelled before it ran")
        return None
    now = utcnow()
    message = "started" if job.status == "queued" else "restarted after an interruption"
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="running", started_at=now, updated_at=now)
    )
    session.add(JobEvent(job_id=job_id, stage="prepare", message=message))
    session.commit()
    session.refresh(job)
    if job.status != "running":
        # Cancelled between our read and our write.
        return None
    return job


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
) -> None:
    """Store where the job stands and new curve points (stage, step, name, value); commits."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(stage=stage, progress=min(max(progress, 0.0), 1.0), updated_at=utcnow())
    )
    session.add_all(Metric(job_id=job_id, stage=s, step=step, name=n, value=v) for s, step, n, v in points)
    session.commit()


def add_event(session: Session, *, job_id: str, stage: str, message: str, level: str = "info") -> None:
    """Append a milestone to the job's events; commits."""
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
) -> None:
    """End the job with `status` (succeeded, failed or cancelled), its error or report; commits."""
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now}
    if status == "succeeded":
        values.update(progress=1.0, report=report)
    if error_code:
        values.update(error_code=error_code, error_message=message, error_param=error_param)
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    level = "error" if status == "failed" else "info"
    session.add(JobEvent(job_id=job_id, stage="finish", level=level, message=f"{status}: {message}"))
    session.commit()
