"""A typed Python client of the qadistill REST API (httpx): every route a user needs, errors as exceptions.

    from app.client import Client
    with Client("http://127.0.0.1:8000", api_key="qd_...") as qd:
        job = qd.submit_job(spec)
        for item in qd.follow_events(job.id):   # resumes with Last-Event-ID when the stream drops
            print(item)

The API's errors (`{"error": {"code", "message", "param"}}`) are raised as `ApiError` subclasses chosen by
status; a service that cannot be reached raises `ServiceUnreachable`. Both derive from `ClientError`.
"""

import json
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_TIMEOUT_S = 30.0
# The API pings a followed stream every 15 s: silence this long means the connection is gone.
STREAM_READ_TIMEOUT_S = 60.0
RECONNECT_ATTEMPTS = 5
RECONNECT_DELAY_S = 0.5

T = TypeVar("T")


# --- errors -------------------------------------------------------------------------------------------


class ClientError(Exception):
    """Any failure of a client call."""


class ServiceUnreachable(ClientError):
    """The service could not be reached (connection refused, DNS, timeout)."""


class ApiError(ClientError):
    """An error answer of the API: its HTTP status, stable `code`, `message` and the field at fault (`param`)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        *,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    """400, 413 or 422: the request is at fault; `param` names the field."""


class Unauthorized(ApiError):
    """401: no API key, or one that is unknown or revoked."""


class NotFound(ApiError):
    """404: no such object for this tenant."""


class Conflict(ApiError):
    """409: the object's state forbids it (a name taken, a dataset in use, a job already finished)."""


class RateLimited(ApiError):
    """429: too many jobs queued or running; `retry_after` says when to try again."""


class Overloaded(ApiError):
    """503: the model's queue is full or a dependency is down; `retry_after` when the API gives one."""


class ServerError(ApiError):
    """500 and other 5xx: a fault of the service; `message` quotes the request id."""


