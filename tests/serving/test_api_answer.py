"""`POST /v1/models/{name}/answer` through the whole application (embedded mode: SQLite, local artifacts)."""

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.db.migrate import upgrade_database
from app.db.models import ModelVersion
from app.db.session import session_scope
from app.distill.data import Pair
from app.distill.export import load_ensemble
from app.main import create_app
from app.services import registry
from app.services.auth import create_api_key, get_or_create_tenant, revoke_api_key
from app.settings import Settings
from tests.serving.conftest import build_tiny_ensemble

METRICS_KEY = "metrics-key-for-tests"
LIMITS = {"max_passages": 12, "max_passage_chars": 300, "max_question_chars": 120, "max_request_bytes": 8000}


def make_settings(home: Path, **overrides: object) -> Settings:
    options = {"serve_device": "cpu", "serve_threads": 1, **LIMITS} | overrides
    return Settings(home=home, **options)


def make_caller(settings: Settings) -> tuple[str, dict[str, str]]:
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, name=f"t-{secrets.token_hex(4)}")
        _, token = create_api_key(session, tenant=tenant)
        return tenant.id, {"Authorization": f"Bearer {token}"}


def register(settings: Settings, tenant_id: str, name: str, folders: list[Path]) -> None:
    """Register each folder as the next version of `name` (what a finished job does)."""
    with session_scope(settings.database_url) as session:
        for number, folder in enumerate(folders, start=1):
            session.add(
                ModelVersion(tenant_id=tenant_id, name=name, version=number, artifact_uri=str(folder), metrics={})
            )
        session.commit()


@pytest.fixture(scope="module")
def second_ensemble(tmp_path_factory: pytest.TempPathFactory, train_pairs: list[Pair]) -> Path:
    """Another tiny ensemble (other seed, one member): version 2, distinguishable from version 1."""
    folder = tmp_path_factory.mktemp("ensembles") / "second"
    return build_tiny_ensemble(folder, train_pairs, members=1, seed=1)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("home"), metrics_key=METRICS_KEY)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def caller(client: TestClient, settings: Settings, tiny_ensemble: Path, second_ensemble: Path) -> dict[str, str]:
    """A tenant whose model `qa` has versions 1 (tiny_ensemble) and 2 (second_ensemble)."""
    tenant_id, headers = make_caller(settings)
    register(settings, tenant_id, "qa", [tiny_ensemble, second_ensemble])
    return headers


def ask(client: TestClient, headers: dict[str, str], ref: str, **body: object) -> httpx.Response:
    default = {"question": "how are glacier caves formed ?", "passages": ["ice melts", "a cave in a glacier"]}
    body = default | body
    return client.post(f"/v1/models/{ref}/answer", headers=headers, json=body)


def test_answer_ranks_passages_by_the_ensembles_score(
    client: TestClient, caller: dict[str, str], tiny_ensemble: Path, eval_pairs: list[Pair]
) -> None:
    question = eval_pairs[0].question
    passages = [p.passage for p in eval_pairs if p.qid == eval_pairs[0].qid]
    expected = load_ensemble(tiny_ensemble).score_pairs([question] * len(passages), passages).scores

    response = ask(client, caller, "qa:1", question=question, passages=passages, top_k=3, explain=True)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "qa", "version": 1}
    assert [a["index"] for a in body["answers"]] == list(np.argsort(-expected, kind="stable")[:3])
    assert [a["passage"] for a in body["answers"]] == [passages[a["index"]] for a in body["answers"]]
    np.testing.assert_allclose([a["score"] for a in body["answers"]], np.sort(expected)[::-1][:3], atol=1e-5)
    assert len(body["answers"][0]["members"]) == 2
    assert set(body["answers"][0]["heads"]) == {"teacher-a", "teacher-b"}
    assert body["took_ms"] > 0
    plain = ask(client, caller, "qa:1", question=question, passages=passages, include_passages=False).json()
    assert all(set(a) == {"index", "score"} for a in plain["answers"])
    assert client.get("/readyz").json()["models_loaded"] == 1
    scraped = client.get("/metrics").text
    assert "qadistill_answer_latency_seconds_count" in scraped and 'model="' not in scraped, "no model names"


def test_metrics_by_model_and_version_only_with_the_metrics_key(client: TestClient, caller: dict[str, str]) -> None:
    assert ask(client, caller, "qa:1").status_code == 200
    latency = 'qadistill_model_answer_latency_seconds_count{model="qa",version="1"}'
    for headers in ({}, caller, {"Authorization": "Bearer wrong"}):  # no key, a tenant's key, a wrong one
        scraped = client.get("/metrics", headers=headers).text
        assert latency not in scraped and 'model="' not in scraped
        assert "qadistill_model_load_seconds_count" in scraped and "qadistill_model_cache_bytes " in scraped
        assert "qadistill_model_cache_evictions_total" in scraped
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    assert latency in scraped, scraped[-2000:]


