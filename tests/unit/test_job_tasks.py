"""The leases of a job's parallel tasks (its teachers) and of the queue between two steps of a run, on SQLite."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from app.db.migrate import upgrade_database
from app.db.models import Job, JobEvent, Tenant
from app.db.session import session_scope
from app.services import job_runs
from app.services.job_runs import QUEUE_HOLDER, LeaseLost
from app.services.reconcile import sweep_jobs

TEACHERS = ["teacher:t1", "teacher:t2"]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    with session_scope(url) as session:
        yield session


@pytest.fixture
def job_id(session: Session) -> str:
    tenant = Tenant(name="tia")
    session.add(tenant)
    session.flush()
    job = Job(tenant_id=tenant.id, name="j", spec={}, request_sha256="0" * 64)
    session.add(job)
    session.commit()
    return job.id


def claim(session: Session, job_id: str) -> job_runs.Lease:
    claimed = job_runs.claim_job(session, job_id=job_id, worker="w:1:a", lease_s=30, max_takeovers=3)
    assert claimed is not None
    return claimed[1]


def test_each_teacher_is_taken_once_per_run_and_the_last_one_done_says_so(session, job_id):
    lease = claim(session, job_id)
    job_runs.hand_to_queue(session, lease=lease, hold_s=30)
    assert session.get(Job, job_id).lease_owner == QUEUE_HOLDER

    t1 = job_runs.claim_task(session, job_id=job_id, epoch=1, task="teacher:t1", worker="w:2:b", lease_s=30)
    assert t1 is not None
    assert job_runs.claim_task(session, job_id=job_id, epoch=1, task="teacher:t1", worker="w:3:c", lease_s=30) is None
    t2 = job_runs.claim_task(session, job_id=job_id, epoch=1, task="teacher:t2", worker="w:3:c", lease_s=30)
    assert t2 is not None
    job_runs.renew_lease(session, lease=t1[1], lease_s=30)
    assert session.get(Job, job_id).lease_owner == "w:2:b"  # a running teacher keeps the job's lease alive

    assert not job_runs.finish_task(session, lease=t2[1], tasks=TEACHERS, hold_s=30)
    assert session.get(Job, job_id).lease_owner == "w:2:b"  # t1 still runs: it keeps the lease
    assert job_runs.finish_task(session, lease=t1[1], tasks=TEACHERS, hold_s=30)
    assert session.get(Job, job_id).lease_owner == QUEUE_HOLDER
    with pytest.raises(LeaseLost):
        job_runs.renew_lease(session, lease=t1[1], lease_s=30)  # a finished task holds nothing any more

    finish = job_runs.take_from_queue(session, job_id=job_id, epoch=1, worker="w:4:d", lease_s=30)
    assert finish is not None
    assert job_runs.take_from_queue(session, job_id=job_id, epoch=1, worker="w:5:e", lease_s=30) is None


def test_tasks_the_broker_lost_between_steps_are_sent_again_without_a_takeover(session, job_id):
    lease = claim(session, job_id)
    job_runs.hand_to_queue(session, lease=lease, hold_s=0.01)
    time.sleep(0.05)  # the queue's hold runs out: no teacher task ever started

    sweep = sweep_jobs(session, lease_s=0.01, max_takeovers=3, requeue_after_s=300)
    assert sweep.resend == [(job_id, "cpu")]
    lease = claim(session, job_id)
    job = session.get(Job, job_id)
    assert (lease.epoch, job.takeovers) == (2, 0)
    messages = [e.message for e in session.query(JobEvent).filter_by(job_id=job_id)]
    assert messages[-1].endswith("its next tasks were not picked up (sent again)")
    # The old run's tasks, delivered late, find the job moved on.
    assert job_runs.claim_task(session, job_id=job_id, epoch=1, task="teacher:t1", worker="w:2:b", lease_s=30) is None


def test_a_teacher_lost_with_its_worker_is_taken_over_by_the_next_run_and_counted(session, job_id):
    lease = claim(session, job_id)
    job_runs.hand_to_queue(session, lease=lease, hold_s=30)
    lost = job_runs.claim_task(session, job_id=job_id, epoch=1, task="teacher:t1", worker="w:2:b", lease_s=30)
    done = job_runs.claim_task(session, job_id=job_id, epoch=1, task="teacher:t2", worker="w:3:c", lease_s=30)
    assert lost is not None and done is not None
    # t2 ends last owner of the job's lease and hands it to the queue; t1's worker is gone for good.
    job_runs.renew_lease(session, lease=done[1], lease_s=30)
    assert not job_runs.finish_task(session, lease=done[1], tasks=TEACHERS, hold_s=0.01)
    time.sleep(0.05)
    # Redelivered to a live worker in the same run, the lost task is not taken: the next run takes it over.
    assert job_runs.claim_task(session, job_id=job_id, epoch=1, task="teacher:t1", worker="w:4:d", lease_s=30) is None

    assert sweep_jobs(session, lease_s=0.01, max_takeovers=3, requeue_after_s=300).resend == [(job_id, "cpu")]
    lease = claim(session, job_id)
    assert (lease.epoch, session.get(Job, job_id).takeovers) == (2, 1)
    assert job_runs.claim_task(session, job_id=job_id, epoch=2, task="teacher:t1", worker="w:4:d", lease_s=30)
    assert job_runs.claim_task(session, job_id=job_id, epoch=2, task="teacher:t2", worker="w:5:e", lease_s=30)


def test_a_job_cancelled_while_its_tasks_wait_in_the_broker_ends_cancelled(session, job_id):
    lease = claim(session, job_id)
    job_runs.hand_to_queue(session, lease=lease, hold_s=300)
    job = session.get(Job, job_id)
    job.cancel_requested, job.status = True, "cancelling"
    session.commit()

    assert sweep_jobs(session, lease_s=30, max_takeovers=3, requeue_after_s=300).ended == [(job.tenant_id, job_id)]
    session.refresh(job)
    assert job.status == "cancelled"
