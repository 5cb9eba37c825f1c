"""`GET /v1/models/{ref}/download`: a version's standard model folders as a tar.gz archive.

The archive holds `<name>-v<version>/member-<i>/`, one folder per ensemble member, each a plain
cross-encoder (`sentence_transformers.CrossEncoder`, `AutoModelForSequenceClassification`) or a
`sentence_transformers.SentenceTransformer` folder (see app/distill/standard.py), and `standard.json`
saying which is which.
"""

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from app.api.deps import CurrentTenant, SessionDep
from app.api.schemas import ErrorBody
from app.distill.manifest import EnsembleFormatError, read_manifest
from app.services import registry
from app.services.errors import ApiError

router = APIRouter(prefix="/v1/models", tags=["models"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/gzip": {}}, "description": "A tar.gz archive of the standard folders."},
} | {code: {"model": ErrorBody} for code in (401, 404)}


@router.get("/{ref}/download", response_class=FileResponse, responses=_RESPONSES, summary="Download a version")
def download_version(ref: str, request: Request, tenant: CurrentTenant, session: SessionDep) -> FileResponse:
    """`ref` (`name`, `name@alias`, `name:version`) as standard model folders, one per member, in a tar.gz."""
    row = registry.resolve_version(session, tenant_id=tenant.id, ref=ref)
    folder = request.app.state.downloads.fetch(row.artifact_uri)
    try:
        manifest = read_manifest(folder)
    except EnsembleFormatError as err:
        raise ApiError(404, "model_not_found", f"model {ref}: its artifact is not readable: {err}", "ref") from err
    if not manifest.standard:
        raise ApiError(
            404, "model_not_found",
            f"model {ref}: version {row.version} has no standard folder (a bilstm student, or an encoder other "
            "than BERT, has none; versions registered before standard folders existed neither)", "ref",
        )  # fmt: skip
    stem = f"{row.name}-v{row.version}"
    archive = _write_archive(folder, stem, [entry.model_dump() for entry in manifest.standard])
    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=f"{stem}.tar.gz",
        background=BackgroundTask(os.unlink, archive),
    )


def _write_archive(folder: Path, stem: str, entries: list[dict[str, Any]]) -> Path:
    """A temporary tar.gz of the standard folders under `stem/`, with standard.json describing them."""
    handle, name = tempfile.mkstemp(prefix="qadistill-download-", suffix=".tar.gz")
    os.close(handle)
    try:
        with tarfile.open(name, "w:gz") as tar:
            for entry in entries:
                tar.add(folder / entry["path"], arcname=f"{stem}/{entry['member']}")
            listing = json.dumps([entry | {"path": entry["member"]} for entry in entries], indent=2).encode()
            info = tarfile.TarInfo(f"{stem}/standard.json")
            info.size = len(listing)
            tar.addfile(info, io.BytesIO(listing))
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)

