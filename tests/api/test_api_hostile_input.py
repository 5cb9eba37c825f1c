"""Hostile but fair input: every bad id, number, cursor or name is a 4xx JSON error, never a 500.

Each test reproduces one finding of issue 12 on PostgreSQL (NUL bytes and integer overflows are
PostgreSQL's to refuse), then checks what the caller sees: the status, the JSON error and its `param`.
"""

import base64
import copy
import json

import pytest
from fastapi.testclient import TestClient

from app.db.session import session_scope
from app.main import create_app
from app.services.registry import register_version
from tests.api.test_api_jobs import make_spec, submit

PAST_64_BITS = 2**63


def assert_json_error(response, status: int, param: str | None = None) -> dict:
    """The response is `status` with the error shape, naming `param`; returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param"}
    if param is not None:
        assert error["param"] == param
    return error


def make_cursor(created_at: str, row_id: object, kind: str = "jobs") -> str:
    return base64.urlsafe_b64encode(json.dumps([kind, created_at, row_id]).encode()).decode().rstrip("=")


@pytest.fixture
def faq(settings, alice) -> str:
    """A registered model `faq` (version 1) of alice's."""
    with session_scope(settings.database_url) as session:
        register_version(
            session, tenant_id=alice.tenant_id, name="faq", job_id=None, artifact_uri="/srv/faq", metrics={}
        )
    return "faq"


def test_version_past_64_bits_is_422_naming_the_version(client, alice, faq):
    for version in (PAST_64_BITS, 2**31):
        response = client.get(f"/v1/models/{faq}/versions/{version}", headers=alice.headers)
        assert_json_error(response, 422, "version")


def test_alias_to_a_version_past_64_bits_is_422_naming_the_version(client, alice, faq):
    response = client.put(f"/v1/models/{faq}/aliases/prod", headers=alice.headers, json={"version": PAST_64_BITS})
    assert_json_error(response, 422, "version")


def test_events_after_past_64_bits_is_422_naming_after(client, alice, datasets):
    job = submit(client, alice, make_spec()).json()
    response = client.get(f"/v1/jobs/{job['id']}/events", headers=alice.headers, params={"after": PAST_64_BITS})
    assert_json_error(response, 422, "after")
    resumed = client.get(f"/v1/jobs/{job['id']}/events", headers={**alice.headers, "Last-Event-ID": str(PAST_64_BITS)})
    assert_json_error(resumed, 422, "last-event-id")


@pytest.mark.parametrize("ref", ["faq:%C2%B2", "faq:%D9%A1", f"faq:{PAST_64_BITS}", "faq:99999999999"])
def test_unicode_or_huge_digits_in_name_colon_version_are_404(client, alice, faq, ref):
    response = client.get(f"/v1/models/{ref}", headers=alice.headers)
    assert assert_json_error(response, 404, "name")["code"] == "model_not_found"
    answer = client.post(f"/v1/models/{ref}/answer", headers=alice.headers, json={"question": "q", "passages": ["p"]})
    assert_json_error(answer, 404, "name")


@pytest.mark.parametrize(
    ("method", "url", "param"),
    [
        ("get", "/v1/jobs/a%00b", "job_id"),
        ("post", "/v1/jobs/a%00b/cancel", "job_id"),
        ("get", "/v1/jobs/a%00b/events", "job_id"),
        ("get", "/v1/jobs/a%00b/metrics", "job_id"),
        ("get", "/v1/datasets/a%00b", "dataset_id"),
        ("delete", "/v1/datasets/a%00b", "dataset_id"),
        ("get", "/v1/models/fa%00q", "ref"),
        ("get", "/v1/models/fa%00q/versions/1", "name"),
        ("get", "/v1/models/fa%00q/aliases", "name"),
        ("get", "/v1/models?name=fa%00q", "name"),
    ],
)
def test_nul_in_an_id_or_name_is_422_naming_it(client, alice, method, url, param):
    assert_json_error(getattr(client, method)(url, headers=alice.headers), 422, param)


def test_nul_in_an_alias_or_answering_name_is_4xx(client, alice, faq):
    alias = client.put(f"/v1/models/{faq}/aliases/pr%00d", headers=alice.headers, json={"version": 1})
    assert_json_error(alias, 422, "alias")
    answer = client.post("/v1/models/fa%00q/answer", headers=alice.headers, json={"question": "q", "passages": ["p"]})
    assert_json_error(answer, 422, "name")


def test_nul_in_a_dataset_reference_of_a_spec_is_422_naming_it(client, alice, datasets):
    response = submit(client, alice, make_spec(data={"train": "tr\x00ain", "eval": "eval"}))
    assert_json_error(response, 422, "data.train")


