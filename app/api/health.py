"""Liveness, readiness and Prometheus metrics."""

import hmac
import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.models import JOB_STATUSES, Job
from app.services.queue import check_broker
from app.serving.metrics import BY_MODEL

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

REQUESTS = Counter("qadistill_http_requests_total", "HTTP requests.", ["method", "route", "status"])
LATENCY = Histogram("qadistill_http_request_seconds", "HTTP request latency.", ["method", "route"])
# All tenants together: /metrics needs no API key, so nothing here is broken down by tenant or model.
JOBS = Gauge("qadistill_jobs", "Jobs by status (all tenants), computed at scrape.", ["status"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses={503: {"description": "A dependency is unreachable."}})
def readyz(request: Request) -> JSONResponse:
    """The database and the broker are reachable; how many models are loaded for serving.

    Counts only: this route needs no API key, so it names no tenant's model.
    """
    checks: dict[str, str] = {}
    try:
        with request.app.state.sessionmaker() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        log.warning("readiness: database unreachable: %s", exc)
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        check_broker(request.app.state.settings)
        checks["broker"] = "ok"
    except Exception as exc:
        log.warning("readiness: broker unreachable: %s", exc)
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    loaded = len(request.app.state.serving.loaded())
    body = {"status": "ok" if ready else "unavailable", **checks, "models_loaded": loaded}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Requests, latencies and jobs by status in the Prometheus text format; with the metrics key as Bearer
    token, also the metrics by model name and version."""
    await run_in_threadpool(_count_jobs, request)
    body = generate_latest()
    if _holds_metrics_key(request):
        body += generate_latest(BY_MODEL)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _holds_metrics_key(request: Request) -> bool:
    key = request.app.state.settings.metrics_key
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return bool(key) and hmac.compare_digest(given.encode(), key.encode())


def _count_jobs(request: Request) -> None:
    with request.app.state.sessionmaker() as session:
        counts = {status: n for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
    for status in JOB_STATUSES:
        JOBS.labels(status).set(counts.get(status, 0))


class RequestMetrics:
    """ASGI middleware: count HTTP requests and time them by route template (not event streams, which last
    as long as the client follows them).

    Plain ASGI rather than `app.middleware("http")`, whose per-request task and streams cost the
    answering path about a millisecond.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        streaming = False

        async def send_and_note_status(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streaming = content_type.startswith(b"text/event-stream")
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            # The route template, not the raw path: ids would make one time series per job.
            route = str(getattr(scope.get("route"), "path", "unmatched"))
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            if not streaming:
                LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)
