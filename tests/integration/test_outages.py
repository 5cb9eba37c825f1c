"""Dependencies going down for real: a private PostgreSQL cluster and a private Redis (no persistence) that the
test starts itself, stops and starts again, so that the shared servers (and other tests) are not disturbed.
The API answers 503 JSON meanwhile, and jobs running or queued at the time still succeed."""

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.db.session import session_scope
from app.embedded import start_worker, stop_worker
from app.main import create_app
from app.services.auth import create_api_key, get_or_create_tenant
from app.services.demo import DEMO_FILE
from app.settings import Settings
from tests.integration.conftest import FINISHED
from tests.integration.flow_helpers import tiny_spec
from tests.servers import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.integration


class Servers:
    """The private database and broker servers of one test; `down()` stops both, `up()` starts both again."""

    def __init__(self) -> None:
        self.postgres = PrivatePostgres()
        self.redis = PrivateRedis()

    def up(self) -> None:
        self.postgres.start()
        self.redis.start()

    def down(self) -> None:
        self.postgres.stop()
        self.redis.stop()

    def remove(self) -> None:
        self.postgres.remove()
        self.redis.remove()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Servers, Settings]]:
    servers = Servers()
    try:
        servers.up()
        settings = Settings(
            home=tmp_path,
            database_url=servers.postgres.url,
            broker_url=servers.redis.url,
            artifacts_url=str(tmp_path / "artifacts"),
            api_retry_max_s=0.5,
            lease_s=5.0,
            requeue_after_s=4.0,
            checkpoint_sync_s=0.0,
        )
        yield servers, settings
    finally:
        servers.remove()


def bearer(settings: Settings, name: str) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        _, token = create_api_key(session, tenant=get_or_create_tenant(session, name=name))
    return {"Authorization": f"Bearer {token}"}


def wait_until(check: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"; worker log:\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.2)
    return result


def test_api_answers_503_json_while_the_database_is_down(servers):
    private, settings = servers
    with TestClient(create_app(settings)) as client:
        headers = bearer(settings, f"gail-{secrets.token_hex(3)}")
        assert client.get("/v1/jobs", headers=headers).status_code == 200

        private.down()
        for response in (
            client.get("/v1/jobs", headers=headers),
            client.get("/v1/datasets", headers=headers),
            client.post("/v1/jobs", headers=headers, json={"name": "x"}),
        ):
            assert response.status_code in (503, 422), response.text
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "database_unavailable"
                assert response.headers["Retry-After"]
        assert client.get("/v1/jobs", headers=headers).json()["error"]["code"] == "database_unavailable"
        assert client.get("/readyz").status_code == 503

        private.up()
        wait_until(lambda: client.get("/v1/jobs", headers=headers).status_code == 200, 30, "the API to recover")


def test_running_and_queued_jobs_survive_database_and_broker_restarts(servers, tiny_base, tmp_path):
    private, settings = servers
    log_path = tmp_path / "worker.log"
    with TestClient(create_app(settings)) as client:
        headers = bearer(settings, f"hank-{secrets.token_hex(3)}")
        files = {"file": ("demo.jsonl", DEMO_FILE.read_bytes())}
        assert client.post("/v1/datasets", headers=headers, files=files, data={"name": "demo"}).status_code == 201
        worker = start_worker(settings, log_path=log_path, extra_env={"OMP_NUM_THREADS": "1"})
        try:
            # 400 steps (30 an epoch): still training when the servers go down, even on a fast host.
            teacher = {"name": "long", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "epochs": 50}
            teacher["max_steps"] = 400
            spec = tiny_spec(tiny_base, name="survivor", variants=["kd"], teachers=[teacher], checkpoint_every=10)
            spec["data"] = {"train": "demo", "eval": "demo"}
            running = client.post("/v1/jobs", headers=headers, json=spec).json()["id"]

            def job(job_id: str) -> dict[str, Any]:
                return client.get(f"/v1/jobs/{job_id}", headers=headers).json()

            wait_until(lambda: job(running)["progress"] > 0, 90, "the first job to make progress", log_path)
            queued = client.post("/v1/jobs", headers=headers, json=spec | {"name": "waiting"}).json()["id"]
            broker = redis.Redis.from_url(settings.broker_url)
            assert broker.dbsize() > 0, "the queued job's message is not in Redis"
            broker.close()
            assert job(running)["status"] == "running" and job(queued)["status"] == "queued"

            # Both servers restart: PostgreSQL drops every connection, Redis comes back empty.
            private.down()
            assert client.get("/readyz").status_code == 503
            private.up()
            broker = redis.Redis.from_url(settings.broker_url)
            assert broker.dbsize() == 0, "Redis kept its messages over the restart"
            broker.close()

            for job_id in (running, queued):
                finished = wait_until(
                    lambda job_id=job_id: (j := job(job_id)).get("status") in FINISHED and j, 180, "the jobs", log_path
                )
                assert finished["status"] == "succeeded", (finished, log_path.read_text()[-4000:])
            assert worker.poll() is None, "the worker exited during the outage"
        finally:
            stop_worker(worker, timeout=15)
