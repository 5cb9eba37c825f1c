"""/v1/datasets: upload (multipart JSONL, CSV or TSV), list, get, delete."""

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app.api.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, StoreDep, declared_length
from app.api.schemas import DatasetList, DatasetPublic, ErrorBody
from app.services import datasets as service
from app.services.errors import ApiError

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_CHUNK = 1 << 20
# Room for the multipart framing and the small text fields around the file itself.
FORM_OVERHEAD = 64 * 1024
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422)}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Pairs with question, passage, label (0/1, optional) and qid "
                            "(optional) as JSON Lines, CSV or TSV (with a header row).",
                        },
                        "name": {
                            "type": "string",
                            "description": "Unique per tenant; default: the file name.",
                        },
                        "format": {"type": "string", "enum": list(service.FORMATS)},
                    },
                }
            }
        },
    }
}


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "file_too_large", f"file: uploads are limited to {limit} bytes", "file")


async def _spool_upload(upload: UploadFile, limit: int) -> tuple[Path, str, int]:
    """Copy the upload to a temporary file, hashing it; 413 past `limit` bytes (the file is then removed)."""
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(prefix="qadistill-upload-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await upload.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    responses={
        200: {"model": DatasetPublic, "description": "The same content was uploaded before."},
        **_ERRORS,
    },
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a dataset",
)
async def upload_dataset(
    request: Request,
    response: Response,
    tenant: CurrentTenant,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> DatasetPublic:
    """Validate every row (an error names the line and field), store the file by its sha256.

    Uploading the same content again returns the existing dataset with status 200.
    """
    limit = settings.max_upload_bytes
    declared = declared_length(request)
    if declared is not None and declared > limit + FORM_OVERHEAD:
        raise _too_large(limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(422, "invalid_request", "file: send multipart/form-data with a 'file' part", "file")
    try:
        form = await request.form(max_files=1, max_fields=4)
    except MultiPartException as exc:
        raise ApiError(422, "invalid_request", f"file: {exc.message}", "file") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "file: a 'file' part is required", "file")
        name, fmt = form.get("name"), form.get("format")
        path, sha256, size = await _spool_upload(upload, limit)
    finally:
        await form.close()
    try:
        dataset, created = await run_in_threadpool(
            service.create_dataset,
            session,
            store,
            tenant=tenant,
            local_path=path,
            filename=upload.filename or "upload",
            sha256=sha256,
            size_bytes=size,
            name=name if isinstance(name, str) else None,
            fmt=fmt if isinstance(fmt, str) and fmt else None,
        )
    finally:
        path.unlink(missing_ok=True)
    response.status_code = 201 if created else 200
    return DatasetPublic.of(dataset)


@router.get("", response_model=DatasetList, responses=_ERRORS, summary="List datasets")
def list_datasets(tenant: CurrentTenant, session: SessionDep, page: PageDep) -> DatasetList:
    """The tenant's datasets, newest first."""
    rows, next_cursor = service.list_datasets(session, tenant_id=tenant.id, page=page)
    return DatasetList(data=[DatasetPublic.of(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=_ERRORS, summary="Get a dataset")
def get_dataset(dataset_id: str, tenant: CurrentTenant, session: SessionDep) -> DatasetPublic:
    """One dataset by id or name, with its counts."""
    return DatasetPublic.of(service.get_dataset(session, tenant_id=tenant.id, ref=dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=_ERRORS, summary="Delete a dataset")
def delete_dataset(dataset_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep) -> Response:
    """Delete a dataset and its file; refused (409) while a job that has not finished uses it."""
    service.delete_dataset(session, store, tenant_id=tenant.id, ref=dataset_id)
    return Response(status_code=204)