@pytest.mark.parametrize("field", ["path", "base"])
def test_nul_in_a_model_path_is_422_naming_it(client, alice, datasets, field):
    spec = make_spec()
    spec["teachers"][0][field] = "/models/a\x00b"
    assert_json_error(submit(client, alice, spec), 422, f"teachers.0.{field}")
    student = make_spec(student={"init_from": "/models/a\x00b"})
    assert_json_error(submit(client, alice, student), 422, "student.init_from")


LISTS = {"/v1/jobs": "jobs", "/v1/datasets": "datasets", "/v1/models": "model_versions"}


@pytest.mark.parametrize(
    "forge",
    [
        lambda kind: make_cursor("9999-12-31T23:59:59-05:00", "x", kind),  # past datetime.max once in UTC
        lambda kind: make_cursor("0001-01-01T00:00:00+05:00", "x", kind),  # before datetime.min once in UTC
        lambda kind: make_cursor("2024-01-01T00:00:00+00:00", "x_\x00", kind),
        lambda kind: make_cursor("2024-01-01T00:00:00+00:00", 12, kind),
        lambda kind: base64.urlsafe_b64encode(b"[" * 5000).decode(),
        lambda kind: "%C2%B2",
        lambda kind: "a\x00b",
        lambda kind: "²",
    ],
)
def test_a_forged_list_cursor_is_400_naming_it(client, alice, forge):
    for url, kind in LISTS.items():
        response = client.get(url, headers=alice.headers, params={"cursor": forge(kind)})
        assert_json_error(response, 400, "cursor")


def test_upload_with_deeply_nested_json_is_422_naming_the_file(alice, upload):
    line = b'{"question": "q", "passage": "p", "label": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"
    assert_json_error(upload(alice, line, "deep.jsonl"), 422, "file")


def test_upload_with_a_5000_digit_integer_is_422_naming_the_file(alice, upload):
    line = b'{"question": "q", "passage": "p", "label": ' + b"1" * 5000 + b"}\n"
    assert_json_error(upload(alice, line, "long.jsonl"), 422, "file")


@pytest.mark.parametrize(
    "body",
    [b'{"version": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"version": ' + b"1" * 5000 + b"}"],
)
def test_json_body_too_deep_or_with_a_5000_digit_integer_is_4xx(client, alice, faq, body):
    headers = {**alice.headers, "Content-Type": "application/json"}
    response = client.put(f"/v1/models/{faq}/aliases/prod", headers=headers, content=body)
    assert 400 <= response.status_code < 500, response.text
    assert_json_error(response, response.status_code, "body")


def test_an_unexpected_error_is_a_json_500_with_the_request_id(settings, alice, monkeypatch):
    from app.services import jobs

    def broken(*_args, **_kwargs):
        raise RuntimeError("/srv/secret/path exploded")

    monkeypatch.setattr(jobs, "list_jobs", broken)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        given = client.get("/v1/jobs", headers={**alice.headers, "X-Request-ID": "trace-123"})
        generated = client.get("/v1/jobs", headers=alice.headers)
        fine = client.get("/healthz", headers={"X-Request-ID": "trace-456"})
    error = assert_json_error(given, 500)
    assert error["code"] == "internal_error"
    assert given.headers["X-Request-ID"] == "trace-123" and "trace-123" in error["message"]
    assert "/srv" not in given.text and "RuntimeError" not in given.text
    request_id = generated.headers["X-Request-ID"]
    assert request_id and request_id in assert_json_error(generated, 500)["message"]
    assert fine.headers["X-Request-ID"] == "trace-456"


def test_a_request_id_that_is_not_a_short_token_is_replaced(client):
    response = client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert response.headers["X-Request-ID"] != "x" * 500 and 0 < len(response.headers["X-Request-ID"]) <= 64


@pytest.mark.parametrize(
    ("path", "value", "param"),
    [
        ("seed", 10**30, "seed"),
        ("teachers.0.seed", 10**30, "teachers.0.seed"),
        ("teachers.0.max_steps", 2**31, "teachers.0.max_steps"),
        ("stage1.max_steps", PAST_64_BITS, "stage1.max_steps"),
        ("stage2.max_steps", PAST_64_BITS, "stage2.max_steps"),
        ("checkpoint_every", PAST_64_BITS, "checkpoint_every"),
        ("student.layers", [0, 10**30], "student.layers.1"),
    ],
)
def test_integers_the_database_cannot_store_are_422_naming_the_field(client, alice, datasets, path, value, param):
    spec = copy.deepcopy(make_spec())
    node = spec
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    assert_json_error(submit(client, alice, spec), 422, param)
