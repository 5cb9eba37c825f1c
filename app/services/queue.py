"""The Celery application's configuration, shared by the API (which sends) and the worker (which runs)."""

from celery import Celery, group
from kombu import Connection, Exchange, Queue

from app.services.routing import CPU_QUEUE, QUEUES
from app.settings import Settings

RUN_JOB_TASK = "workers.tasks.run_job"
TRAIN_TEACHER_TASK = "workers.tasks.train_teacher"
FINISH_JOB_TASK = "workers.tasks.finish_job"
VISIBILITY_TIMEOUT_S = 24 * 3600


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the settings' broker: queues `gpu` and `cpu`, late acks, one task at a time.

    Every job task is sent with its job's queue named (app/services/routing.py); none relies on a route."""
    celery = Celery("qadistill", broker=settings.broker_url, set_as_current=False)
    transport_options = broker_transport_options(settings)
    celery.conf.update(
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        task_default_queue=CPU_QUEUE,
        # A task is acknowledged when it ends, and requeued if its worker dies: jobs resume from checkpoints.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """Transport options: the key prefix, and (Redis) a long visibility timeout.

    With late acks Redis hands an unacknowledged task to another worker after the visibility timeout. It no
    longer decides anything: a redelivered task finds its job leased or finished, and a job whose worker
    died is sent again by the workers' reconciliation (app/services/reconcile.py) once its lease expires.
    """
    options: dict[str, object] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        options["visibility_timeout"] = VISIBILITY_TIMEOUT_S
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


# Sending a task retries a broker it cannot reach with back-off: 6 tries over about 3 s.
PUBLISH_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.4, "interval_max": 1.0}


def enqueue_job(celery: Celery, job_id: str, queue: str, task_id: str | None = None) -> None:
    """Send the task that runs job `job_id` to `queue`, retrying an unreachable broker a few times.

    Sending one job twice is harmless: the second task finds it finished or leased and returns.
    """
    celery.send_task(
        RUN_JOB_TASK,
        args=[job_id],
        task_id=task_id,
        queue=queue,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )


def enqueue_teachers(celery: Celery, job_id: str, epoch: int, teachers: list[str], queue: str) -> None:
    """Send one task per teacher of run `epoch` to the job's `queue` as a Celery group, so that as many workers
    train them at once.

    Each task is told every teacher of the run: the last one to finish sends the run's next step.
    """
    tasks = [
        celery.signature(TRAIN_TEACHER_TASK, args=[job_id, epoch, name, teachers], queue=queue) for name in teachers
    ]
    group(tasks, app=celery).apply_async(retry=True, retry_policy=PUBLISH_RETRY_POLICY)


def enqueue_finish(celery: Celery, job_id: str, epoch: int, queue: str) -> None:
    """Send the run's last step (soft labels, student stages, evaluation, registration) to the job's `queue`
    once its teachers are trained."""
    celery.send_task(FINISH_JOB_TASK, args=[job_id, epoch], queue=queue, retry=True, retry_policy=PUBLISH_RETRY_POLICY)


def check_broker(settings: Settings, timeout: float = 3.0) -> None:
    """Raise if the broker cannot be reached within `timeout` seconds."""
    options = broker_transport_options(settings)
    with Connection(settings.broker_url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
