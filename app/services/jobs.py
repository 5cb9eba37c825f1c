"""Jobs as the API sees them: submit (idempotent), read, list, cancel, events and metrics."""

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import FINISHED_STATUSES, Job, JobDataset, JobEvent, Metric, ModelVersion, Tenant
from app.distill.pretrained import (
    KNOWN_MODELS,
    ModelNotInstalledError,
    UnknownModelError,
    is_known_model,
    resolve_model,
)
from app.distill.spec import DataSpec, PipelineSpec
from app.services.datasets import find_dataset
from app.services.errors import ApiError
from app.services.pagination import PageRequest, paginate
from app.services.routing import live_workers, queue_for, waiting_message, waiting_stage

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str, str], None]
"""Sends the task of a job: (job_id, task_id, queue) -> None; raises when the broker is unreachable."""

# Jobs take minutes: a client refused by the quota learns to come back in half a minute rather than spin.
QUOTA_RETRY_AFTER_S = 30
LABELLED_ROLES = frozenset({"train", "eval"})


def request_fingerprint(spec: PipelineSpec) -> str:
    """A hash of the submitted spec: a retried request with the same Idempotency-Key must match it."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_model_sources(spec: PipelineSpec, *, model_dirs: Sequence[Path]) -> None:
    """422 naming the field when the spec names a server folder outside `model_dirs` as a model."""
    teacher_names = {t.name for t in spec.teachers}
    sources = [(f"teachers.{i}.path", t.path) for i, t in enumerate(spec.teachers)]
    sources += [(f"teachers.{i}.base", t.base) for i, t in enumerate(spec.teachers) if t.path is None]
    for param, source in (
        ("student.init_from", spec.student.init_from),
        ("distill.embedding_from", spec.distill.embedding_from),
    ):
        if source not in teacher_names:
            sources.append((param, source))
    roots = [root.resolve() for root in model_dirs]
    for param, source in sources:
        if source is None or is_known_model(source):
            continue
        if "\x00" in source:
            raise ApiError(422, "invalid_request", f"{param}: must not contain a NUL character", param)
        if not any(Path(source).resolve().is_relative_to(root) for root in roots):
            raise ApiError(
                422,
                "invalid_request",
                f"{param}: '{source}' is neither a known model ({', '.join(sorted(KNOWN_MODELS))}), "
                "a teacher of this job, nor a folder under the server's model_dirs",
                param,
            )


def check_runnable(spec: PipelineSpec, *, model_dirs: Sequence[Path], cache_dir: Path | None) -> None:
    """422 naming the field for what would make the job fail later: a model folder outside `model_dirs` or
    missing, student layers the base model does not have. (A `cuda` job with no GPU worker alive is taken,
    and marked waiting for one: workers may be starting.)"""
    check_model_sources(spec, model_dirs=model_dirs)
    folders = [(f"teachers.{i}.path", t.path) for i, t in enumerate(spec.teachers)]
    folders += [(f"teachers.{i}.base", t.base) for i, t in enumerate(spec.teachers) if t.path is None]
    folders += [("student.init_from", spec.student.init_from), ("distill.embedding_from", spec.distill.embedding_from)]
    teacher_names = {t.name for t in spec.teachers}
    for param, source in folders:
        if source is None or is_known_model(source) or source in teacher_names:
            continue
        if not (Path(source) / "config.json").is_file():
            message = f"{param}: no model folder (with config.json) at '{source}'"
            raise ApiError(422, "invalid_request", message, param)
    _check_student_layers(spec, cache_dir=cache_dir)


def _check_student_layers(spec: PipelineSpec, *, cache_dir: Path | None) -> None:
    student = spec.student
    if student.kind == "bilstm" or student.layers is None or student.init_from is None:
        return
    source = student.init_from
    teacher = next((t for t in spec.teachers if t.name == source), None)
    if teacher is not None:
        source = teacher.path or teacher.base
    try:
        config = json.loads((resolve_model(source, cache_dir=cache_dir) / "config.json").read_text())
    except (UnknownModelError, ModelNotInstalledError, OSError, ValueError):
        return  # the model itself is checked above, or reported by the worker (not installed on this server)
    depth = config.get("num_hidden_layers", config.get("n_layers", config.get("num_layers")))
    too_deep = [layer for layer in student.layers if isinstance(depth, int) and layer >= depth]
    if too_deep:
        raise ApiError(
            422,
            "invalid_request",
            f"student.layers: the base model has {depth} layers (0 to {depth - 1}); {too_deep[0]} is not one",
            "student.layers",
        )


def eval_role(index: int) -> str:
    """The job-dataset role of the index-th evaluation set: 'eval', then 'eval.1', 'eval.2', ..."""
    return "eval" if index == 0 else f"eval.{index}"


def data_by_role(data: DataSpec) -> dict[str, str]:
    """The spec's data references keyed by job-dataset role (train, eval, eval.1, ..., unlabeled)."""
    refs = {"train": data.train} | {eval_role(i): ref for i, ref in enumerate(data.eval)}
    return refs | ({"unlabeled": data.unlabeled} if data.unlabeled is not None else {})


