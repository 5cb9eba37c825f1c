"""Compare the database with what should be happening, and repair it: the workers' periodic sweep.

The database decides, never the broker's redelivery timers: a running job whose lease expired is sent again
(the worker that takes it resumes from the checkpoints), a queued job whose message the broker may have lost
is sent again, and a job asked to cancel whose worker is gone ends `cancelled`. Sending twice is harmless:
a task finds the job finished or leased elsewhere and returns. Each job is sent to the queue its device needs
(app/services/routing.py), and a queued job no live worker can take is marked waiting.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job, WorkerBeat
from app.services.job_runs import QUEUE_HOLDER, end_abandoned_job, lease_abandoned
from app.services.routing import live_workers, note_availability, route_job

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    """What one sweep found: jobs to send again, and jobs it ended (whose stored checkpoints can go)."""

    resend: list[tuple[str, str]] = field(default_factory=list)
    """(job id, queue) of each job to send again."""
    ended: list[tuple[str, str]] = field(default_factory=list)
    """(tenant id, job id) of each job the sweep brought to a final status."""


def sweep_jobs(session: Session, *, lease_s: float, max_takeovers: int, requeue_after_s: float) -> Sweep:
    """Repair jobs stranded by a lost worker or a lost broker message; commits each change on its own."""
    sweep = Sweep()
    now = utcnow()
    live = live_workers(session, lease_s=lease_s)
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
                queue = route_job(session, job, live)
                session.commit()
                sweep.resend.append((job.id, queue))
        if ended:
            sweep.ended.append((job.tenant_id, job.id))
    before = now - timedelta(seconds=requeue_after_s)
    queued = select(Job).where(Job.status == "queued").execution_options(populate_existing=True)
    for job in list(session.scalars(queued)):
        previous = job.queue
        queue = route_job(session, job, live)
        if queue != previous:
            session.commit()
        # An `auto` job whose queue lost its workers (or gained a GPU worker) moves at once.
        moved = previous is not None and queue != previous
        stale = job.enqueued_at is not None and job.enqueued_at < before
        if (moved or stale) and _mark_sent(session, job_id=job.id, status="queued", before=now if moved else before):
            if moved:
                log.info("job %s: moved from queue %s to %s", job.id, previous, queue)
            else:
                log.info("job %s: queued for over %.0f s, sending it again in case the broker lost it", job.id,
                         requeue_after_s)  # fmt: skip
            sweep.resend.append((job.id, queue))
        note_availability(session, job, live)
    return sweep


def _mark_sent(session: Session, *, job_id: str, status: str, before: object) -> bool:
    sent = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status, or_(Job.enqueued_at.is_(None), Job.enqueued_at < before))
        .values(enqueued_at=utcnow())
    )
    session.commit()
    return sent.rowcount == 1


def record_worker(session: Session, *, name: str, gpu: bool, queues: Sequence[str]) -> None:
    """Note that worker `name` is alive, whether it has a GPU and which queues it consumes; commits."""
    consumed = ",".join(queues)
    row = session.get(WorkerBeat, name)
    if row is None:
        session.add(WorkerBeat(name=name, gpu=gpu, queues=consumed, last_seen=utcnow()))
    else:
        row.gpu, row.queues, row.last_seen = gpu, consumed, utcnow()
    session.commit()


def last_heartbeat(session: Session, *, host: str) -> datetime | None:
    """The latest heartbeat of a worker process on `host` (worker names are host:pid), or None."""
    since = select(func.max(WorkerBeat.last_seen)).where(WorkerBeat.name.startswith(f"{host}:", autoescape=True))
    return session.scalar(since)
