"""Routing rules on SQLite: which queue a device goes to given the live workers, what counts as live, the waiting
mark and its removal, the default queues of a host, and `qadistill worker -Q` checked."""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app.cli import cli
from app.db.base import utcnow
from app.db.migrate import upgrade_database
from app.db.models import Job, JobEvent, Tenant, WorkerBeat
from app.db.session import session_scope
from app.services import routing
from app.services.reconcile import record_worker, sweep_jobs
from app.services.routing import LiveWorkers, live_workers, note_availability, queue_for

NONE = LiveWorkers(frozenset(), False)
CPU_ONLY = LiveWorkers(frozenset({"cpu"}), False)
WITH_GPU = LiveWorkers(frozenset({"cpu", "gpu"}), True)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'routing.db'}"
    upgrade_database(url)
    with session_scope(url) as session:
        yield session


def queued_job(session: Session, device: str, queue: str | None) -> Job:
    tenant = Tenant(name=f"t-{device}-{queue}")
    session.add(tenant)
    session.flush()
    job = Job(tenant_id=tenant.id, name="j", spec={"device": device}, request_sha256="0" * 64, queue=queue)
    session.add(job)
    session.commit()
    return job


def test_queue_for_each_device():
    assert [queue_for(d, CPU_ONLY) for d in ("cuda", "cpu", "auto")] == ["gpu", "cpu", "cpu"]
    assert [queue_for(d, WITH_GPU) for d in ("cuda", "cpu", "auto")] == ["gpu", "cpu", "gpu"]
    # A worker consuming `gpu` without a GPU does not draw `auto` jobs there.
    assert queue_for("auto", LiveWorkers(frozenset({"gpu"}), False)) == "cpu"
    assert queue_for("auto", NONE) == "cpu"


def test_live_workers_are_those_that_reported_within_three_leases(session):
    record_worker(session, name="cpu-host:1", gpu=False, queues=["cpu"])
    record_worker(session, name="gpu-host:1", gpu=True, queues=["gpu"])
    assert live_workers(session, lease_s=30) == WITH_GPU
    silent = utcnow() - timedelta(seconds=91)
    session.execute(update(WorkerBeat).where(WorkerBeat.name == "gpu-host:1").values(last_seen=silent))
    session.commit()
    assert live_workers(session, lease_s=30) == CPU_ONLY
    # A host with a GPU whose worker consumes only `cpu` is no GPU worker.
    record_worker(session, name="gpu-host:2", gpu=True, queues=["cpu"])
    assert live_workers(session, lease_s=30) == CPU_ONLY


def test_waiting_is_marked_once_and_cleared_when_a_worker_appears(session):
    job = queued_job(session, "cuda", "gpu")
    for _ in range(2):
        note_availability(session, job, CPU_ONLY)
    session.refresh(job)
    assert job.stage == "waiting_for_gpu_worker"
    note_availability(session, job, WITH_GPU)
    session.refresh(job)
    events = [(e.stage, e.level) for e in session.query(JobEvent).filter_by(job_id=job.id).order_by(JobEvent.id)]
    assert (job.stage, events) == ("queued", [("waiting_for_gpu_worker", "warning"), ("queued", "info")])


def test_the_sweep_marks_a_job_nobody_takes_and_moves_a_stranded_auto_job(session):
    record_worker(session, name="cpu-host:1", gpu=False, queues=["cpu"])
    cuda = queued_job(session, "cuda", "gpu")
    auto = queued_job(session, "auto", "gpu")  # sent while a GPU worker was alive; it is gone
    cpu = queued_job(session, "cpu", "cpu")
    sweep = sweep_jobs(session, lease_s=30, max_takeovers=3, requeue_after_s=300)
    assert sweep.resend == [(auto.id, "cpu")]
    for job in (cuda, auto, cpu):
        session.refresh(job)
    stages = {j.id: (j.queue, j.stage) for j in (cuda, auto, cpu)}
    assert stages == {
        cuda.id: ("gpu", "waiting_for_gpu_worker"),
        auto.id: ("cpu", None),
        cpu.id: ("cpu", None),
    }


def test_default_queues_follow_the_hardware(monkeypatch):
    monkeypatch.setattr(routing, "has_gpu", lambda: True)
    assert (routing.default_queues(), routing.embedded_queues()) == ("gpu", "gpu,cpu")
    monkeypatch.setattr(routing, "has_gpu", lambda: False)
    assert (routing.default_queues(), routing.embedded_queues()) == ("cpu", "cpu")


def test_no_gpu_when_cuda_visible_devices_hides_them(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert routing.has_gpu() is False


def test_worker_refuses_an_unknown_queue():
    result = CliRunner().invoke(cli, ["worker", "-Q", "gpu,default"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # the error box may wrap the line
    assert "'gpu,default': each queue must be one of gpu, cpu" in text, result.output


def test_an_auto_job_moved_to_a_live_queue_waits_no_more(session):
    # Sent to cpu while no worker was alive, it waited for a CPU worker; then a GPU worker reports in.
    job = queued_job(session, "auto", "cpu")
    note_availability(session, job, NONE)
    session.refresh(job)
    assert job.stage == "waiting_for_cpu_worker"
    record_worker(session, name="gpu-host:1", gpu=True, queues=["gpu"])
    assert sweep_jobs(session, lease_s=30, max_takeovers=3, requeue_after_s=300).resend == [(job.id, "gpu")]
    session.refresh(job)
    assert (job.queue, job.stage) == ("gpu", "queued")
