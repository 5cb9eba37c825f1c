"""Which broker queue a job goes to, and saying so when no live worker takes that queue.

`device: cuda` -> queue `gpu`; `cpu` -> `cpu`; `auto` -> `gpu` while a live worker with a GPU consumes it,
else `cpu`. Workers report the queues they consume with their heartbeat (table `workers`), so a queued job
whose queue no live worker consumes is marked `waiting_for_gpu_worker` (or `_cpu_`) with an event, rather
than waiting silently; an `auto` job stranded that way moves to the queue that has a worker.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job, JobEvent, WorkerBeat

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
QUEUES = (GPU_QUEUE, CPU_QUEUE)
LIVE_LEASES = 3
"""A worker counts as live while it reported within this many lease periods (it reports four times a period)."""


def has_gpu() -> bool:
    """Whether this host shows this process an NVIDIA GPU (read from the driver, without importing torch): the
    driver's list of GPUs, or (in a container, which may not see that list) a GPU's device file."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


def default_queues() -> str:
    """What `qadistill worker` consumes unless told: the queue matching this host, `gpu` with a GPU, else `cpu`."""
    return GPU_QUEUE if has_gpu() else CPU_QUEUE


def embedded_queues() -> str:
    """What the one worker of embedded mode consumes: `cpu`, and `gpu` too on a host with a GPU, so that every
    job it can run reaches it (a `cuda` job on a host without one waits, marked waiting for a GPU worker)."""
    return f"{GPU_QUEUE},{CPU_QUEUE}" if has_gpu() else CPU_QUEUE


@dataclass(frozen=True)
class LiveWorkers:
    """What the live workers consume."""

    queues: frozenset[str]
    gpu: bool
    """Whether a live worker with a GPU consumes queue `gpu`."""


def live_workers(session: Session, *, lease_s: float) -> LiveWorkers:
    """The queues consumed by workers that reported in the last LIVE_LEASES lease periods."""
    since = utcnow() - timedelta(seconds=LIVE_LEASES * lease_s)
    rows = session.execute(select(WorkerBeat.queues, WorkerBeat.gpu).where(WorkerBeat.last_seen >= since)).all()
    queues: set[str] = set()
    gpu = False
    for names, has_gpu in rows:
        consumed = {q for q in names.split(",") if q}
        queues |= consumed
        gpu = gpu or (has_gpu and GPU_QUEUE in consumed)
    return LiveWorkers(frozenset(queues), gpu)


def queue_for(device: str, live: LiveWorkers) -> str:
    """The queue a job with `device` goes to now."""
    if device == "cuda":
        return GPU_QUEUE
    if device == "auto" and live.gpu:
        return GPU_QUEUE
    return CPU_QUEUE


def job_device(job: Job) -> str:
    """The job's spec `device` (auto, cpu or cuda)."""
    return str(job.spec.get("device", "auto"))


def route_job(session: Session, job: Job, live: LiveWorkers) -> str:
    """The queue to send `job` to now, stored on it (not committed): an `auto` job, or one from before queues,
    is routed afresh (a checkpoint resumes on either device); a `cpu` or `cuda` job keeps its queue."""
    if job.queue is None or job_device(job) == "auto":
        job.queue = queue_for(job_device(job), live)
    return job.queue


def waiting_stage(queue: str) -> str:
    """The stage of a queued job whose queue no live worker consumes."""
    return f"waiting_for_{queue}_worker"


WAITING_STAGES = frozenset(waiting_stage(queue) for queue in QUEUES)


def waiting_message(queue: str, device: str) -> str:
    """Why the job waits, and what to do."""
    if queue == GPU_QUEUE:
        return (
            f"no live GPU worker consumes queue 'gpu' (device: {device}): the job waits until one starts "
            "(`qadistill worker` on a host with a GPU); or cancel it and submit it with device 'auto' or 'cpu'"
        )
    return f"no live worker consumes queue '{queue}' (device: {device}): the job waits until one starts"


def note_availability(session: Session, job: Job, live: LiveWorkers) -> None:
    """Mark a queued job waiting when no live worker consumes its queue, and unmark it once one does; an event
    each time. Conditional updates: when several workers sweep at once, one of them writes the event. Commits
    what it changes."""
    if job.queue is None:
        return
    waiting = waiting_stage(job.queue)
    if job.queue not in live.queues:
        if job.stage == waiting:
            return
        changed = update(Job).where(
            Job.id == job.id, Job.status == "queued", or_(Job.stage.is_(None), Job.stage != waiting)
        )
        stage, level, message = waiting, "warning", waiting_message(job.queue, job_device(job))
    else:
        if job.stage not in WAITING_STAGES:  # (a moved job may wait for the other queue's worker)
            return
        changed = update(Job).where(Job.id == job.id, Job.status == "queued", Job.stage.in_(WAITING_STAGES))
        stage, level, message = "queued", "info", f"a worker consuming queue '{job.queue}' is alive"
    if session.execute(changed.values(stage=stage, updated_at=utcnow())).rowcount == 1:
        session.add(JobEvent(job_id=job.id, stage=stage, level=level, message=message))
        job.stage = stage
    session.commit()
