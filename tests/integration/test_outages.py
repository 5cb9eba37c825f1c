"""Dependencies going down: PostgreSQL and Redis behind TCP proxies that the test stops and starts again, so
that the shared servers (and other tests) are not disturbed. The API answers 503 JSON meanwhile, and jobs
running or queued at the time still succeed."""

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.db.session import session_scope
from app.embedded import start_worker, stop_worker
from app.main import create_app
from app.services.auth import create_api_key, get_or_create_tenant
from app.services.demo import DEMO_FILE
from app.settings import Settings
from tests.broker import private_broker
from tests.integration.conftest import FINISHED
from tests.integration.flow_helpers import tiny_spec
from tests.pg import fresh_database
from tests.proxy import TcpProxy

pytestmark = pytest.mark.integration


class Outage:
    """A database and a Redis database reachable only through proxies; `down()` and `up()` toggle both."""

    def __init__(self, database_url: str, broker: dict[str, str]) -> None:
        db = make_url(database_url)
        self.real_database_url, self.real_broker_url = database_url, broker["broker_url"]
        self.db_proxy = TcpProxy(db.host or "127.0.0.1", db.port or 5432)
        broker_url = make_url(broker["broker_url"])
        self.redis_proxy = TcpProxy(broker_url.host or "127.0.0.1", broker_url.port or 6379)
        self.database_url = self.db_proxy.url_for(database_url)
        self.broker_url = self.redis_proxy.url_for(broker["broker_url"])
        self.key_prefix = broker["broker_key_prefix"]

    def up(self) -> None:
        self.db_proxy.start()
        self.redis_proxy.start()

    def down(self, *, lose_broker_messages: bool = False) -> None:
        self.db_proxy.stop()
        self.redis_proxy.stop()
        if lose_broker_messages:  # as Redis restarted without persistence does
            direct = redis.Redis.from_url(self.real_broker_url)
            keys = list(direct.scan_iter(f"{self.key_prefix}*"))
            if keys:
                direct.delete(*keys)
            direct.close()


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[tuple[Outage, Settings]]:
    with fresh_database("qadistill_out") as database_url:
        broker = private_broker("qadistill-out")
        outage = Outage(database_url, broker)
        outage.up()
        settings = Settings(
            home=tmp_path,
            database_url=outage.database_url,
            broker_url=outage.broker_url,
            broker_key_prefix=broker["broker_key_prefix"],
            artifacts_url=str(tmp_path / "artifacts"),
            api_retry_max_s=0.5,
            lease_s=5.0,
            requeue_after_s=4.0,
            checkpoint_sync_s=0.0,
        )
        try:
            yield outage, settings
        finally:
            outage.down(lose_broker_messages=True)


def bearer(settings: Settings, name: str) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        _, token = create_api_key(session, tenant=get_or_create_tenant(session, name=name))
    return {"Authorization": f"Bearer {token}"}


def test_api_answers_503_json_while_the_database_is_down(outage):
    proxies, settings = outage
    with TestClient(create_app(settings)) as client:
        headers = bearer(settings, f"gail-{secrets.token_hex(3)}")
        assert client.get("/v1/jobs", headers=headers).status_code == 200

        proxies.down()
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

        proxies.up()
        assert client.get("/v1/jobs", headers=headers).status_code == 200


def _wait(client: TestClient, headers: dict[str, str], job_id: str, timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}", headers=headers)
        if response.status_code == 200 and response.json()["status"] in FINISHED:
            return response.json()
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} stuck at {response.text}; worker log:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


def test_running_and_queued_jobs_survive_database_and_broker_restarts(outage, tiny_base, tmp_path):
    proxies, settings = outage
    log_path = tmp_path / "worker.log"
    with TestClient(create_app(settings)) as client:
        headers = bearer(settings, f"hank-{secrets.token_hex(3)}")
        files = {"file": ("demo.jsonl", DEMO_FILE.read_bytes())}
        assert client.post("/v1/datasets", headers=headers, files=files, data={"name": "demo"}).status_code == 201
        worker = start_worker(settings, log_path=log_path, extra_env={"OMP_NUM_THREADS": "1"})
        try:
            teacher = {"name": "long", "base": str(tiny_base), "max_length": 32, "batch_size": 4, "max_steps": 60}
            spec = tiny_spec(tiny_base, name="survivor", variants=["kd"], teachers=[teacher], checkpoint_every=10)
            spec["data"] = {"train": "demo", "eval": "demo"}
            running = client.post("/v1/jobs", headers=headers, json=spec).json()["id"]
            deadline = time.monotonic() + 90
            while not client.get(f"/v1/jobs/{running}", headers=headers).json()["progress"] > 0:
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.2)
            queued = client.post("/v1/jobs", headers=headers, json=spec | {"name": "waiting"}).json()["id"]

            proxies.down(lose_broker_messages=True)
            time.sleep(2)  # the outage itself: how long the servers stay down, not a wait for an event
            proxies.up()

            for job_id in (running, queued):
                job = _wait(client, headers, job_id, 180, log_path)
                assert job["status"] == "succeeded", (job, log_path.read_text()[-4000:])
        finally:
            stop_worker(worker, timeout=15)
