"""Leases and reconciliation with real worker processes: a whole worker killed, a cancel with no worker, a lost
broker message. Short leases (LEASE_S) so that each test waits seconds, not minutes."""

import itertools
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.db.base import utcnow
from app.db.models import Job, JobLease, Tenant, WorkerBeat
from app.db.session import session_scope
from app.distill.spec import PipelineSpec
from app.embedded import start_worker, stop_worker
from app.services import jobs
from app.services.demo import DEMO_FILE
from app.storage import ArtifactStore
from tests.integration.conftest import FINISHED, Stack, _run_stack
from tests.integration.flow_helpers import tiny_spec, unlabelled_slice, upload
from workers.workspace import CURRENT, teacher_key, workspace_key

pytestmark = pytest.mark.integration

LEASE_S = 5.0


@pytest.fixture(scope="module")
def lease_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack (PostgreSQL and Redis unless a test asks for `embedded`) whose worker takes 5 s leases; the
    workers a test adds are stopped at the end."""
    kind = getattr(request, "param", "postgres")
    home = tmp_path_factory.mktemp(f"leases-{kind}")
    # student_processes 2: a job of two variants or more trains its students side by side in two child processes.
    overrides = {"lease_s": LEASE_S, "checkpoint_sync_s": 0.0, "requeue_after_s": 4.0, "max_takeovers": 3}
    overrides["student_processes"] = 2
    for stack in _run_stack(kind, home, **overrides):
        spares: list[subprocess.Popen[bytes]] = []
        stack.spares = spares  # type: ignore[attr-defined]
        try:
            yield stack
        finally:
            for worker in spares:
                stop_worker(worker, timeout=15)


def wait_until(check: Callable[[], Any], timeout: float, what: str, log: Any = None) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"; log:\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.2)
    return result


def start_spare_worker(stack: Stack) -> subprocess.Popen[bytes]:
    """Start one more worker process and wait until its reconciliation loop reports it alive."""
    log_path = stack.settings.home / f"worker-{len(stack.spares)}.log"  # type: ignore[attr-defined]

    def first_alive() -> bool:
        with session_scope(stack.settings.database_url) as session:
            return session.get(WorkerBeat, f"{socket.gethostname()}:{stack.worker.pid}") is not None

    # Two workers declaring their queues at once race on the embedded broker's queue table (a unique name):
    # the second starts once the first has declared them.
    wait_until(first_alive, 90, "the first worker to start")
    worker = start_worker(stack.settings, log_path=log_path, extra_env={"OMP_NUM_THREADS": "1"})
    stack.spares.append(worker)  # type: ignore[attr-defined]
    name = f"{socket.gethostname()}:{worker.pid}"

    def alive() -> bool:
        assert worker.poll() is None, log_path.read_text()[-4000:]
        with session_scope(stack.settings.database_url) as session:
            return session.get(WorkerBeat, name) is not None

    wait_until(alive, 90, "the spare worker to start", log_path)
    return worker


def kill_lease_holder(stack: Stack, job_id: str) -> subprocess.Popen[bytes]:
    """SIGKILL the whole process group of the worker holding the job's lease; the other worker survives it."""
    # An earlier test's survivor is both the stack's worker and one of its spares: each process once.
    workers = list({w.pid: w for w in [stack.worker, *stack.spares]}.values())  # type: ignore[attr-defined]
    found: list[subprocess.Popen[bytes]] = []

    def held_by_a_worker() -> bool:
        # Between two steps of the run the lease passes through the queue; wait for a worker to hold it.
        with session_scope(stack.settings.database_url) as session:
            owner = session.scalar(select(Job.lease_owner).where(Job.id == job_id))
        parts = (owner or "").split(":")  # host:pid, or host:pid:task for a teacher task's lease
        try:
            group = os.getpgid(int(parts[1]))
        except (IndexError, ValueError, ProcessLookupError):
            return False
        found[:] = [w for w in workers if w.pid == group]
        return len(found) == 1

    wait_until(held_by_a_worker, 60, "a worker to hold the job's lease")
    (holder,) = found
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    (survivor,) = [w for w in workers if w.poll() is None]
    stack.worker = survivor  # wait_for now watches the survivor
    return survivor


def kill_in_stage1(stack: Stack, caller: Any, tiny_base: Any, *, name: str, variants: list[str]) -> str:
    """Submit a job whose tkd student has a long stage 1; kill the worker holding it once a stage-1 checkpoint of
    tkd is in the artifact store (what another worker resumes from). The job's id."""
    start_spare_worker(stack)
    stage1 = {"batch_size": 1, "epochs": 50, "max_steps": 800, "learning_rate": 1e-4}
    spec = tiny_spec(tiny_base, name=name, variants=variants, stage1=stage1, checkpoint_every=10)
    job_id = stack.client.post("/v1/jobs", headers=caller.headers, json=spec).json()["id"]
    store = ArtifactStore(stack.settings.artifacts_url)
    work = store.uri(workspace_key(caller.tenant_id, job_id))

    def stored_stage1_checkpoint() -> bool:
        current = store.read_text(f"{work}/{CURRENT}")
        return current is not None and any(
            n.startswith("step-") for n in store.list_names(f"{work}/{current}/checkpoints/stage1/tkd")
        )

    wait_until(stored_stage1_checkpoint, 120, "a stored stage-1 checkpoint")
    kill_lease_holder(stack, job_id)
    return job_id


