"""Routing by device with real worker processes: the stack's one worker has no GPU, so it consumes queue `cpu`
alone. A `cuda` job is accepted and says it waits for a GPU worker; an `auto` job goes to `cpu` and finishes
there (its teacher and finishing tasks too: a task sent to `gpu` would never end); an `auto` job sent to a GPU
worker that then falls silent moves to `cpu` and finishes."""

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db.base import utcnow
from app.db.migrate import upgrade_database
from app.db.models import JobLease, JobTask, WorkerBeat
from app.db.session import session_scope
from app.embedded import settings_env
from app.services.demo import DEMO_FILE
from app.services.reconcile import record_worker
from app.services.routing import LIVE_LEASES
from app.settings import Settings
from tests.integration.conftest import FINISHED, Caller, Stack, _run_stack
from tests.integration.flow_helpers import tiny_spec, upload
from tests.integration.test_leases import wait_until

pytestmark = pytest.mark.integration

LEASE_S = 2.0


@pytest.fixture(scope="module")
def routing_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL, Redis and one CPU worker with short leases, once it has reported the queues it consumes."""
    overrides = {"lease_s": LEASE_S, "checkpoint_sync_s": 0.0, "requeue_after_s": 30.0}
    for stack in _run_stack("postgres", tmp_path_factory.mktemp("routing"), **overrides):
        beat = wait_until(lambda stack=stack: worker_beat(stack), 90, "the worker to report in", stack.worker_log)
        assert beat[1:] == ("cpu", False), beat
        yield stack


def worker_beat(stack: Stack) -> tuple[datetime, str, bool] | None:
    """The stack's worker's last heartbeat, the queues it consumes and whether it has a GPU (None before its first)."""
    with session_scope(stack.settings.database_url) as session:
        beat = session.get(WorkerBeat, f"{socket.gethostname()}:{stack.worker.pid}")
        return None if beat is None else (beat.last_seen, beat.queues, beat.gpu)


@pytest.fixture(scope="module")
def caller(routing_stack: Stack) -> Caller:
    caller = routing_stack.caller(f"rita-{secrets.token_hex(3)}")
    upload(routing_stack, caller, DEMO_FILE.read_bytes(), "demo")
    return caller


def submit(stack: Stack, caller: Caller, tiny_base: Any, device: str, name: str) -> dict[str, Any]:
    """A job with one teacher to fine-tune (a task of its own) on `device`; the API's answer."""
    teacher = {"name": "t", "base": str(tiny_base), "max_length": 32, "batch_size": 8, "max_steps": 6}
    spec = tiny_spec(tiny_base, name=name, variants=["kd"], teachers=[teacher], device=device)
    spec["data"] = {"train": "demo", "eval": "demo"}
    response = stack.client.post("/v1/jobs", headers=caller.headers, json=spec)
    assert response.status_code == 201, response.text
    return response.json()


def events(stack: Stack, caller: Caller, job_id: str) -> list[dict[str, Any]]:
    response = stack.client.get(f"/v1/jobs/{job_id}/events", headers=caller.headers, params={"limit": 1000})
    return response.json()["data"]


def sweeps_after(stack: Stack, rounds: int) -> None:
    """Wait until the worker's reconciliation loop has run `rounds` more times (its heartbeat moved on)."""
    for _ in range(rounds):
        since = utcnow()
        wait_until(lambda since=since: worker_beat(stack)[0] > since, 30, "a reconciliation round", stack.worker_log)