def test_alias_promotion_and_rollback_switch_the_answering_version(client: TestClient, caller: dict[str, str]) -> None:
    assert ask(client, caller, "qa").json()["model"]["version"] == 2, "no production alias: the latest"
    v2_scores = [a["score"] for a in ask(client, caller, "qa").json()["answers"]]

    promoted = client.put("/v1/models/qa/aliases/production", headers=caller, json={"version": 1})
    assert promoted.status_code == 200, promoted.text
    v1 = ask(client, caller, "qa").json()
    assert v1["model"]["version"] == 1
    assert [a["score"] for a in v1["answers"]] != v2_scores
    assert ask(client, caller, "qa@production").json()["model"]["version"] == 1

    client.put("/v1/models/qa/aliases/production", headers=caller, json={"version": 2})
    assert ask(client, caller, "qa").json()["model"]["version"] == 2
    assert ask(client, caller, "qa:1").json()["model"]["version"] == 1


def test_changes_made_by_another_process_are_seen_within_the_lookup_ttl(
    tmp_path: Path, tiny_ensemble: Path, second_ensemble: Path
) -> None:
    settings = make_settings(tmp_path, serve_lookup_ttl_s=0.2)
    with TestClient(create_app(settings)) as client:
        tenant_id, headers = make_caller(settings)
        register(settings, tenant_id, "qa", [tiny_ensemble, second_ensemble])
        assert ask(client, headers, "qa").json()["model"]["version"] == 2

        # Another API process promotes version 1, then the key is revoked from the command line.
        with session_scope(settings.database_url) as session:
            registry.set_alias(session, tenant_id=tenant_id, name="qa", alias="production", version=1)
        assert eventually(lambda: ask(client, headers, "qa").json()["model"]["version"] == 1)
        with session_scope(settings.database_url) as session:
            revoke_api_key(session, key_or_prefix=headers["Authorization"].removeprefix("Bearer "))
            session.commit()
        assert eventually(lambda: ask(client, headers, "qa").status_code == 401)


def eventually(check: Callable[[], bool], within_s: float = 2.0) -> bool:
    """Whether `check` becomes true within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"passages": ["p"] * 13}, "passages"),
        ({"passages": ["short", "x" * 301]}, "passages.1"),
        ({"question": "q" * 121}, "question"),
        ({"passages": []}, "passages"),
        ({"top_k": 0}, "top_k"),
        ({"passages": ["p" * 299] * 12, "question": "y" * 120, "pad": "z" * 5000}, "body"),
    ],
)
def test_limits_give_422_naming_the_field(client: TestClient, caller: dict[str, str], body: dict, param: str) -> None:
    response = ask(client, caller, "qa", **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("ref", ["nope", "qa:9", "qa@staging", "qa:x"])
def test_unknown_model_or_version_gives_404(client: TestClient, caller: dict[str, str], ref: str) -> None:
    response = ask(client, caller, ref)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_other_tenants_models_are_not_found(client: TestClient, caller: dict[str, str], settings: Settings) -> None:
    _, stranger = make_caller(settings)
    assert ask(client, stranger, "qa:1").status_code == 404


def test_full_queue_gives_503_with_retry_after(tmp_path: Path, tiny_ensemble: Path) -> None:
    settings = make_settings(tmp_path, serve_max_queue=1, max_passages=400, max_request_bytes=10**6)
    app = create_app(settings)
    upgrade_database(settings.database_url)
    tenant_id, headers = make_caller(settings)
    register(settings, tenant_id, "busy", [tiny_ensemble])
    big = {"question": "what keeps the model busy ?", "passages": [f"passage {i} " * 25 for i in range(400)]}
    small = {"question": "and me ?", "passages": ["a", "b"]}

    async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers, timeout=30) as http,
        ):
            assert (await http.post("/v1/models/busy/answer", json=small)).status_code == 200  # loads it
            running = asyncio.ensure_future(http.post("/v1/models/busy/answer", json=big))
            await asyncio.sleep(0.05)
            asks = [http.post("/v1/models/busy/answer", json=small) for _ in range(6)]
            others = await asyncio.gather(*asks)
            return await running, others

    first, others = asyncio.run(scenario())
    assert first.status_code == 200
    refused = [r for r in others if r.status_code == 503]
    assert refused, "with a queue of one, most of six questions behind a long batch must be refused"
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert refused[0].json()["error"]["code"] == "overloaded"
    assert all(r.status_code in (200, 503) for r in others)


def test_a_version_whose_artifact_is_gone_gives_an_error_naming_it(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    tenant_id, headers = make_caller(settings)
    register(settings, tenant_id, "gone", [tmp_path / "deleted"])
    response = ask(client, headers, "gone")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "model_unavailable" and "gone:1" in error["message"]
