"""Fault tolerance: a worker process killed mid-job; the redelivered task resumes from the checkpoint."""

import os
import secrets
import signal
import subprocess
import time

import pytest

from app.services.demo import DEMO_FILE
from tests.integration.flow_helpers import tiny_spec, upload

pytestmark = pytest.mark.integration
FINISHED = ("succeeded", "failed", "cancelled")


def test_killed_worker_process_resumes_the_job_from_its_checkpoint(postgres_stack, tiny_base):
    erin = postgres_stack.caller(f"erin-{secrets.token_hex(3)}")
    upload(postgres_stack, erin, DEMO_FILE.read_bytes(), "demo")
    teacher = {"name": "long", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "max_steps": 100}
    spec = tiny_spec(tiny_base, name="resumed", variants=["kd"], teachers=[teacher], checkpoint_every=10)
    spec["data"] = {"train": "demo", "eval": "demo"}
    job_id = postgres_stack.client.post("/v1/jobs", headers=erin.headers, json=spec).json()["id"]
    checkpoints = postgres_stack.settings.work_dir / job_id / "checkpoints" / "teacher" / "long"
    deadline = time.monotonic() + 60
    while not any(checkpoints.glob("step-*/model.safetensors")):
        assert time.monotonic() < deadline, postgres_stack.worker_log.read_text()[-3000:]
        time.sleep(0.2)

    # Kill the pool process running the task, as the OOM killer would; the worker's parent survives.
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(postgres_stack.worker.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)

    job = postgres_stack.wait_for(erin, job_id, lambda j: j["status"] in FINISHED, timeout=120)
    assert job["status"] == "succeeded", (job, postgres_stack.worker_log.read_text()[-3000:])
    messages = [
        e["message"]
        for e in postgres_stack.client.get(f"/v1/jobs/{job_id}/events", headers=erin.headers).json()["data"]
    ]
    assert "restarted after an interruption" in messages
    assert any(m.startswith("resuming from the checkpoint") for m in messages), messages