def spec_data(by_role: dict[str, str]) -> dict[str, str | list[str]]:
    """The spec's `data` from values keyed by role: the inverse of data_by_role."""
    evals = sorted((r for r in by_role if r.split(".")[0] == "eval"), key=lambda r: int(r.partition(".")[2] or 0))
    data: dict[str, str | list[str]] = {"train": by_role["train"], "eval": [by_role[r] for r in evals]}
    return data | ({"unlabeled": by_role["unlabeled"]} if "unlabeled" in by_role else {})


def resolve_datasets(session: Session, *, tenant_id: str, spec: PipelineSpec) -> dict[str, str]:
    """Dataset id per data role of `spec` (ids or names); 422 naming the `data` field if one is unusable."""
    resolved: dict[str, str] = {}
    for role, ref in data_by_role(spec.data).items():
        dataset = find_dataset(session, tenant_id=tenant_id, ref=ref)
        kind = role.split(".")[0]
        index = role.partition(".")[2] or "0"
        param = f"data.eval.{index}" if kind == "eval" and len(spec.data.eval) > 1 else f"data.{kind}"
        if dataset is None:
            raise ApiError(422, "invalid_request", f"{param}: no dataset with id or name '{ref}'", param)
        if kind in LABELLED_ROLES and not dataset.labelled:
            raise ApiError(
                422,
                "invalid_request",
                f"{param}: dataset '{dataset.name}' has no labels; {kind} needs them",
                param,
            )
        resolved[role] = dataset.id
    return resolved


def _find_by_key(session: Session, *, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _check_same_request(job: Job, fingerprint: str) -> Job:
    if job.request_sha256 != fingerprint:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "Idempotency-Key: this key was used for a different request body",
            "Idempotency-Key",
        )
    return job


def check_quota(session: Session, *, tenant: Tenant, max_active: int) -> None:
    """429 with Retry-After when the tenant already has `max_active` jobs queued or running.

    Takes the tenant's row lock first (PostgreSQL), so that concurrent submissions are counted one at a time
    until the caller commits; SQLite serialises writers anyway.
    """
    session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant.id, Job.status.not_in(FINISHED_STATUSES))
    )
    if (active or 0) >= max_active:
        raise ApiError(
            429,
            "quota_exceeded",
            f"at most {max_active} jobs may be queued or running at once; wait for one to finish or cancel one",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )


