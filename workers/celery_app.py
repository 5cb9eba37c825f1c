"""The Celery application of the workers: `celery -A workers.celery_app worker -Q cpu` (or `gpu`)."""

import importlib
import logging
import os
import threading
from typing import Any

from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from app.db.migrate import upgrade_database
from app.logs import configure_logging, quiet_third_party
from app.services.queue import make_celery
from app.settings import get_settings
from workers.metrics_dir import use_multiprocess_dir
from workers.sweeper import Sweeper

log = logging.getLogger(__name__)

# Before the pipeline loads prometheus_client and transformers (none of the imports above does): the pool
# processes' metrics go to one folder, and third-party progress bars and load reports stay out of the log.
use_multiprocess_dir()
quiet_third_party()
app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]


@setup_logging.connect
def log_as_configured(**_kwargs: Any) -> None:
    """The settings' log format instead of Celery's: every line once, JSON with the process's name."""
    settings = get_settings()
    configure_logging(process="worker", level=settings.log_level, fmt=settings.log_format)


@worker_init.connect
def migrate_on_start(**_kwargs: Any) -> None:
    """Bring the database up to date before taking tasks (in the parent, before any pool process forks)."""
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.database_url)


@worker_process_init.connect
def preload_pipeline(**_kwargs: Any) -> None:
    """Import torch and the pipeline in a pool process's background, so that a job it receives (a takeover
    above all) starts at once; in the background because the parent waits only seconds for a new child."""
    threading.Thread(target=_load_pipeline, daemon=True).start()


def _load_pipeline() -> None:
    importlib.import_module("app.distill.pipeline")
    log.info("pool process %d: pipeline loaded", os.getpid())


_sweepers: list[Sweeper] = []


@worker_ready.connect
def start_sweeper(**_kwargs: Any) -> None:
    """Start the reconciliation loop in the worker's main process, once its pool is up."""
    queues = app.amqp.queues.consume_from or app.amqp.queues  # all of them when -Q is not given
    sweeper = Sweeper(app, get_settings(), sorted(queues))
    log.info("worker consumes queues %s", ", ".join(sorted(queues)))
    sweeper.start()
    _sweepers.append(sweeper)


@worker_ready.connect
def start_metrics_server(**_kwargs: Any) -> None:
    """Serve the worker's Prometheus metrics from its main process (workers/metrics.py)."""
    from workers.metrics import serve_metrics

    serve_metrics(app, get_settings(), app.amqp.queues.consume_from or app.amqp.queues)


@worker_process_shutdown.connect
def forget_pool_process(pid: int | None = None, **_kwargs: Any) -> None:
    """A pool process that exits no longer counts in the live gauges."""
    from workers.metrics import forget_process

    forget_process(pid or os.getpid())


@worker_shutdown.connect
def stop_sweeper(**_kwargs: Any) -> None:
    """Stop the reconciliation loop."""
    while _sweepers:
        _sweepers.pop().stop()
