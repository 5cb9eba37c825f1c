"""The Celery application of the workers: `celery -A workers.celery_app worker -Q gpu,default`."""

import importlib
import logging
import os
import threading
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from app.db.migrate import upgrade_database
from app.services.queue import make_celery
from app.settings import get_settings
from workers.sweeper import Sweeper

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]


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
    sweeper = Sweeper(app, get_settings())
    sweeper.start()
    _sweepers.append(sweeper)


@worker_shutdown.connect
def stop_sweeper(**_kwargs: Any) -> None:
    """Stop the reconciliation loop."""
    while _sweepers:
        _sweepers.pop().stop()