def test_a_cuda_job_with_only_a_cpu_worker_alive_waits_for_a_gpu_worker_and_says_so(routing_stack, caller, tiny_base):
    stack = routing_stack
    job = submit(stack, caller, tiny_base, "cuda", "wants-gpu")
    assert (job["status"], job["queue"], job["stage"]) == ("queued", "gpu", "waiting_for_gpu_worker"), job
    warning = events(stack, caller, job["id"])[-1]
    assert (warning["level"], warning["stage"]) == ("warning", "waiting_for_gpu_worker")
    assert warning["message"].startswith("no live GPU worker consumes queue 'gpu' (device: cuda)")

    # The CPU worker sweeps twice: it neither takes the job nor repeats the warning.
    sweeps_after(stack, 2)
    job = stack.client.get(f"/v1/jobs/{job['id']}", headers=caller.headers).json()
    assert (job["status"], job["stage"]) == ("queued", "waiting_for_gpu_worker"), job
    assert [e["stage"] for e in events(stack, caller, job["id"])] == ["queued", "waiting_for_gpu_worker"]
    cancelled = stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=caller.headers).json()
    assert cancelled["status"] == "cancelled"


def test_an_auto_job_goes_to_the_cpu_queue_and_finishes_on_the_cpu_worker(routing_stack, caller, tiny_base):
    stack = routing_stack
    job = submit(stack, caller, tiny_base, "auto", "auto-cpu")
    assert (job["queue"], job["stage"]) == ("cpu", None), job
    job = stack.wait_for(caller, job["id"], lambda j: j["status"] in FINISHED, timeout=180)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])
    with session_scope(stack.settings.database_url) as session:
        leases = session.scalars(select(JobLease.worker).where(JobLease.job_id == job["id"])).all()
        tasks = session.scalars(select(JobTask.worker).where(JobTask.job_id == job["id"])).all()
    # run_job, the teacher's task and finish_job all reached the CPU worker through queue cpu: each holder
    # (host:pid of a pool process[:task]) is a process of the worker's group.
    holders = [*leases, *tasks]
    assert leases and tasks, holders
    assert all(os.getpgid(int(holder.split(":")[1])) == stack.worker.pid for holder in holders), holders
    assert "waiting_for_cpu_worker" not in [e["stage"] for e in events(stack, caller, job["id"])]


def test_an_auto_job_whose_gpu_worker_falls_silent_moves_to_cpu_and_finishes(routing_stack, caller, tiny_base):
    stack = routing_stack
    # A GPU worker reports in once (as a worker's sweep does), then never again: it was lost.
    with session_scope(stack.settings.database_url) as session:
        record_worker(session, name=f"gpu-host-{secrets.token_hex(3)}:1", gpu=True, queues=["gpu"])
    job = submit(stack, caller, tiny_base, "auto", "auto-gpu-lost")
    assert (job["queue"], job["stage"]) == ("gpu", None), job

    # Once its heartbeat is older than LIVE_LEASES lease periods, the CPU worker's sweep moves the job.
    job = stack.wait_for(caller, job["id"], lambda j: j["status"] in FINISHED, timeout=60 + LIVE_LEASES * LEASE_S)
    assert (job["status"], job["queue"]) == ("succeeded", "cpu"), (job, stack.worker_log.read_text()[-3000:])
    stages = [e["stage"] for e in events(stack, caller, job["id"])]
    assert stages[0] == "queued" and "waiting_for_gpu_worker" not in stages, stages


def health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from app.cli import main; main()", "worker-health"]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_worker_health_reads_this_hosts_heartbeat(routing_stack, tmp_path):
    # The stack's worker reports every lease_s / 4: the container health check passes.
    live = health(settings_env(routing_stack.settings))
    assert live.returncode == 0 and live.stdout.startswith("healthy"), live

    # A database where this host's worker last reported long ago, and one where none ever did.
    settings = Settings(home=tmp_path, lease_s=LEASE_S)
    upgrade_database(settings.database_url)
    assert health(settings_env(settings)).stderr.startswith("error: unhealthy: no worker on")
    with session_scope(settings.database_url) as session:
        record_worker(session, name=f"{socket.gethostname()}:1", gpu=False, queues=["cpu"])
        session.execute(update(WorkerBeat).values(last_seen=utcnow() - timedelta(seconds=60)))
    stale = health(settings_env(settings))
    assert stale.returncode == 1 and "s old (more than 6 s)" in stale.stderr, stale
