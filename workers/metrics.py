"""Prometheus metrics of a worker: jobs and stages timed, jobs by final status per queue, the depth of the
queues it consumes and its heartbeat, served on settings.worker_metrics_port by the worker's main process.

Tasks run in pool processes (prefork): each writes its samples to PROMETHEUS_MULTIPROC_DIR (set by
workers/metrics_dir.py before prometheus_client loads), which the main process reads at each scrape. Labels
name queues, statuses and stage kinds only, never a tenant, job, teacher or model.
"""

import logging
import os
import socket
from collections.abc import Callable, Iterable
from datetime import datetime

from celery import Celery, Task
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select

from app.db.models import FINISHED_STATUSES, Job, WorkerBeat
from app.db.session import session_scope
from app.settings import Settings

log = logging.getLogger(__name__)

_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)

JOB_SECONDS = Histogram(
    "qadistill_worker_job_seconds",
    "Time from a job's start to its final status, by the queue of its last task and that status.",
    ["queue", "status"],
    buckets=_DURATION_BUCKETS,
)
JOBS = Counter(
    "qadistill_worker_jobs_total",
    "Jobs this worker brought to a final status, by queue and status.",
    ["queue", "status"],
)
TASKS = Counter(
    "qadistill_worker_tasks_total",
    "Job tasks this worker ran, by queue, task and outcome (succeeded, teachers_sent, trained, skipped, ...).",
    ["queue", "task", "outcome"],
)
RUNNING = Gauge(
    "qadistill_worker_tasks_running", "Job tasks running now, by queue.", ["queue"], multiprocess_mode="livesum"
)
STAGE_SECONDS = Histogram(
    "qadistill_worker_stage_seconds",
    "Time one run spent in a pipeline stage, by kind (prepare, teacher, soft_labels, stage1, stage2, evaluate, "
    "export).",
    ["stage"],
    buckets=_DURATION_BUCKETS,
)


def stage_kind(stage: str) -> str:
    """A stage's kind, without the teacher or variant it names ('teacher:t1' -> 'teacher')."""
    return stage.split(":", 1)[0] or "unknown"


def observe_stage(stage: str, seconds: float) -> None:
    """Note that a run spent `seconds` in `stage`."""
    STAGE_SECONDS.labels(stage_kind(stage)).observe(seconds)


def observe_job_end(queue: str, status: str, started_at: datetime | None, finished_at: datetime | None) -> None:
    """Note a job that this worker brought to final `status`."""
    JOBS.labels(queue, status).inc()
    if started_at is not None and finished_at is not None:
        JOB_SECONDS.labels(queue, status).observe(max(0.0, (finished_at - started_at).total_seconds()))


class QueueCollector(Collector):
    """At each scrape: the messages waiting in each queue this worker consumes, and its last heartbeat."""

    def __init__(self, celery: Celery, settings: Settings, queues: Iterable[str]) -> None:
        self.celery, self.settings, self.queues = celery, settings, sorted(queues)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("qadistill_queue_depth", "Messages waiting in a broker queue.", labels=["queue"])
        try:
            with self.celery.connection_for_read() as connection:
                channel = connection.default_channel
                for queue in self.queues:
                    # kombu's virtual transports (Redis, SQLAlchemy) count a queue's messages with its key
                    # prefix and priorities; a passive declare fails for a queue no one has bound yet.
                    depth.add_metric([queue], channel._size(queue))
        except Exception as exc:  # a broker down now: no sample this time, and the scrape still answers
            log.warning("queue depth not read: %s", exc)
        yield depth
        beat = GaugeMetricFamily(
            "qadistill_worker_heartbeat_timestamp_seconds",
            "Unix time of this worker's last heartbeat in the database (what the reconciliation sweep reads).",
        )
        try:
            with session_scope(self.settings.database_url) as session:
                seen = session.scalar(select(WorkerBeat.last_seen).where(WorkerBeat.name == self.name))
            if seen is not None:
                beat.add_metric([], seen.timestamp())
        except Exception as exc:
            log.warning("heartbeat not read: %s", exc)
        yield beat


def serve_metrics(celery: Celery, settings: Settings, queues: Iterable[str]) -> bool:
    """Serve the worker's metrics on settings.worker_metrics_port (all interfaces); whether it does."""
    if not settings.worker_metrics_port:
        return False
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # prometheus_client loaded before the folder was set: this process's own samples only
        for metric in (JOB_SECONDS, JOBS, TASKS, RUNNING, STAGE_SECONDS):
            registry.register(metric)
    registry.register(QueueCollector(celery, settings, queues))
    try:
        start_http_server(settings.worker_metrics_port, registry=registry)
    except OSError as exc:
        log.warning("worker metrics not served: port %d: %s", settings.worker_metrics_port, exc)
        return False
    log.info("worker metrics on port %d", settings.worker_metrics_port)
    return True


def forget_process(pid: int) -> None:
    """Drop the live gauges of a pool process that exited."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


def track_task(task: Task, name: str, job_id: str, settings: Settings, run: Callable[[], str]) -> str:
    """Run one job task, counting it by queue and outcome; a job it brought to a final status is timed."""
    queue = (task.request.delivery_info or {}).get("routing_key") or "unknown"
    RUNNING.labels(queue).inc()
    try:
        outcome = run()
    finally:
        RUNNING.labels(queue).dec()
    TASKS.labels(queue, name, outcome).inc()
    if outcome in FINISHED_STATUSES:
        try:
            with session_scope(settings.database_url) as session:
                job = session.get(Job, job_id)
                started_at, finished_at = (job.started_at, job.finished_at) if job else (None, None)
        except Exception as exc:  # the job's outcome is stored: a metric is not worth failing the task for
            log.warning("job %s: duration not read for the metrics: %s", job_id, exc)
            started_at = finished_at = None
        observe_job_end(queue, outcome, started_at, finished_at)
    return outcome