_ERROR_TYPES: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
    503: Overloaded,
}


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed exception for an error response (a body not in the API's shape still gives one)."""
    try:
        detail = response.json()["error"]
        code, message, param = str(detail["code"]), str(detail["message"]), detail.get("param")
    except (ValueError, KeyError, TypeError):
        code, message, param = "http_error", response.text.strip()[:500] or response.reason_phrase, None
    retry_after = response.headers.get("Retry-After")
    kind = _ERROR_TYPES.get(response.status_code, ServerError if response.status_code >= 500 else ApiError)
    return kind(
        response.status_code,
        code,
        message,
        param,
        request_id=response.headers.get("X-Request-ID"),
        retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
    )


# --- what the API returns -----------------------------------------------------------------------------


class _Body(BaseModel):
    # Fields the API adds later stay readable (model_extra) and do not break an older client.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Page(_Body, Generic[T]):
    """One page of a list; pass `next_cursor` as `cursor` for the next one (None on the last page)."""

    data: list[T]
    next_cursor: str | None = None
    has_more: bool = Field(False, description="Whether another page follows.")

    @model_validator(mode="before")
    @classmethod
    def _has_more_from_cursor(cls, value: Any) -> Any:
        # A server older than `has_more` still says so through next_cursor.
        if isinstance(value, dict) and "has_more" not in value:
            return value | {"has_more": value.get("next_cursor") is not None}
        return value


class ErrorDetail(_Body):
    code: str
    message: str
    param: str | None = None


class Dataset(_Body):
    id: str
    name: str
    format: str
    sha256: str
    pairs: int
    questions: int
    positives: int
    labelled: bool
    size_bytes: int
    created_at: datetime


class ModelRef(_Body):
    name: str
    version: int


class Job(_Body):
    id: str
    name: str
    status: str
    stage: str | None = None
    queue: str | None = None
    progress: float = 0.0
    cancel_requested: bool = False
    spec: dict[str, Any] = Field(default_factory=dict)
    error: ErrorDetail | None = None
    model: ModelRef | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has reached a final status."""
        return self.status in FINISHED_STATUSES


class JobEvent(_Body):
    id: int
    ts: datetime
    stage: str
    level: str
    message: str


class JobEventList(_Body):
    data: list[JobEvent]
    finished: bool


class JobEnded(_Body):
    """The last item of `follow_events`: the job as it ended."""

    job: Job


class Curve(_Body):
    stage: str
    name: str
    steps: list[int]
    values: list[float]


class JobMetrics(_Body):
    curves: list[Curve]
    final: dict[str, Any] | None = None


class ModelVersion(_Body):
    id: str
    name: str
    version: int
    job_id: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class Alias(_Body):
    name: str
    alias: str
    version: int
    updated_at: datetime


class RankedPassage(_Body):
    index: int
    score: float
    passage: str | None = None
    members: list[float] | None = None
    heads: dict[str, float] | None = None


class Answer(_Body):
    model: ModelRef
    answers: list[RankedPassage]
    took_ms: float


# --- the client ---------------------------------------------------------------------------------------


class Client:
    """A session with one qadistill API as one tenant (the owner of `api_key`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # datasets

    def upload_dataset(self, path: Path | str, *, name: str | None = None, format: str | None = None) -> Dataset:
        """Upload a JSONL, CSV or TSV file; the same content again returns the existing dataset."""
        path = Path(path)
        fields = {k: v for k, v in (("name", name), ("format", format)) if v}
        with path.open("rb") as file:
            body = self._call("POST", "/v1/datasets", data=fields, files={"file": (path.name, file)})
        return Dataset.model_validate(body)

    def list_datasets(self, *, limit: int = 20, cursor: str | None = None) -> Page[Dataset]:
        """One page of the tenant's datasets, newest first."""
        return Page[Dataset].model_validate(self._call("GET", "/v1/datasets", params=_page(limit, cursor)))

    def get_dataset(self, ref: str) -> Dataset:
        """A dataset by id or name."""
        return Dataset.model_validate(self._call("GET", f"/v1/datasets/{_segment(ref)}"))

    def delete_dataset(self, ref: str) -> None:
        """Delete a dataset (by id or name); Conflict while an unfinished job uses it."""
        self._call("DELETE", f"/v1/datasets/{_segment(ref)}")

    # jobs

    def submit_job(self, spec: Mapping[str, Any] | BaseModel, *, idempotency_key: str | None = None) -> Job:
        """Queue a job running `spec` (a PipelineSpec or its JSON form); a retried idempotency key returns its job."""
        body = spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, BaseModel) else dict(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job.model_validate(self._call("POST", "/v1/jobs", json=body, headers=headers))

    def list_jobs(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> Page[Job]:
        """One page of the tenant's jobs, newest first, optionally only those with `status`."""
        params = _page(limit, cursor) | ({"status": status} if status else {})
        return Page[Job].model_validate(self._call("GET", "/v1/jobs", params=params))

    def get_job(self, job_id: str) -> Job:
        """One job: status, stage, progress, error, the model it registered."""
        return Job.model_validate(self._call("GET", f"/v1/jobs/{_segment(job_id)}"))

    def cancel_job(self, job_id: str) -> Job:
        """Ask a job to stop (again: no harm); Conflict when it has already succeeded or failed."""
        return Job.model_validate(self._call("POST", f"/v1/jobs/{_segment(job_id)}/cancel"))

    def job_events(self, job_id: str, *, after: int = 0, limit: int = 100) -> JobEventList:
        """The job's events with an id above `after`, oldest first."""
        params = {"after": after, "limit": limit}
        return JobEventList.model_validate(self._call("GET", f"/v1/jobs/{_segment(job_id)}/events", params=params))

    def job_metrics(self, job_id: str) -> JobMetrics:
        """Training curves per stage and, once succeeded, the evaluation report."""
        return JobMetrics.model_validate(self._call("GET", f"/v1/jobs/{_segment(job_id)}/metrics"))

    def follow_events(
        self, job_id: str, *, after: int = 0, reconnect_attempts: int = RECONNECT_ATTEMPTS
    ) -> Iterator[JobEvent | JobEnded]:
        """The job's events as they happen (Server-Sent Events), then one `JobEnded` when the job ends.

        A dropped or silent stream is reopened with `Last-Event-ID` set to the last event received, so no
        event is lost or repeated; after `reconnect_attempts` failures in a row without an event, the
        last failure is raised (ServiceUnreachable).
        """
        last_id, failures = after, 0
        while True:
            try:
                for kind, event_id, data in self._stream_events(job_id, last_id):
                    failures = 0
                    if kind == "end":
                        yield JobEnded(job=Job.model_validate(data))
                        return
                    event = JobEvent.model_validate(data)
                    last_id = int(event_id) if event_id and event_id.isdigit() else event.id
                    yield event
            except ServiceUnreachable:
                failures += 1
                if failures > reconnect_attempts:
                    raise
            else:
                failures += 1  # the stream ended without `end`: a proxy or a restart cut it
                if failures > reconnect_attempts:
                    raise ServiceUnreachable(f"the event stream of job {job_id} keeps closing before the job ends")
            time.sleep(RECONNECT_DELAY_S * failures)

    def wait_for_job(self, job_id: str, *, timeout: float | None = None, poll_s: float = 1.0) -> Job:
        """Poll until the job has finished and return it; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_s)

    # models

    def list_models(self, *, name: str | None = None, limit: int = 20, cursor: str | None = None) -> Page[ModelVersion]:
        """One page of model versions, newest first, optionally of one model."""
        params = _page(limit, cursor) | ({"name": name} if name else {})
        return Page[ModelVersion].model_validate(self._call("GET", "/v1/models", params=params))

    def get_model(self, ref: str) -> ModelVersion:
        """The version `name` (its production alias, else the latest), `name@alias` or `name:version` is."""
        return ModelVersion.model_validate(self._call("GET", f"/v1/models/{_segment(ref)}"))

    def get_version(self, name: str, version: int) -> ModelVersion:
        """Version `version` of model `name`."""
        return ModelVersion.model_validate(self._call("GET", f"/v1/models/{_segment(name)}/versions/{version}"))

    def list_aliases(self, name: str) -> list[Alias]:
        """The aliases of model `name` and the version each points at."""
        return [Alias.model_validate(a) for a in self._call("GET", f"/v1/models/{_segment(name)}/aliases")]

    def set_alias(self, name: str, version: int, *, alias: str = "production") -> Alias:
        """Point `name@alias` at `version`: promote a new version or roll back."""
        path = f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}"
        return Alias.model_validate(self._call("PUT", path, json={"version": version}))

    def delete_alias(self, name: str, *, alias: str) -> None:
        """Remove `name@alias` (the version stays registered); NotFound when there is no such alias."""
        self._call("DELETE", f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}")

    def answer(
        self, model: str, question: str, passages: list[str], *, top_k: int | None = None, explain: bool = False
    ) -> Answer:
        """Rank `passages` for `question` with `model` (`name`, `name@alias` or `name:version`), best first."""
        body: dict[str, Any] = {"question": question, "passages": passages, "explain": explain}
        if top_k is not None:
            body["top_k"] = top_k
        return Answer.model_validate(self._call("POST", f"/v1/models/{_segment(model)}/answer", json=body))

    # health

    def ready(self) -> dict[str, Any]:
        """The readiness report (database, broker, loaded models); ServerError-family when not ready."""
        return self._call("GET", "/readyz")

    # plumbing

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ServiceUnreachable(f"cannot reach {self.base_url}: {err or type(err).__name__}") from err
        if response.is_error:
            raise error_from_response(response)
        return response.json() if response.content else None

    def _stream_events(self, job_id: str, after: int) -> Iterator[tuple[str, str | None, Any]]:
        """(event, id, data) of one SSE connection, until the server or the network closes it."""
        headers = {"Last-Event-ID": str(after)} if after else {}
        timeout = httpx.Timeout(DEFAULT_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
        url = f"/v1/jobs/{_segment(job_id)}/events"
        try:
            with self._http.stream(
                "GET", url, params={"follow": "true"}, headers=headers, timeout=timeout
            ) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                yield from parse_sse(response.iter_lines())
        except httpx.TransportError as err:
            raise ServiceUnreachable(f"event stream of job {job_id}: {err or type(err).__name__}") from err


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str | None, Any]]:
    """(event, id, data as JSON) of each message of a text/event-stream; comments (pings) are skipped."""
    event, event_id, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield event, event_id, json.loads("\n".join(data))
            event, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)
    if data:
        yield event, event_id, json.loads("\n".join(data))


def _page(limit: int, cursor: str | None) -> dict[str, Any]:
    return {"limit": limit} | ({"cursor": cursor} if cursor else {})


def _segment(value: str) -> str:
    """`value` as one URL path segment (a name may hold characters a path gives meaning to)."""
    return quote(value, safe="@:")
