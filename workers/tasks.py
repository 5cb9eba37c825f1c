"""Celery tasks: each is a thin shell over a library call.

A job is one `run_job` when no teacher needs training; else `run_job` (prepare) sends a group of
`train_teacher`, one per teacher, and the last of them to finish sends `finish_job` (see workers/runner.py).
"""

from app.services.queue import FINISH_JOB_TASK, RUN_JOB_TASK, TRAIN_TEACHER_TASK
from app.settings import get_settings
from workers.celery_app import app
from workers.runner import execute_finish, execute_job, execute_teacher

OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


@app.task(name=RUN_JOB_TASK, **OPTIONS)
def run_job(job_id: str) -> str:
    """Claim job `job_id` for a new run and run it, or send its teachers; returns the outcome."""
    return execute_job(job_id, get_settings(), app)


@app.task(name=TRAIN_TEACHER_TASK, **OPTIONS)
def train_teacher(job_id: str, epoch: int, name: str, teachers: list[str]) -> str:
    """Train teacher `name` of run `epoch` of job `job_id`; returns the outcome."""
    return execute_teacher(job_id, epoch, name, teachers, get_settings(), app)


@app.task(name=FINISH_JOB_TASK, **OPTIONS)
def finish_job(job_id: str, epoch: int) -> str:
    """Run the rest of run `epoch` of job `job_id` once its teachers are trained; returns the outcome."""
    return execute_finish(job_id, epoch, get_settings())
