"""Celery tasks: each is a thin shell over a library call."""

from app.services.queue import RUN_JOB_TASK
from app.settings import get_settings
from workers.celery_app import app
from workers.runner import execute_job


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Run distillation job `job_id` to its end; returns its final status."""
    return execute_job(job_id, get_settings())
