"""app.client: the API's errors as typed exceptions, and job events followed across dropped streams."""

import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from app import client as client_module
from app.client import (
    Client,
    Conflict,
    InvalidRequest,
    JobEnded,
    JobEvent,
    NotFound,
    RateLimited,
    ServerError,
    ServiceUnreachable,
    Unauthorized,
    parse_sse,
)

JOB = {
    "id": "job_1", "name": "demo", "status": "succeeded", "stage": "finish", "progress": 1.0,
    "cancel_requested": False, "spec": {}, "error": None, "model": {"name": "demo", "version": 1},
    "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:01:00Z",
    "started_at": "2026-01-01T00:00:01Z", "finished_at": "2026-01-01T00:01:00Z",
}  # fmt: skip


@pytest.fixture(autouse=True)
def no_reconnect_delay(monkeypatch):
    monkeypatch.setattr(client_module, "RECONNECT_DELAY_S", 0.0)


def event(event_id: int, message: str) -> bytes:
    data = {"id": event_id, "ts": "2026-01-01T00:00:00Z", "stage": "train", "level": "info", "message": message}
    return f"id: {event_id}\r\nevent: job_event\r\ndata: {json.dumps(data)}\r\n\r\n".encode()


END = f"event: end\r\ndata: {json.dumps(JOB)}\r\n\r\n".encode()


class CutStream(httpx.SyncByteStream):
    """A response body that sends `chunks` and then fails as a dropped connection does."""

    def __init__(self, chunks: list[bytes], then: Exception | None) -> None:
        self.chunks, self.then = chunks, then

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.then is not None:
            raise self.then


def serving(handler: Callable[[httpx.Request], httpx.Response]) -> Client:
    return Client("http://qadistill.test", "qd_key", transport=httpx.MockTransport(handler))


def test_following_resumes_after_a_dropped_stream_with_last_event_id():
    seen: list[str | None] = []
    streams = [
        CutStream([event(1, "one"), b": ping\r\n\r\n", event(2, "two")], httpx.RemoteProtocolError("peer closed")),
        CutStream([event(3, "three")], None),  # closed cleanly but before `end`: a proxy's timeout
        CutStream([event(4, "four"), END], None),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/job_1/events" and request.url.params["follow"] == "true"
        assert request.headers["Authorization"] == "Bearer qd_key"
        seen.append(request.headers.get("Last-Event-ID"))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=streams[len(seen) - 1])

    with serving(handler) as client:
        items = list(client.follow_events("job_1"))
    assert seen == [None, "2", "3"]
    assert [(i.id, i.message) for i in items if isinstance(i, JobEvent)] == [
        (1, "one"), (2, "two"), (3, "three"), (4, "four")
    ]  # fmt: skip
    assert isinstance(items[-1], JobEnded) and items[-1].job.status == "succeeded"


def test_following_from_a_known_event_sends_it_at_once():
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Last-Event-ID"))
        return httpx.Response(200, stream=CutStream([END], None))

    with serving(handler) as client:
        assert [type(i) for i in client.follow_events("job_1", after=41)] == [JobEnded]
    assert seen == ["41"]


def test_following_gives_up_after_repeated_failures_without_progress():
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused")

    with serving(handler) as client, pytest.raises(ServiceUnreachable):
        list(client.follow_events("job_1", reconnect_attempts=2))
    assert calls == 3


def test_following_an_unknown_job_raises_not_found_at_once():
    body = {"error": {"code": "job_not_found", "message": "no job 'job_x'", "param": "job_id"}}
    with serving(lambda request: httpx.Response(404, json=body)) as client, pytest.raises(NotFound) as caught:
        list(client.follow_events("job_x"))
    assert (caught.value.code, caught.value.param) == ("job_not_found", "job_id")


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, Unauthorized), (404, NotFound), (409, Conflict), (413, InvalidRequest), (422, InvalidRequest),
     (500, ServerError), (502, ServerError)],
)  # fmt: skip
def test_api_errors_are_typed_and_carry_code_message_and_param(status, kind):
    body = {"error": {"code": "some_code", "message": "what went wrong", "param": "teachers.0.seed"}}
    response = httpx.Response(status, json=body, headers={"X-Request-ID": "req-1"})
    with serving(lambda request: response) as client, pytest.raises(kind) as caught:
        client.get_job("job_1")
    err = caught.value
    assert (err.status, err.code, err.message, err.param, err.request_id) == (
        status, "some_code", "what went wrong", "teachers.0.seed", "req-1"
    )  # fmt: skip
    assert str(err) == f"{status} some_code: what went wrong"


def test_too_many_jobs_carries_retry_after():
    body = {"error": {"code": "quota_exceeded", "message": "4 jobs active", "param": None}}
    response = httpx.Response(429, json=body, headers={"Retry-After": "30"})
    with serving(lambda request: response) as client, pytest.raises(RateLimited) as caught:
        client.submit_job({"name": "x"}, idempotency_key="k")
    assert caught.value.retry_after == 30


def test_an_error_not_in_the_api_shape_still_raises_readably():
    bad_gateway = httpx.Response(502, text="Bad Gateway")
    with serving(lambda request: bad_gateway) as client, pytest.raises(ServerError) as caught:
        client.list_jobs()
    assert (caught.value.code, caught.value.message) == ("http_error", "Bad Gateway")


def test_an_unreachable_service_raises_service_unreachable():
    with Client("http://127.0.0.1:9", "k", timeout=2) as client, pytest.raises(ServiceUnreachable) as caught:
        client.get_job("job_1")
    assert "cannot reach http://127.0.0.1:9" in str(caught.value)


def test_requests_name_their_route_and_parse_typed_answers():
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.path.endswith("/answer"):
            answers = [{"index": 1, "score": 0.9, "passage": "b"}, {"index": 0, "score": 0.1, "passage": "a"}]
            return httpx.Response(200, json={"model": {"name": "m", "version": 2}, "answers": answers, "took_ms": 3})
        if request.method == "PUT":
            alias = {"name": "m", "alias": "production", "version": 2, "updated_at": "2026-01-01T00:00:00Z"}
            return httpx.Response(200, json=alias)
        return httpx.Response(200, json={"data": [JOB], "next_cursor": "abc"})

    with serving(handler) as client:
        page = client.list_jobs(status="succeeded", limit=5, cursor="xyz")
        alias = client.set_alias("m", 2)
        answer = client.answer("m@production", "q?", ["a", "b"], top_k=2)
    assert page.data[0].model is not None and page.data[0].finished and page.next_cursor == "abc"
    assert (alias.alias, alias.version) == ("production", 2)
    assert [a.index for a in answer.answers] == [1, 0] and answer.model.version == 2
    assert [(r.method, r.url.path) for r in requests] == [
        ("GET", "/v1/jobs"), ("PUT", "/v1/models/m/aliases/production"), ("POST", "/v1/models/m@production/answer")
    ]  # fmt: skip
    assert dict(requests[0].url.params) == {"status": "succeeded", "limit": "5", "cursor": "xyz"}
    assert json.loads(requests[1].content) == {"version": 2}
    assert json.loads(requests[2].content) == {"question": "q?", "passages": ["a", "b"], "explain": False, "top_k": 2}


def test_parse_sse_joins_data_lines_and_skips_comments():
    lines = [": ping", "id: 7", "event: job_event", 'data: {"a":', "data: 1}", "", "data: 2", ""]
    assert list(parse_sse(iter(lines))) == [("job_event", "7", {"a": 1}), ("message", None, 2)]
