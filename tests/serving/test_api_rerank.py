"""Cohere's `/v2/rerank` and `/v1/rerank` and TEI's `/rerank` through the whole application (embedded mode)."""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.rerank_cohere import render_cohere_error
from app.api.rerank_tei import render_tei_error
from app.distill.data import Pair
from app.main import create_app
from app.services.errors import ApiError
from app.settings import Settings
from tests.serving.test_api_answer import make_caller, make_settings, register

QUERY = "how are glacier caves formed ?"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("home"), rerank_model="qa")


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def caller(client: TestClient, settings: Settings, tiny_ensemble: Path) -> dict[str, str]:
    """A tenant whose model `qa` has one version (tiny_ensemble)."""
    tenant_id, headers = make_caller(settings)
    register(settings, tenant_id, "qa", [tiny_ensemble])
    return headers


@pytest.fixture(scope="module")
def documents(eval_pairs: list[Pair]) -> tuple[str, list[str]]:
    """A real question and its candidate passages (fewer than the test limit of 12)."""
    question = eval_pairs[0].question
    return question, [p.passage for p in eval_pairs if p.qid == eval_pairs[0].qid][:12]


def answered(client: TestClient, headers: dict[str, str], question: str, passages: list[str]) -> list[dict]:
    response = client.post("/v1/models/qa/answer", headers=headers, json={"question": question, "passages": passages})
    assert response.status_code == 200, response.text
    return response.json()["answers"]


def test_cohere_v2_ranks_as_the_answer_route(
    client: TestClient, caller: dict[str, str], documents: tuple[str, list[str]]
) -> None:
    question, passages = documents
    expected = answered(client, caller, question, passages)

    response = client.post(
        "/v2/rerank", headers=caller, json={"model": "qa:1", "query": question, "documents": passages}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["index"] for r in body["results"]] == [a["index"] for a in expected]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([a["score"] for a in expected])
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"]), "no document unless asked"
    assert body["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    assert body["id"] == response.headers["X-Request-ID"]


def test_cohere_top_n_and_return_documents(
    client: TestClient, caller: dict[str, str], documents: tuple[str, list[str]]
) -> None:
    question, passages = documents
    expected = answered(client, caller, question, passages)
    body = {"model": "qa", "query": question, "documents": passages, "top_n": 2, "return_documents": True}

    results = client.post("/v2/rerank", headers=caller, json=body).json()["results"]

    assert [r["index"] for r in results] == [a["index"] for a in expected[:2]]
    assert [r["document"]["text"] for r in results] == [passages[r["index"]] for r in results]
    everything = client.post("/v2/rerank", headers=caller, json=body | {"top_n": 50}).json()["results"]
    assert len(everything) == len(passages), "top_n beyond the documents returns them all"


def test_cohere_v1_takes_text_objects_and_defaults_to_the_rerank_model(
    client: TestClient, caller: dict[str, str], documents: tuple[str, list[str]]
) -> None:
    question, passages = documents
    expected = answered(client, caller, question, passages)
    body = {"query": question, "documents": [{"text": p, "title": "t"} for p in passages], "rank_fields": ["text"]}

    response = client.post("/v1/rerank", headers=caller, json=body)

    assert response.status_code == 200, response.text
    assert [r["index"] for r in response.json()["results"]] == [a["index"] for a in expected]
    assert response.json()["meta"]["api_version"] == {"version": "1"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"documents": []}, "documents"),
        ({"documents": ["d"] * 13}, "documents"),
        ({"documents": ["ok", "x" * 301]}, "documents.1"),
        ({"documents": ["ok", 3]}, "documents.1"),
        ({"documents": ["ok", {"title": "no text"}]}, "documents.1"),
        ({"query": ""}, "query"),
        ({"query": "q" * 121}, "query"),
        ({"top_n": 0}, "top_n"),
        ({"top_n": "two"}, "top_n"),
        ({"model": None}, "model"),
        ({"model": "qa\x00"}, "model"),
        ({"rank_fields": ["title"]}, "rank_fields.0"),
        ({"relevant_spans": {"mode": "enabled"}}, "relevant_spans.mode"),
        ({"temperature": 1}, "temperature"),
    ],
)
def test_cohere_invalid_requests_give_400_with_a_message_naming_the_field(
    client: TestClient, caller: dict[str, str], body: dict, field: str
) -> None:
    request = {"model": "qa", "query": QUERY, "documents": ["a", "b"]} | body
    response = client.post("/v2/rerank", headers=caller, json=request)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"message"}
    assert response.json()["message"].startswith(f"{field}:"), response.json()


