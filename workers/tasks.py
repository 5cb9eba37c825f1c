"""Celery tasks: each is a thin shell over a library call.

A job is one `run_job` when no teacher needs training; else `run_job` (prepare) sends a group of
`train_teacher`, one per teacher, and the last of them to finish sends `finish_job` (see workers/runner.py).
"""

from celery import Task

from app.services.queue import FINISH_JOB_TASK, RUN_JOB_TASK, TRAIN_TEACHER_TASK
from app.settings import get_settings
from workers.celery_app import app
from workers.metrics import track_task
from workers.runner import execute_finish, execute_job, execute_teacher

OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


@app.task(name=RUN_JOB_TASK, bind=True, **OPTIONS)
def run_job(self: Task, job_id: str) -> str:
    """Claim job `job_id` for a new run and run it, or send its teachers; returns the outcome."""
    settings = get_settings()
    return track_task(self, "run_job", job_id, settings, lambda: execute_job(job_id, settings, app))


@app.task(name=TRAIN_TEACHER_TASK, bind=True, **OPTIONS)
def train_teacher(self: Task, job_id: str, epoch: int, name: str, teachers: list[str]) -> str:
    """Train teacher `name` of run `epoch` of job `job_id`; returns the outcome."""
    settings = get_settings()
    return track_task(
        self, "train_teacher", job_id, settings, lambda: execute_teacher(job_id, epoch, name, teachers, settings, app)
    )


@app.task(name=FINISH_JOB_TASK, bind=True, **OPTIONS)
def finish_job(self: Task, job_id: str, epoch: int) -> str:
    """Run the rest of run `epoch` of job `job_id` once its teachers are trained; returns the outcome."""
    settings = get_settings()
    return track_task(self, "finish_job", job_id, settings, lambda: execute_finish(job_id, epoch, settings))
