"""Integration set-up: the API in-process and a real Celery worker process, on two stacks.

`postgres`: a fresh PostgreSQL database and a private Redis database and key prefix (production's servers).
`embedded`: SQLite and the SQLAlchemy kombu transport in a temp folder, as `qadistill run` uses.
"""

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.db.session import session_scope
from app.embedded import start_worker, stop_worker
from app.main import create_app
from app.services.auth import create_api_key, get_or_create_tenant
from app.settings import Settings
from tests.broker import private_broker
from tests.pg import fresh_database
from tests.unit.helpers import make_tiny_base

FINISHED = ("succeeded", "failed", "cancelled")

# The tiny test models live in pytest's temp folders: allow job specs to name folders there (here and in the
# `qadistill run` subprocesses, which inherit the environment).
os.environ["QADISTILL_MODEL_DIRS"] = json.dumps([tempfile.gettempdir()])


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BERT folder: ready-made teachers and the student's source, fast on CPU."""
    return make_tiny_base(tmp_path_factory.mktemp("models"))


@dataclass
class Caller:
    """A tenant and a Bearer header carrying one of its API keys."""

    tenant_id: str
    headers: dict[str, str]


@dataclass
class Stack:
    """A running API client and worker on one set of settings."""

    kind: str
    settings: Settings
    client: TestClient
    worker: subprocess.Popen[bytes]
    worker_log: Path

    def caller(self, name: str) -> Caller:
        """A tenant called `name` with a fresh API key."""
        with session_scope(self.settings.database_url) as session:
            tenant = get_or_create_tenant(session, name=name)
            _, token = create_api_key(session, tenant=tenant)
            tenant_id = tenant.id
        return Caller(tenant_id=tenant_id, headers={"Authorization": f"Bearer {token}"})

    def wait_for(self, caller: Caller, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 90):
        """Poll the job until `done(job)`; fails with the worker's log if it takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}", headers=caller.headers).json()
            if done(job):
                return job
            assert self.worker.poll() is None, f"worker died:\n{self.worker_log.read_text()[-4000:]}"
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} stuck at {job}; worker log:\n{self.worker_log.read_text()[-4000:]}")
            time.sleep(0.3)


def _postgres_settings(home: Path, **overrides: Any) -> Iterator[Settings]:
    with fresh_database("qadistill_it") as database_url:
        options = {"artifacts_url": str(home / "artifacts"), **overrides}
        settings = Settings(home=home, database_url=database_url, **private_broker("qadistill-it"), **options)
        try:
            yield settings
        finally:
            broker = redis.Redis.from_url(settings.broker_url)
            keys = list(broker.scan_iter(f"{settings.broker_key_prefix}*"))
            if keys:
                broker.delete(*keys)
            broker.close()


def _embedded_settings(home: Path, **overrides: Any) -> Iterator[Settings]:
    yield Settings(home=home, **overrides)


def _run_stack(kind: str, home: Path, **overrides: Any) -> Iterator[Stack]:
    make_settings = _postgres_settings if kind == "postgres" else _embedded_settings
    for settings in make_settings(home, **overrides):
        log_path = home / "worker.log"
        # The app's lifespan migrates first, so the worker finds the schema ready.
        with TestClient(create_app(settings)) as client:
            worker = start_worker(settings, log_path=log_path, extra_env={"OMP_NUM_THREADS": "1"})
            try:
                yield Stack(kind, settings, client, worker, log_path)
            finally:
                stop_worker(worker, timeout=15)


@pytest.fixture(scope="module", params=["postgres", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API and a real worker process (prefork pool, one child) on the `postgres` or `embedded` stack."""
    yield from _run_stack(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def postgres_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The production stack alone (PostgreSQL and Redis), for the slower fault-tolerance checks."""
    yield from _run_stack("postgres", tmp_path_factory.mktemp("postgres"))