def test_cohere_auth_and_unknown_models_in_cohere_shape(client: TestClient, caller: dict[str, str]) -> None:
    body = {"model": "qa", "query": QUERY, "documents": ["a"]}
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        response = client.post("/v2/rerank", headers=headers, json=body)
        assert response.status_code == 401 and set(response.json()) == {"message"}
    for model in ("nope", "qa:9", "qa@staging"):
        response = client.post("/v2/rerank", headers=caller, json=body | {"model": model})
        assert response.status_code == 404 and set(response.json()) == {"message"}
        assert model in response.json()["message"]
    not_json = client.post("/v2/rerank", headers=caller | {"Content-Type": "application/json"}, content=b"{")
    assert not_json.status_code == 400 and set(not_json.json()) == {"message"}


def test_tei_ranks_as_the_answer_route(
    client: TestClient, caller: dict[str, str], documents: tuple[str, list[str]]
) -> None:
    question, passages = documents
    expected = answered(client, caller, question, passages)

    response = client.post("/rerank", headers=caller, json={"query": question, "texts": passages})
    raw = client.post(
        "/rerank", headers=caller, json={"query": question, "texts": passages, "raw_scores": True, "return_text": True}
    ).json()

    assert response.status_code == 200, response.text
    ranks = response.json()
    assert [r["index"] for r in ranks] == [a["index"] for a in expected]
    assert [r["score"] for r in ranks] == pytest.approx([a["score"] for a in expected])
    assert all(set(r) == {"index", "score"} for r in ranks)
    assert [r["index"] for r in raw] == [r["index"] for r in ranks]
    assert [1 / (1 + math.exp(-r["score"])) for r in raw] == pytest.approx([r["score"] for r in ranks], abs=1e-6)
    assert [r["text"] for r in raw] == [passages[r["index"]] for r in raw]


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"texts": []}, 400, "empty"),
        ({"texts": ["t"] * 13}, 413, "validation"),
        ({"texts": ["x" * 301]}, 413, "validation"),
        ({"texts": "not a list"}, 422, "validation"),
        ({"truncation_direction": "left"}, 422, "validation"),
        ({"top_n": 3}, 422, "validation"),
    ],
)
def test_tei_errors_in_tei_shape(
    client: TestClient, caller: dict[str, str], body: dict, status: int, error_type: str
) -> None:
    response = client.post("/rerank", headers=caller, json={"query": QUERY, "texts": ["a"]} | body)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type and set(response.json()) == {"error", "error_type"}


def test_tei_without_a_key_or_a_model_of_the_tenant(client: TestClient, settings: Settings) -> None:
    body = {"query": QUERY, "texts": ["a"]}
    unauthorised = client.post("/rerank", json=body)
    assert unauthorised.status_code == 401 and unauthorised.json()["error_type"] == "unauthorized"
    _, stranger = make_caller(settings)  # a tenant with no model `qa`
    missing = client.post("/rerank", headers=stranger, json=body)
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"


def test_tei_without_a_configured_rerank_model_gives_424(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        _, headers = make_caller(settings)
        response = client.post("/rerank", headers=headers, json={"query": QUERY, "texts": ["a"]})
        v1 = client.post("/v1/rerank", headers=headers, json={"query": QUERY, "documents": ["a"]})
    assert response.status_code == 424
    assert response.json() == {
        "error": "no rerank model is configured: set QADISTILL_RERANK_MODEL",
        "error_type": "backend",
    }
    assert v1.status_code == 400 and v1.json()["message"].startswith("model:")


def test_a_full_queue_is_each_apis_429_with_retry_after() -> None:
    # What rank() raises when the model's queue is full (QueueFullError), as each API's clients expect it.
    full = ApiError(503, "overloaded", "model qa: too many questions queued", headers={"Retry-After": "2"})
    cohere_error, tei_error = render_cohere_error(full), render_tei_error(full)
    assert (cohere_error.status_code, cohere_error.headers["Retry-After"]) == (429, "2")
    assert json.loads(cohere_error.body) == {"message": "model qa: too many questions queued"}
    assert (tei_error.status_code, tei_error.headers["Retry-After"]) == (429, "2")
    assert json.loads(tei_error.body) == {"error": "model qa: too many questions queued", "error_type": "overloaded"}
    unloadable = render_tei_error(ApiError(500, "model_unavailable", "model qa:1 could not be loaded"))
    assert (unloadable.status_code, json.loads(unloadable.body)["error_type"]) == (424, "backend")