def lease_history(stack: Stack, job_id: str) -> list[JobLease]:
    with session_scope(stack.settings.database_url) as session:
        return list(session.scalars(select(JobLease).where(JobLease.job_id == job_id).order_by(JobLease.epoch)))


def messages(stack: Stack, caller: Any, job_id: str) -> list[str]:
    events = stack.client.get(f"/v1/jobs/{job_id}/events", headers=caller.headers, params={"limit": 1000})
    return [e["message"] for e in events.json()["data"]]


@pytest.mark.parametrize("lease_stack", ["postgres", "embedded"], indirect=True)
def test_whole_worker_killed_mid_job_is_taken_over_and_resumes(lease_stack, tiny_base):
    stack = lease_stack
    erin = stack.caller(f"erin-{secrets.token_hex(3)}")
    upload(stack, erin, DEMO_FILE.read_bytes(), "demo")
    start_spare_worker(stack)
    # 400 steps (30 an epoch): still training when killed after its first stored checkpoint, even on a fast host.
    teacher = {"name": "long", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 50}
    teacher["max_steps"] = 400
    spec = tiny_spec(tiny_base, name="resumed", variants=["kd"], teachers=[teacher], checkpoint_every=10)
    spec["data"] = {"train": "demo", "eval": "demo"}
    job_id = stack.client.post("/v1/jobs", headers=erin.headers, json=spec).json()["id"]

    # Wait for a teacher checkpoint in the artifact store (the teacher's task stores its own snapshots): what
    # another host would resume from.
    store = ArtifactStore(stack.settings.artifacts_url)
    work = store.uri(workspace_key(erin.tenant_id, job_id))
    teacher_work = store.uri(teacher_key(erin.tenant_id, job_id, "long"))

    def stored_checkpoint() -> bool:
        current = store.read_text(f"{teacher_work}/{CURRENT}")
        teacher_dir = f"{teacher_work}/{current}/checkpoints/teacher/long"
        return current is not None and any(n.startswith("step-") for n in store.list_names(teacher_dir))

    wait_until(stored_checkpoint, 120, "a stored teacher checkpoint")
    kill_lease_holder(stack, job_id)
    killed_at = utcnow()

    job = stack.wait_for(erin, job_id, lambda j: j["status"] in FINISHED, timeout=180)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])
    texts = messages(stack, erin, job_id)
    assert any(m.startswith("restarted after an interruption (takeover 1 of at most 3)") for m in texts), texts
    assert "restored the checkpoints of the previous run from the artifact store" in texts
    assert any(m.startswith("resuming from the checkpoint") for m in texts), texts

    first, second = lease_history(stack, job_id)
    assert first.worker != second.worker
    assert first.released_at is None and second.released_at is not None  # lost, then released at the end
    assert second.acquired_at >= first.expires_at, "two workers held the job at once"
    assert second.acquired_at - killed_at <= timedelta(seconds=2 * LEASE_S)
    # The worker deletes them right after it marks the job succeeded.
    wait_until(lambda: store.list_names(work) == [], 10, "the finished job's checkpoints to be deleted")
    assert store.list_names(teacher_work) == [], "the finished job's teacher checkpoints are still stored"


@pytest.mark.parametrize("lease_stack", ["postgres", "embedded"], indirect=True)
def test_whole_worker_killed_in_stage1_is_taken_over_and_resumes_stage1(lease_stack, tiny_base, sample_data):
    stack = lease_stack
    fay = stack.caller(f"fay-{secrets.token_hex(3)}")
    upload(stack, fay, DEMO_FILE.read_bytes(), "demo")
    upload(stack, fay, unlabelled_slice(sample_data), "pool")
    job_id = kill_in_stage1(stack, fay, tiny_base, name="stage1-resumed", variants=["tkd"])

    job = stack.wait_for(fay, job_id, lambda j: j["status"] in FINISHED, timeout=240)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])
    texts = messages(stack, fay, job_id)
    assert any(m.startswith("restarted after an interruption (takeover 1 of at most 3)") for m in texts), texts
    events = stack.client.get(f"/v1/jobs/{job_id}/events", headers=fay.headers, params={"limit": 1000}).json()
    resumed = [e["stage"] for e in events["data"] if e["message"].startswith("resuming from the checkpoint")]
    assert "stage1:tkd" in resumed, events
    leases = lease_history(stack, job_id)
    assert len({lease.worker for lease in leases}) >= 2
    for earlier, later in itertools.pairwise(leases):
        assert later.acquired_at >= (earlier.released_at or earlier.expires_at), "two workers held the job at once"


