"""A job's life as its worker sees it: claim a lease, renew it, report progress and events, and finish.

A running job holds a lease: `lease_owner` runs it until `lease_expires_at`, and its worker renews the lease
every third of its length. Each claim adds one to `lease_epoch`, and every write of a worker first checks,
in the same transaction, that the job's epoch is still its own (`fence`): a worker that lost its lease
(stalled past its expiry while another took the job over) can no longer change the job. On PostgreSQL the
check also locks the job's row until the write commits, so a takeover waits for it; SQLite has one writer.

A run may fan out: its teachers train as tasks of their own, on several workers at once. Each such task holds
a task lease (`job_tasks`) inside the run's epoch, and while it runs it also keeps the job's lease alive
(the job's `lease_owner` is then the last of them to renew). Between two steps of the run, while its next
tasks wait in the broker, the job's lease is held by QUEUE_HOLDER for a while: if none of them starts by then
(the broker lost them), the reconciliation sweep sends the job again, and that is not counted as a takeover.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import FINISHED_STATUSES, Dataset, Job, JobDataset, JobEvent, JobLease, JobTask, Metric
from app.services.routing import WAITING_STAGES

log = logging.getLogger(__name__)

UNFINISHED = ("queued", "running", "cancelling")
RESTARTED = "restarted after an interruption"
QUEUE_HOLDER = "queue"
"""The job lease's owner while the run's next tasks wait in the broker (no worker runs the job then)."""


class LeaseLost(Exception):
    """Another worker holds the job now (or it ended): this worker must stop writing."""


@dataclass(frozen=True)
class Lease:
    """A worker's right to run one job: valid while the job's lease_epoch and lease_owner are these."""

    job_id: str
    epoch: int
    worker: str
    task: str | None = None
    """The task (a teacher's training) this lease covers, run beside others in the epoch; None: the run itself."""


def lease_expired(now: datetime) -> ColumnElement[bool]:
    """The condition of a job whose lease is over (or that never had one)."""
    return or_(Job.lease_owner.is_(None), Job.lease_expires_at.is_(None), Job.lease_expires_at < now)


def lease_abandoned(now: datetime) -> ColumnElement[bool]:
    """A job no worker runs: its lease is over, or it waits in the broker between tasks and was cancelled."""
    return or_(lease_expired(now), and_(Job.lease_owner == QUEUE_HOLDER, Job.cancel_requested))


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
    # Tasks lost by the broker between two steps of a run are no lost worker: no takeover to count, unless a
    # task of the run started and never finished (its worker was lost while another task kept the lease).
    unfinished = select(JobTask.task).where(
        JobTask.job_id == job_id, JobTask.epoch == job.lease_epoch, JobTask.finished_at.is_(None)
    )
    requeued = job.lease_owner == QUEUE_HOLDER and session.scalar(unfinished.limit(1)) is None
    taken_over = (job.lease_epoch > 0 or job.status != "queued") and not requeued
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
    if job.stage in WAITING_STAGES:
        job.stage = None  # a worker took it after all: it waits no more
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued").values(status="running", started_at=now)
    )
    if requeued:
        message = f"{RESTARTED}: its next tasks were not picked up (sent again)"
    elif taken_over:
        message = f"{RESTARTED} (takeover {takeovers} of at most {max_takeovers})"
    else:
        message = "started"
    session.add(JobEvent(job_id=job_id, stage=job.stage or "prepare", message=message))
    session.commit()
    session.refresh(job)
    return job, lease


def fence(session: Session, lease: Lease | None) -> None:
    """Raise LeaseLost unless `lease` still holds its job; locks the job's row until the caller commits.

    A task lease holds while its run (epoch) is the job's current one and the task is still its own.
    None skips the check (a caller outside any worker, such as a test or an operator's script).
    """
    if lease is None:
        return
    if lease.task is None:
        held = session.execute(
            update(Job)
            .where(Job.id == lease.job_id, Job.lease_epoch == lease.epoch, Job.lease_owner == lease.worker)
            .values(updated_at=utcnow())
        ).rowcount
    else:
        held = session.execute(
            update(Job)
            .where(Job.id == lease.job_id, Job.lease_epoch == lease.epoch, Job.status.in_(UNFINISHED))
            .values(updated_at=utcnow())
        ).rowcount and session.scalar(select(func.count()).select_from(JobTask).where(*_own_task(lease)))
    if held != 1:
        session.rollback()
        raise LeaseLost(f"job {lease.job_id}: lease {lease.epoch} of {lease.worker} is no longer held")


def renew_lease(session: Session, *, lease: Lease, lease_s: float) -> None:
    """Push the lease's expiry `lease_s` seconds ahead; LeaseLost when it is no longer this worker's.

    A task's renewal also keeps its run's job lease alive, naming this worker as its owner.
    """
    fence(session, lease)
    expires = utcnow() + timedelta(seconds=lease_s)
    job_lease = {"lease_expires_at": expires} | ({"lease_owner": lease.worker} if lease.task else {})
    session.execute(update(Job).where(Job.id == lease.job_id).values(**job_lease))
    session.execute(
        update(JobLease)
        .where(JobLease.job_id == lease.job_id, JobLease.epoch == lease.epoch)
        .values(expires_at=expires)
    )
    if lease.task is not None:
        session.execute(update(JobTask).where(*_own_task(lease)).values(expires_at=expires))
    session.commit()