def submit_job(
    session: Session,
    enqueue: Enqueue,
    *,
    tenant: Tenant,
    spec: PipelineSpec,
    max_active: int,
    lease_s: float,
    idempotency_key: str | None = None,
    request_id: str | None = None,
) -> tuple[Job, bool]:
    """Create a queued job and send its task to the queue its device needs (workers count as live for a few
    `lease_s`); returns (job, created). A retried key returns the first job. A job whose queue no live worker
    consumes is marked waiting, with an event saying what it waits for.

    422 naming the field for a spec this tenant cannot run; 429 past `max_active` unfinished jobs.
    """
    fingerprint = request_fingerprint(spec)
    if idempotency_key:
        existing = _find_by_key(session, tenant_id=tenant.id, key=idempotency_key)
        if existing is not None:
            return _check_same_request(existing, fingerprint), False
    dataset_ids = resolve_datasets(session, tenant_id=tenant.id, spec=spec)
    check_quota(session, tenant=tenant, max_active=max_active)
    stored_spec = spec.model_copy(update={"data": spec.data.model_copy(update=spec_data(dataset_ids))})
    live = live_workers(session, lease_s=lease_s)
    queue = queue_for(spec.device, live)
    waiting = queue not in live.queues
    job = Job(
        tenant_id=tenant.id,
        name=spec.name,
        status="queued",
        queue=queue,
        stage=waiting_stage(queue) if waiting else None,
        spec=stored_spec.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        request_sha256=fingerprint,
        celery_task_id=str(uuid.uuid4()),
    )
    session.add(job)
    session.flush()
    session.add_all(JobDataset(job_id=job.id, role=role, dataset_id=ds) for role, ds in dataset_ids.items())
    # The submitting request's id (X-Request-ID) ties the job to the client's and the api's log lines.
    by_request = f" by request {request_id}" if request_id else ""
    session.add(JobEvent(job_id=job.id, stage="queued", message=f"job submitted to queue '{queue}'{by_request}"))
    if waiting:
        message = waiting_message(queue, spec.device)
        session.add(JobEvent(job_id=job.id, stage=waiting_stage(queue), level="warning", message=message))
    try:
        session.commit()
    except IntegrityError:
        # The same key arrived twice at once: the other request created the job.
        session.rollback()
        existing = _find_by_key(session, tenant_id=tenant.id, key=idempotency_key or "")
        if existing is None:
            raise
        return _check_same_request(existing, fingerprint), False
    try:
        enqueue(job.id, job.celery_task_id or "", queue)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        session.delete(job)
        session.commit()
        raise ApiError(503, "queue_unavailable", "the job queue is unreachable; retry later") from exc
    log.info("job %s queued in %s for tenant %s%s", job.id, queue, tenant.id, " (no live worker)" * waiting)
    return job, True


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """The tenant's job `job_id`; 404 otherwise (also for another tenant's)."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.id == job_id))
    if job is None:
        raise ApiError(404, "job_not_found", f"no job '{job_id}'", "job_id")
    return job


def list_jobs(
    session: Session, *, tenant_id: str, page: PageRequest, status: str | None = None
) -> tuple[list[Job], str | None]:
    """The tenant's jobs newest first, optionally only those with `status`."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return paginate(session, stmt, created_at=Job.created_at, row_id=Job.id, page=page)


def cancel_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Ask a job to stop: a queued one is cancelled at once, a running one goes `cancelling`."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    now = utcnow()
    # Conditional updates: the worker may move the job from queued to running at the same moment.
    queued = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    if queued.rowcount:
        session.add(JobEvent(job_id=job.id, stage="queued", message="cancelled before it started"))
    else:
        running = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "running")
            .values(status="cancelling", cancel_requested=True, updated_at=now)
        )
        if running.rowcount:
            session.add(JobEvent(job_id=job.id, stage=job.stage or "running", message="cancel requested"))
    session.commit()
    session.refresh(job)
    if job.status in ("succeeded", "failed"):
        raise ApiError(409, "job_finished", f"job {job.id} already {job.status}", "job_id")
    return job


def list_events(session: Session, *, job_id: str, after: int = 0, limit: int = 100) -> list[JobEvent]:
    """A job's events with id greater than `after`, oldest first."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id)
    return list(session.scalars(stmt.limit(limit)))


def is_finished(job: Job) -> bool:
    """Whether the job has reached a final status."""
    return job.status in FINISHED_STATUSES


def job_curves(session: Session, *, job_id: str) -> list[dict[str, Any]]:
    """A job's training curves: one per (stage, metric name), points in step order."""
    rows = session.execute(
        select(Metric.stage, Metric.name, Metric.step, Metric.value)
        .where(Metric.job_id == job_id)
        .order_by(Metric.stage, Metric.name, Metric.step, Metric.id)
    )
    curves: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, name, step, value in rows:
        curve = curves.setdefault((stage, name), {"stage": stage, "name": name, "steps": [], "values": []})
        curve["steps"].append(step)
        curve["values"].append(value)
    return list(curves.values())


def job_model_version(session: Session, *, job_id: str) -> ModelVersion | None:
    """The model version a job registered, if it did."""
    return session.scalar(select(ModelVersion).where(ModelVersion.job_id == job_id))


def job_model_versions(session: Session, *, job_ids: list[str]) -> dict[str, ModelVersion]:
    """The model versions some jobs registered, by job id (one query for a whole page)."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.job_id.in_(job_ids))) if job_ids else []
    return {row.job_id: row for row in rows if row.job_id is not None}
