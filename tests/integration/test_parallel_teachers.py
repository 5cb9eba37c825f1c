"""Teachers in parallel: a job's teachers train as a group of Celery tasks, one per teacher, so that two workers
train two teachers at the same time; the job then ends on one worker with soft labels, students, evaluation and
registration. The same job still runs end to end on a single worker."""

import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import JobLease, JobTask, WorkerBeat
from app.db.session import session_scope
from app.embedded import start_worker, stop_worker
from app.services.demo import DEMO_FILE
from app.storage import ArtifactStore
from tests.integration.conftest import FINISHED, Caller, Stack, _run_stack
from tests.integration.flow_helpers import tiny_spec, upload
from tests.integration.test_leases import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL, Redis and one worker; short leases. A test may add workers (`stack.spares`), stopped at the end."""
    overrides = {"lease_s": 5.0, "checkpoint_sync_s": 0.0, "requeue_after_s": 4.0}
    for stack in _run_stack("postgres", tmp_path_factory.mktemp("teachers"), **overrides):
        spares: list[subprocess.Popen[bytes]] = []
        stack.spares = spares  # type: ignore[attr-defined]
        try:
            yield stack
        finally:
            for worker in spares:
                stop_worker(worker, timeout=15)


def two_teacher_job(stack: Stack, caller: Caller, tiny_base: Any, name: str, soup: bool = False) -> str:
    """Submit a job whose two teachers both need fine-tuning (a few hundred tiny steps each), and with `soup`
    a third teacher averaged from them; its id."""
    teacher = {"base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 10, "max_steps": 200}
    teachers = [teacher | {"name": "t1", "seed": 1}, teacher | {"name": "t2", "seed": 2}]
    if soup:
        teachers.append({"name": "soup", "base": str(tiny_base), "average_of": ["t1", "t2"], "keep_base": 0.2})
    spec = tiny_spec(tiny_base, name=name, variants=["mkd"], teachers=teachers, checkpoint_every=50)
    spec["data"] = {"train": "demo", "eval": "demo"}
    response = stack.client.post("/v1/jobs", headers=caller.headers, json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def teacher_spans(stack: Stack, caller: Caller, job_id: str) -> dict[str, tuple[int, int]]:
    """Each teacher's (start, finish) event ids: 'fine-tuning ...' and 'saved to ...' of its stage."""
    events = stack.client.get(f"/v1/jobs/{job_id}/events", headers=caller.headers, params={"limit": 1000})
    spans: dict[str, list[int]] = {}
    for event in events.json()["data"]:
        name = event["stage"].removeprefix("teacher:")
        if event["stage"].startswith("teacher:") and event["message"].startswith(("fine-tuning", "saved to")):
            spans.setdefault(name, []).append(event["id"])
    assert all(len(ids) == 2 for ids in spans.values()), spans
    return {name: (ids[0], ids[1]) for name, ids in spans.items()}


def finished_job(stack: Stack, caller: Caller, job_id: str) -> dict[str, Any]:
    job = stack.wait_for(caller, job_id, lambda j: j["status"] in FINISHED, timeout=240)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-4000:])
    return job


def job_tasks(stack: Stack, job_id: str) -> list[JobTask]:
    with session_scope(stack.settings.database_url) as session:
        return list(session.scalars(select(JobTask).where(JobTask.job_id == job_id).order_by(JobTask.task)))


def test_a_job_with_two_teachers_and_their_soup_runs_end_to_end_on_one_worker(teacher_stack, tiny_base):
    stack = teacher_stack
    ida = stack.caller(f"ida-{secrets.token_hex(3)}")
    upload(stack, ida, DEMO_FILE.read_bytes(), "demo")
    job_id = two_teacher_job(stack, ida, tiny_base, "alone", soup=True)

    finished_job(stack, ida, job_id)
    assert sorted(teacher_spans(stack, ida, job_id)) == ["t1", "t2"]
    # The soup is no task of its own: the finishing step averages the two trained teachers' weights.
    events = stack.client.get(f"/v1/jobs/{job_id}/events", headers=ida.headers, params={"limit": 1000}).json()
    assert [e["message"] for e in events["data"] if e["stage"] == "teacher:soup"][0].startswith(
        "weights averaged over t1, t2, 0.2 of"
    )
    metrics = stack.client.get(f"/v1/jobs/{job_id}/metrics", headers=ida.headers).json()
    assert "teacher:soup" in json.dumps(metrics)
    assert [(t.task, t.epoch, t.finished_at is not None) for t in job_tasks(stack, job_id)] == [
        ("teacher:t1", 1, True),
        ("teacher:t2", 1, True),
    ]
    assert (
        stack.client.post(
            "/v1/models/alone/answer",
            headers=ida.headers,
            json={"question": "what do bees make?", "passages": ["bees make honey.", "the sky is blue."]},
        ).status_code
        == 200
    )
    store = ArtifactStore(stack.settings.artifacts_url)
    stored = store.uri(f"{ida.tenant_id}/jobs/{job_id}")
    wait_until(lambda: store.list_names(stored) == [], 10, "the finished job's snapshots, teachers' too, to go")


def test_two_workers_train_two_teachers_at_the_same_time(teacher_stack, tiny_base):
    stack = teacher_stack
    jack = stack.caller(f"jack-{secrets.token_hex(3)}")
    upload(stack, jack, DEMO_FILE.read_bytes(), "demo")
    log_path = stack.settings.home / "worker-2.log"
    second = start_worker(stack.settings, log_path=log_path, extra_env={"OMP_NUM_THREADS": "1"})
    stack.spares.append(second)  # type: ignore[attr-defined]

    def second_ready() -> bool:
        assert second.poll() is None, log_path.read_text()[-4000:]
        with session_scope(stack.settings.database_url) as session:
            alive = session.get(WorkerBeat, f"{socket.gethostname()}:{second.pid}") is not None
        # Its pool process imports torch and the pipeline after it starts: a teacher sent earlier would wait.
        return alive and "pipeline loaded" in log_path.read_text()

    wait_until(second_ready, 90, "the second worker to start and load the pipeline", log_path)
    job_id = two_teacher_job(stack, jack, tiny_base, "together")

    finished_job(stack, jack, job_id)
    spans = teacher_spans(stack, jack, job_id)
    (start1, end1), (start2, end2) = spans["t1"], spans["t2"]
    assert start1 < end2 and start2 < end1, f"the teachers trained one after the other: {spans}"
    tasks = job_tasks(stack, job_id)
    assert len({t.worker.split(":")[1] for t in tasks}) == 2, "one process trained both teachers"
    with session_scope(stack.settings.database_url) as session:
        leases = list(session.scalars(select(JobLease).where(JobLease.job_id == job_id)))
    assert [(lease.epoch, lease.released_at is not None) for lease in leases] == [(1, True)], "the job was taken over"
