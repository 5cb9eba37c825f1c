"""Compare the database with what should be happening, and repair it: the workers' periodic sweep.

The database decides, never the broker's redelivery timers: a running job whose lease expired is sent again
(the worker that takes it resumes from the checkpoints), a queued job whose message the broker may have lost
is sent again, and a job asked to cancel whose worker is gone ends `cancelled`. Sending twice is harmless:
a task finds the job finished or leased elsewhere and returns.
"""

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job, WorkerBeat
from app.services.job_runs import QUEUE_HOLDER, end_abandoned_job, lease_abandoned

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    """What one sweep found: jobs to send again, and jobs it ended (whose stored checkpoints can go)."""

    resend: list[str] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)
    """(tenant id, job id) of each job the sweep brought to a final status."""


def sweep_jobs(session: Session, *, lease_s: float, max_takeovers: int, requeue_after_s: float) -> Sweep:
    """Repair jobs stranded by a lost worker or a lost broker message; commits each change on its own."""
    sweep = Sweep()
    now = utcnow()
    stranded = session.scalars(select(Job).where(Job.status.in_(("running", "cancelling")), lease_abandoned(now)))
    for job in list(stranded):
        if job.cancel_requested:
            ended = end_abandoned_job(session, job=job, status="cancelled", message="stopped; its worker was lost")
        elif job.takeovers >= max_takeovers and job.lease_owner != QUEUE_HOLDER:
            message = f"its worker was lost {job.takeovers + 1} times (at most {max_takeovers} takeovers)"
            ended = end_abandoned_job(session, job=job, status="failed", message=message, error_code="worker_lost")
        else:
            # At most once a lease period, and by one sweeper: the conditional update elects it.
            ended = False
            if _mark_sent(session, job_id=job.id, status=job.status, before=now - timedelta(seconds=lease_s)):
                log.info("job %s: lease of %s expired, sending it again to be taken over", job.id, job.lease_owner)
                sweep.resend.append(job.id)
        if ended:
            sweep.ended.append((job.tenant_id, job.id))
    before = now - timedelta(seconds=requeue_after_s)
    waiting = session.scalars(select(Job.id).where(Job.status == "queued", Job.enqueued_at < before))
    for job_id in list(waiting):
        if _mark_sent(session, job_id=job_id, status="queued", before=before):
            log.info("job %s: queued for over %.0f s, sending it again in case the broker lost it", job_id,
                     requeue_after_s)  # fmt: skip
            sweep.resend.append(job_id)
    return sweep


def _mark_sent(session: Session, *, job_id: str, status: str, before: object) -> bool:
    sent = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status, or_(Job.enqueued_at.is_(None), Job.enqueued_at < before))
        .values(enqueued_at=utcnow())
    )
    session.commit()
    return sent.rowcount == 1


def record_worker(session: Session, *, name: str, gpu: bool) -> None:
    """Note that worker `name` is alive (and whether it has a GPU); commits."""
    row = session.get(WorkerBeat, name)
    if row is None:
        session.add(WorkerBeat(name=name, gpu=gpu, last_seen=utcnow()))
    else:
        row.gpu, row.last_seen = gpu, utcnow()
    session.commit()


def gpu_worker_alive(session: Session, *, within_s: float) -> bool:
    """Whether a worker with a GPU reported in the last `within_s` seconds."""
    since = utcnow() - timedelta(seconds=within_s)
    alive = select(WorkerBeat.name).where(WorkerBeat.gpu, WorkerBeat.last_seen >= since).limit(1)
    return session.scalar(alive) is not None
