"""/v1/jobs: submit a pipeline spec, list, get, cancel, follow events (SSE) and read metrics."""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import CurrentTenant, PageDep, SessionDep, check_body_size
from app.api.schemas import (
    Curve,
    ErrorBody,
    JobEventList,
    JobEventPublic,
    JobList,
    JobMetrics,
    JobPublic,
)
from app.db.base import INTEGER_MAX
from app.db.models import Job
from app.distill.spec import PipelineSpec
from app.services import jobs as service
from app.services.queue import enqueue_job
from app.services.redact import redact_json

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 409, 422, 503)}
_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    429: {"model": ErrorBody, "description": "Too many jobs queued or running; retry after Retry-After seconds."},
}
_FOLLOW_POLL_S = 0.5
JobStatus = Literal["queued", "running", "cancelling", "cancelled", "succeeded", "failed"]


def _public(session: Session, job: Job) -> JobPublic:
    return JobPublic.of(job, service.job_model_version(session, job_id=job.id))


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    dependencies=[Depends(check_body_size)],
    responses={
        200: {"model": JobPublic, "description": "A retried request with the same Idempotency-Key."},
        **_SUBMIT_ERRORS,
    },
    summary="Submit a distillation job",
)
def submit_job(
    spec: PipelineSpec,
    request: Request,
    response: Response,
    tenant: CurrentTenant,
    session: SessionDep,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=255, description="Retrying a request with the same key returns the same job."),
    ] = None,
) -> JobPublic:
    """Queue a job running `spec`; `data.train`, `data.eval` and `data.unlabeled` name datasets (id or name).

    Loss conventions: `distill.alpha` weighs the soft (teacher) term, L = (1 - alpha) * CE(hard)
    + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)); the T^2 keeps gradients on scale.
    """
    settings = request.app.state.settings
    service.check_runnable(spec, model_dirs=settings.model_dirs, cache_dir=settings.cache_dir)
    celery = request.app.state.celery
    job, created = service.submit_job(
        session,
        lambda job_id, task_id, queue: enqueue_job(celery, job_id, queue, task_id),
        tenant=tenant,
        spec=spec,
        max_active=settings.max_active_jobs,
        lease_s=settings.lease_s,
        idempotency_key=idempotency_key,
        request_id=request.scope.get("request_id"),
    )
    response.status_code = 201 if created else 200
    return _public(session, job)


@router.get("", response_model=JobList, responses=_ERRORS, summary="List jobs")
def list_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    page: PageDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs with this status.")] = None,
) -> JobList:
    """The tenant's jobs, newest first."""
    rows, next_cursor = service.list_jobs(session, tenant_id=tenant.id, page=page, status=status)
    models = service.job_model_versions(session, job_ids=[r.id for r in rows])
    return JobList(data=[JobPublic.of(r, models.get(r.id)) for r in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS, summary="Get a job")
def get_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    """Status, stage, progress, timestamps and error of one job."""
    return _public(session, service.get_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=_ERRORS, summary="Cancel a job")
def cancel_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    """Stop a job: queued ones end `cancelled` at once; running ones go `cancelling`, then `cancelled`."""
    return _public(session, service.cancel_job(session, tenant_id=tenant.id, job_id=job_id))


@router.get(
    "/{job_id}/events",
    response_model=JobEventList,
    responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
    summary="Read or follow a job's events",
)
async def job_events(
    job_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=INTEGER_MAX, description="Only events with a larger id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    follow: Annotated[bool, Query(description="Stream events as Server-Sent Events until the job ends.")] = False,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=INTEGER_MAX, description="SSE resume point (overrides `after`).")
    ] = None,
) -> Any:
    """The job's milestones oldest first; with follow=true a text/event-stream that ends with the job.

    Each SSE message has event `job_event` and the event as JSON; the last one has event `end` and the job.
    """
    job = await run_in_threadpool(service.get_job, session, tenant_id=tenant.id, job_id=job_id)
    if not follow:
        rows = await run_in_threadpool(service.list_events, session, job_id=job.id, after=after, limit=limit)
        return JobEventList(data=[JobEventPublic.of(r) for r in rows], finished=service.is_finished(job))
    start = last_event_id if last_event_id is not None else after
    return EventSourceResponse(_follow(request, tenant.id, job.id, start), ping=15)


async def _follow(request: Request, tenant_id: str, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    # Each poll opens its own short session: a stream may last hours and must not pin a connection.
    sessionmaker = request.app.state.sessionmaker

    def poll(last: int) -> tuple[list[JobEventPublic], JobPublic]:
        with sessionmaker() as session:
            job = service.get_job(session, tenant_id=tenant_id, job_id=job_id)
            rows = service.list_events(session, job_id=job_id, after=last, limit=500)
            return [JobEventPublic.of(r) for r in rows], _public(session, job)

    while True:
        events, job = await run_in_threadpool(poll, after)
        for event in events:
            after = event.id
            yield ServerSentEvent(data=event.model_dump_json(), event="job_event", id=str(event.id))
        if job.status in ("succeeded", "failed", "cancelled") and not events:
            yield ServerSentEvent(data=job.model_dump_json(), event="end")
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(_FOLLOW_POLL_S)


@router.get("/{job_id}/metrics", response_model=JobMetrics, responses=_ERRORS, summary="Read a job's metrics")
def job_metrics(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobMetrics:
    """Training curves per stage (loss by step) and, once succeeded, the final evaluation report."""
    job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    curves = [Curve(**c) for c in service.job_curves(session, job_id=job.id)]
    return JobMetrics(curves=curves, final=redact_json(job.report))
