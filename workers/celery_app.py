"""The Celery application of the workers: `celery -A workers.celery_app worker -Q gpu,default`."""

import logging
from typing import Any

from celery.signals import worker_init

from app.db.migrate import upgrade_database
from app.services.queue import make_celery
from app.settings import get_settings

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]


@worker_init.connect
def migrate_on_start(**_kwargs: Any) -> None:
    """Bring the database up to date before taking tasks (in the parent, before any pool process forks)."""
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.database_url)