def _own_task(lease: Lease) -> tuple[ColumnElement[bool], ...]:
    return (
        JobTask.job_id == lease.job_id,
        JobTask.task == lease.task,
        JobTask.epoch == lease.epoch,
        JobTask.worker == lease.worker,
        JobTask.finished_at.is_(None),
    )


def _set_job_lease(session: Session, *, job_id: str, epoch: int, owner: str, expires: datetime) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(lease_owner=owner, lease_expires_at=expires))
    session.execute(
        update(JobLease).where(JobLease.job_id == job_id, JobLease.epoch == epoch).values(expires_at=expires)
    )


def hand_to_queue(session: Session, *, lease: Lease, hold_s: float) -> None:
    """Leave the run's lease to its next tasks, waiting in the broker, for `hold_s` seconds; commits."""
    fence(session, lease)
    expires = utcnow() + timedelta(seconds=hold_s)
    _set_job_lease(session, job_id=lease.job_id, epoch=lease.epoch, owner=QUEUE_HOLDER, expires=expires)
    session.commit()


def claim_task(
    session: Session, *, job_id: str, epoch: int, task: str, worker: str, lease_s: float
) -> tuple[Job, Lease] | None:
    """Take task `task` of run `epoch` of the job; None when it must not run here.

    Not run: a job that ended or moved on to another run, or a task this run already took (a duplicate
    delivery). A task of an older run (its worker lost) is taken over; the job's lease is kept alive by this
    worker from now on.
    """
    now = utcnow()
    job = session.get(Job, job_id)
    if job is None or job.status not in UNFINISHED or job.lease_epoch != epoch:
        return None
    expires = now + timedelta(seconds=lease_s)
    row = session.get(JobTask, (job_id, task))
    if row is None:
        session.add(JobTask(job_id=job_id, task=task, epoch=epoch, worker=worker, expires_at=expires))
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            return None
    else:
        if row.epoch == epoch:
            # Done, running elsewhere, or lost with its worker: then its lease lapses with the job's, and the
            # next run takes the task over, counted as a takeover (a task that kills its worker stops there).
            log.info("job %s: task %s already taken in run %d", job_id, task, epoch)
            return None
        taken = session.execute(
            update(JobTask)
            .where(
                JobTask.job_id == job_id, JobTask.task == task, JobTask.epoch == row.epoch, JobTask.worker == row.worker
            )
            .values(epoch=epoch, worker=worker, expires_at=expires, finished_at=None)
        )
        if taken.rowcount != 1:
            session.rollback()
            return None
    joined = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_epoch == epoch, Job.status.in_(UNFINISHED))
        .values(lease_owner=worker, lease_expires_at=expires, updated_at=now)
    )
    if joined.rowcount != 1:
        session.rollback()
        return None
    session.commit()
    session.refresh(job)
    return job, Lease(job_id, epoch, worker, task)


def finish_task(session: Session, *, lease: Lease, tasks: Iterable[str], hold_s: float) -> bool:
    """Mark the task done for its run and hand the job's lease to the queue; commits. Whether every one of
    `tasks` is now done in this run (then the run's next step is due)."""
    fence(session, lease)
    session.execute(update(JobTask).where(*_own_task(lease)).values(finished_at=utcnow()))
    # Another task of the run may still be running and renewing the job's lease: then it keeps it.
    if session.scalar(select(Job.lease_owner).where(Job.id == lease.job_id)) == lease.worker:
        expires = utcnow() + timedelta(seconds=hold_s)
        _set_job_lease(session, job_id=lease.job_id, epoch=lease.epoch, owner=QUEUE_HOLDER, expires=expires)
    session.commit()
    wanted = list(tasks)
    done = session.scalar(
        select(func.count())
        .select_from(JobTask)
        .where(
            JobTask.job_id == lease.job_id,
            JobTask.epoch == lease.epoch,
            JobTask.finished_at.is_not(None),
            JobTask.task.in_(wanted),
        )
    )
    return done == len(wanted)


def take_from_queue(session: Session, *, job_id: str, epoch: int, worker: str, lease_s: float) -> Lease | None:
    """Take the run's lease back from the queue for its next step (run alone); None when it must not run here
    (another run took over, the job ended, or a duplicate of this step holds it)."""
    now = utcnow()
    expires = now + timedelta(seconds=lease_s)
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_epoch == epoch, Job.status.in_(UNFINISHED), Job.lease_owner == QUEUE_HOLDER)
        .values(lease_owner=worker, lease_expires_at=expires, updated_at=now)
    )
    if taken.rowcount != 1:
        session.rollback()
        return None
    session.execute(
        update(JobLease).where(JobLease.job_id == job_id, JobLease.epoch == epoch).values(expires_at=expires)
    )
    session.commit()
    return Lease(job_id, epoch, worker)


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
    """Store where the job stands and new curve points (stage, step, name, value); commits.

    Progress never goes back: tasks of one job running side by side each report their own.
    """
    fence(session, lease)
    fraction = min(max(progress, 0.0), 1.0)
    ahead = case((Job.progress < fraction, fraction), else_=Job.progress)
    session.execute(update(Job).where(Job.id == job_id).values(stage=stage, progress=ahead, updated_at=utcnow()))
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
        .where(Job.id == job.id, Job.lease_epoch == job.lease_epoch, Job.status.in_(UNFINISHED), lease_abandoned(now))
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