def test_worker_killed_while_students_train_side_by_side_is_taken_over_and_resumes(
    lease_stack, tiny_base, sample_data
):
    stack = lease_stack
    gil = stack.caller(f"gil-{secrets.token_hex(3)}")
    upload(stack, gil, DEMO_FILE.read_bytes(), "demo")
    upload(stack, gil, unlabelled_slice(sample_data), "pool")
    # The children write the checkpoints; the job's process copies them to the store while they are paused.
    job_id = kill_in_stage1(stack, gil, tiny_base, name="side-by-side", variants=["kd", "tkd"])

    job = stack.wait_for(gil, job_id, lambda j: j["status"] in FINISHED, timeout=240)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])
    events = stack.client.get(f"/v1/jobs/{job_id}/events", headers=gil.headers, params={"limit": 1000}).json()
    texts = [e["message"] for e in events["data"]]
    assert texts.count("training the students side by side in 2 processes of 1 thread: tkd; kd") == 2, texts
    resumed = [e["stage"] for e in events["data"] if e["message"].startswith("resuming from the checkpoint")]
    assert "stage1:tkd" in resumed, texts
    metrics = stack.client.get(f"/v1/jobs/{job_id}/metrics", headers=gil.headers).json()
    assert {"stage1:tkd", "stage2:tkd", "stage2:kd"} <= {c["stage"] for c in metrics["curves"]}, metrics["curves"]


def test_cancel_a_job_whose_worker_was_killed(lease_stack, tiny_base):
    stack = lease_stack
    carol = stack.caller(f"carol-{secrets.token_hex(3)}")
    upload(stack, carol, DEMO_FILE.read_bytes(), "demo")
    start_spare_worker(stack)
    slow_teacher = {"name": "slow", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 50}
    spec = tiny_spec(tiny_base, name="slow", variants=["kd"], teachers=[slow_teacher])
    spec["data"] = {"train": "demo", "eval": "demo"}
    job_id = stack.client.post("/v1/jobs", headers=carol.headers, json=spec).json()["id"]
    stack.wait_for(carol, job_id, lambda j: (j["stage"] or "").startswith("teacher:") and j["progress"] > 0)

    kill_lease_holder(stack, job_id)
    killed_at = utcnow()
    cancelling = stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=carol.headers).json()
    assert cancelling["status"] == "cancelling"
    stack.wait_for(carol, job_id, lambda j: j["status"] != "cancelling", timeout=4 * LEASE_S)
    with session_scope(stack.settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "cancelled" and job.finished_at is not None
        assert job.finished_at - killed_at <= timedelta(seconds=2 * LEASE_S)
    assert stack.client.delete("/v1/datasets/demo", headers=carol.headers).status_code == 204


def test_a_queued_job_whose_message_was_lost_is_sent_again(lease_stack, tiny_base):
    stack = lease_stack
    frank = stack.caller(f"frank-{secrets.token_hex(3)}")
    upload(stack, frank, DEMO_FILE.read_bytes(), "demo")
    spec = tiny_spec(tiny_base, name="lost", variants=["kd"], teachers=[{"name": "t", "path": str(tiny_base)}])
    spec["data"] = {"train": "demo", "eval": "demo"}
    with session_scope(stack.settings.database_url) as session:
        tenant = session.get(Tenant, frank.tenant_id)
        assert tenant is not None
        # The broker "loses" the message: the job is stored queued and nothing is sent.
        job, _ = jobs.submit_job(
            session,
            lambda _job, _task, _queue: None,
            tenant=tenant,
            spec=PipelineSpec.model_validate(spec),
            max_active=4,
            lease_s=stack.settings.lease_s,
        )
        job_id = job.id
    job = stack.wait_for(frank, job_id, lambda j: j["status"] in FINISHED, timeout=120)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])


def test_killed_pool_process_job_resumes_after_its_lease_expires(lease_stack, tiny_base):
    stack = lease_stack
    erin = stack.caller(f"erin-{secrets.token_hex(3)}")
    upload(stack, erin, DEMO_FILE.read_bytes(), "demo")
    # 400 steps (30 an epoch): several seconds even on a fast host, where 100 steps took under 2 s and the job
    # finished between two polls; long enough to be caught training.
    teacher = {"name": "long", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 50}
    teacher["max_steps"] = 400
    spec = tiny_spec(tiny_base, name="child", variants=["kd"], teachers=[teacher], checkpoint_every=10)
    spec["data"] = {"train": "demo", "eval": "demo"}
    job_id = stack.client.post("/v1/jobs", headers=erin.headers, json=spec).json()["id"]
    stack.wait_for(erin, job_id, lambda j: (j["stage"] or "").startswith("teacher:") and j["progress"] > 0)

    # Kill only the pool process running the task, as the OOM killer would; the worker's parent survives and
    # gets the task back at once, but the job is leased until the dead process's lease expires.
    with session_scope(stack.settings.database_url) as session:
        owner = session.scalar(select(Job.lease_owner).where(Job.id == job_id))
    os.kill(int(owner.split(":")[1]), signal.SIGKILL)

    job = stack.wait_for(erin, job_id, lambda j: j["status"] in FINISHED, timeout=120)
    assert job["status"] == "succeeded", (job, stack.worker_log.read_text()[-3000:])
    assert any(m.startswith("restarted after an interruption") for m in messages(stack, erin, job_id))
    assert [lease.epoch for lease in lease_history(stack, job_id)] == [1, 2]
