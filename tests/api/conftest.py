"""API tests: the real application on a fresh PostgreSQL database and a private Redis broker, no worker."""

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.db.session import session_scope
from app.main import create_app
from app.services.auth import create_api_key, get_or_create_tenant
from app.settings import Settings
from tests.broker import private_broker
from tests.pg import fresh_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of this test session alone, dropped at the end."""
    with fresh_database("qadistill_api") as url:
        yield url


def drop_broker_keys(settings: Settings) -> None:
    """Remove this session's keys from the shared Redis server."""
    client = redis.Redis.from_url(settings.broker_url)
    keys = list(client.scan_iter(f"{settings.broker_key_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def settings(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings on the session's database, a private Redis database and key prefix, temp artifacts."""
    home = tmp_path_factory.mktemp("home")
    settings = Settings(
        home=home,
        database_url=pg_url,
        **private_broker("qadistill-test"),
        artifacts_url=str(home / "artifacts"),
        max_upload_bytes=64 * 1024,
    )
    yield settings
    drop_broker_keys(settings)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of the application (its lifespan migrates the database)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@dataclass
class Caller:
    """A tenant and a Bearer header carrying one of its API keys."""

    tenant_id: str
    headers: dict[str, str]


def make_caller(settings: Settings, name: str) -> Caller:
    """A tenant called `name` with a fresh API key."""
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, name=name)
        _, token = create_api_key(session, tenant=tenant)
        tenant_id = tenant.id
    return Caller(tenant_id=tenant_id, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def alice(client: TestClient, settings: Settings) -> Caller:
    """A fresh tenant of its own for each test."""
    return make_caller(settings, f"alice-{secrets.token_hex(4)}")


@pytest.fixture
def bob(client: TestClient, settings: Settings) -> Caller:
    """Another tenant, to check isolation."""
    return make_caller(settings, f"bob-{secrets.token_hex(4)}")


@pytest.fixture
def stored_files(settings: Settings) -> Callable[[], list[Path]]:
    """Lists every file in the artifact store."""

    def list_files() -> list[Path]:
        root = Path(settings.artifacts_url)
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    return list_files


def _jsonl(rows: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def pairs_jsonl() -> Callable[..., bytes]:
    """Builds a small labelled JSONL file: `questions` questions with 3 passages each, one relevant."""

    def build(questions: int = 4, tag: str = "") -> bytes:
        rows = [
            {
                "qid": f"q{q}",
                "question": f"what is thing {q}{tag}?",
                "passage": f"passage {p} about thing {q}{tag}",
                "label": int(p == 0),
            }
            for q in range(questions)
            for p in range(3)
        ]
        return _jsonl(rows)

    return build


@pytest.fixture
def upload(client: TestClient) -> Callable[..., Any]:
    """Uploads bytes as a dataset for a caller; returns the response."""

    def send(caller: Caller, content: bytes, filename: str = "pairs.jsonl", **fields: str) -> Any:
        return client.post("/v1/datasets", headers=caller.headers, files={"file": (filename, content)}, data=fields)

    return send


@pytest.fixture
def datasets(alice: Caller, upload: Callable[..., Any], pairs_jsonl: Callable[..., bytes]) -> dict[str, Any]:
    """A labelled `train` and `eval` and an unlabelled `pool` dataset of alice's."""
    train = upload(alice, pairs_jsonl(4, "t"), name="train").json()
    evaluation = upload(alice, pairs_jsonl(3, "e"), name="eval").json()
    pool = upload(alice, b"question,passage\nwho?,me\nwhy?,because\n", "pool.csv").json()
    return {"train": train, "eval": evaluation, "pool": pool}
