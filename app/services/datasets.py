"""Datasets: validate an uploaded file row by row, store it content-addressed, list, find and delete."""

import logging
import re
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import FINISHED_STATUSES, Dataset, Job, JobDataset, Tenant
from app.distill.data import DataError, read_pairs
from app.services.errors import ApiError
from app.services.pagination import PageRequest, paginate
from app.storage import ArtifactStore

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "tsv")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def choose_format(filename: str, fmt: str | None) -> str:
    """The file format: `fmt` when given, else from the file name's suffix; 422 naming `format` if neither."""
    if fmt:
        if fmt not in FORMATS:
            raise ApiError(422, "invalid_request", f"format: must be one of {', '.join(FORMATS)}", "format")
        return fmt
    guessed = _SUFFIX_FORMATS.get(Path(filename).suffix.lower())
    if guessed is None:
        raise ApiError(
            422,
            "invalid_request",
            f"format: cannot tell the format of '{filename}'; name it .jsonl, .csv or .tsv, or send a 'format' field",
            "format",
        )
    return guessed


def choose_name(filename: str, name: str | None) -> str:
    """The dataset name: `name` when given, else the file name without its suffix; 422 if not a valid name."""
    chosen = name if name else Path(filename).stem
    if not _NAME.match(chosen) or chosen.startswith("ds_"):
        raise ApiError(
            422,
            "invalid_request",
            f"name: '{chosen}' is not a valid dataset name (letters, digits, '.', '_', '-'; "
            "up to 128 characters; not starting with 'ds_')",
            "name",
        )
    return chosen


def create_dataset(
    session: Session,
    store: ArtifactStore,
    *,
    tenant: Tenant,
    local_path: Path,
    filename: str,
    sha256: str,
    size_bytes: int,
    name: str | None = None,
    fmt: str | None = None,
) -> tuple[Dataset, bool]:
    """Validate and store an uploaded file; returns (dataset, created): known content is the existing one."""
    fmt = choose_format(filename, fmt)
    name = choose_name(filename, name)
    existing = session.scalar(select(Dataset).where(Dataset.tenant_id == tenant.id, Dataset.sha256 == sha256))
    if existing is not None:
        return existing, False
    if session.scalar(select(Dataset.id).where(Dataset.tenant_id == tenant.id, Dataset.name == name)):
        raise ApiError(409, "name_taken", f"name: a dataset called '{name}' already exists", "name")
    try:
        result = read_pairs(local_path, fmt=fmt)
    except DataError as err:
        where = f"line {err.line}, field '{err.field}'" if err.line else "file"
        if err.line and not err.field:
            where = f"line {err.line}"
        raise ApiError(422, "invalid_file", f"{filename}: {where}: {err.message}", "file") from err
    except RecursionError as err:
        raise ApiError(422, "invalid_file", f"{filename}: a value is nested too deeply", "file") from err
    except ValueError as err:
        # Not a DataError: json.loads refusing an integer longer than Python converts, with a plain ValueError.
        limit = sys.get_int_max_str_digits()
        raise ApiError(422, "invalid_file", f"{filename}: a number has more than {limit} digits", "file") from err
    labelled = all(pair.label is not None for pair in result.pairs)
    uri = store.put_file(local_path, f"{tenant.id}/datasets/{sha256}.{fmt}")
    dataset = Dataset(
        tenant_id=tenant.id,
        name=name,
        sha256=sha256,
        format=fmt,
        pairs=len(result.pairs),
        questions=result.questions,
        positives=result.positives,
        labelled=labelled,
        size_bytes=size_bytes,
        artifact_uri=uri,
    )
    session.add(dataset)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return _settle_upload_race(session, store, tenant=tenant, sha256=sha256, name=name, uri=uri), False
    log.info("dataset %s stored for tenant %s (%d pairs)", dataset.id, tenant.id, dataset.pairs)
    return dataset, True


def _settle_upload_race(
    session: Session, store: ArtifactStore, *, tenant: Tenant, sha256: str, name: str, uri: str
) -> Dataset:
    # A concurrent upload won: same content means the same dataset (and the blob is its blob too).
    winner = session.scalar(select(Dataset).where(Dataset.tenant_id == tenant.id, Dataset.sha256 == sha256))
    if winner is not None:
        return winner
    store.delete(uri)
    raise ApiError(409, "name_taken", f"name: a dataset called '{name}' already exists", "name")


def find_dataset(session: Session, *, tenant_id: str, ref: str) -> Dataset | None:
    """The tenant's dataset with id or name `ref`."""
    if "\x00" in ref:  # no id or name holds one, and PostgreSQL refuses to compare text that does
        return None
    by_id = session.scalar(select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.id == ref))
    if by_id is not None:
        return by_id
    return session.scalar(select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.name == ref))


def get_dataset(session: Session, *, tenant_id: str, ref: str) -> Dataset:
    """The tenant's dataset with id or name `ref`; 404 otherwise (also for another tenant's)."""
    dataset = find_dataset(session, tenant_id=tenant_id, ref=ref)
    if dataset is None:
        raise ApiError(404, "dataset_not_found", f"no dataset '{ref}'", "dataset_id")
    return dataset


def list_datasets(session: Session, *, tenant_id: str, page: PageRequest) -> tuple[list[Dataset], str | None]:
    """The tenant's datasets, newest first, one page."""
    stmt = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return paginate(session, stmt, created_at=Dataset.created_at, row_id=Dataset.id, page=page)


def delete_dataset(session: Session, store: ArtifactStore, *, tenant_id: str, ref: str) -> None:
    """Delete a dataset and its file; 409 while a job that is not finished reads it."""
    dataset = get_dataset(session, tenant_id=tenant_id, ref=ref)
    busy = session.scalar(
        select(Job.id)
        .join(JobDataset, JobDataset.job_id == Job.id)
        .where(JobDataset.dataset_id == dataset.id, Job.status.not_in(FINISHED_STATUSES))
        .limit(1)
    )
    if busy is not None:
        raise ApiError(409, "dataset_in_use", f"dataset '{dataset.name}' is used by job {busy}", "dataset_id")
    uri = dataset.artifact_uri
    session.delete(dataset)
    session.commit()
    # The row goes first: a leftover file is harmless, a row pointing at no file is not.
    store.delete(uri)
