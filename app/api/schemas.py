"""Response bodies of the REST API (requests are PipelineSpec and multipart uploads)."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, computed_field

from app.db.base import INTEGER_MAX
from app.db.models import Alias, Dataset, Job, JobEvent, ModelVersion
from app.services.redact import redact_json, redact_text


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. 'invalid_request'.")
    message: str = Field(description="What is wrong and, where it helps, how to fix it.")
    param: str | None = Field(None, description="The field at fault as a dotted path, e.g. 'teachers.0.seed'.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class DatasetPublic(BaseModel):
    id: str
    name: str
    format: str = Field(description="'jsonl', 'csv' or 'tsv'.")
    sha256: str = Field(description="SHA-256 of the uploaded content: the same content is the same dataset.")
    pairs: int
    questions: int
    positives: int = Field(description="Pairs labelled 1.")
    labelled: bool
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, row: Dataset) -> "DatasetPublic":
        return cls.model_validate(row, from_attributes=True)


class CursorPage(BaseModel):
    """What every list says about the pages after this one."""

    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")

    @computed_field(description="Whether another page follows (`next_cursor` is not null).")  # type: ignore[prop-decorator]
    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


class DatasetList(CursorPage):
    data: list[DatasetPublic]


class ModelRef(BaseModel):
    name: str
    version: int


class JobPublic(BaseModel):
    id: str
    name: str
    status: str = Field(description="queued, running, cancelling, cancelled, succeeded or failed.")
    stage: str | None = Field(
        description="Where it stands; while queued, `waiting_for_gpu_worker` (or `_cpu_`) when no live worker "
        "consumes its queue."
    )
    queue: str | None = Field(
        description="The broker queue its tasks go to: `gpu` for device cuda, `cpu` for cpu, and for auto `gpu` "
        "while a GPU worker is alive, else `cpu`."
    )
    progress: float = Field(description="Whole-pipeline progress, 0..1.")
    cancel_requested: bool
    spec: dict[str, Any] = Field(description="The submitted spec, with data.* resolved to dataset ids.")
    error: ErrorDetail | None
    model: ModelRef | None = Field(None, description="The model version the job registered.")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Job, model: ModelVersion | None = None) -> "JobPublic":
        error = None
        if row.error_code:
            message = redact_text(row.error_message or "")
            error = ErrorDetail(code=row.error_code, message=message, param=row.error_param)
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            stage=row.stage,
            queue=row.queue,
            progress=row.progress,
            cancel_requested=row.cancel_requested,
            spec=row.spec,
            error=error,
            model=ModelRef(name=model.name, version=model.version) if model else None,
            created_at=row.created_at,
            updated_at=row.updated_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class JobList(CursorPage):
    data: list[JobPublic]


class JobEventPublic(BaseModel):
    id: int = Field(description="Increasing; pass the last one as `after` (or Last-Event-ID) to resume.")
    ts: datetime
    stage: str
    level: str
    message: str

    @classmethod
    def of(cls, row: JobEvent) -> "JobEventPublic":
        return cls(id=row.id, ts=row.ts, stage=row.stage, level=row.level, message=redact_text(row.message))


class JobEventList(BaseModel):
    data: list[JobEventPublic]
    finished: bool = Field(description="Whether the job has ended (no more events will come).")


class Curve(BaseModel):
    stage: str = Field(description="e.g. 'teacher:t1', 'stage1:tmkd', 'stage2:tmkd/member-0'.")
    name: str = Field(description="e.g. 'loss'.")
    steps: list[int]
    values: list[float]


class JobMetrics(BaseModel):
    curves: list[Curve]
    final: dict[str, Any] | None = Field(
        description="The evaluation report once the job succeeded: rows per teacher, variant and member."
    )


class ModelVersionPublic(BaseModel):
    """A registered version; where its files lie is the server's business (no path, no tenant id)."""

    id: str
    name: str
    version: int
    job_id: str | None
    metrics: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: ModelVersion) -> "ModelVersionPublic":
        return cls(
            id=row.id,
            name=row.name,
            version=row.version,
            job_id=row.job_id,
            metrics=redact_json(row.metrics),
            created_at=row.created_at,
        )


class ModelVersionList(CursorPage):
    data: list[ModelVersionPublic]


class AliasUpdate(BaseModel):
    version: int = Field(ge=1, le=INTEGER_MAX, description="The version the alias should point at.")


class AliasPublic(BaseModel):
    name: str
    alias: str
    version: int
    updated_at: datetime

    @classmethod
    def of(cls, row: Alias, version: int) -> "AliasPublic":
        return cls(name=row.name, alias=row.alias, version=version, updated_at=row.updated_at)
