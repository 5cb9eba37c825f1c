"""The model registry: versions produced by jobs, and aliases (e.g. `production`) to promote and roll back."""

import logging
import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import INTEGER_MAX, utcnow
from app.db.models import Alias, ModelVersion
from app.services.errors import ApiError
from app.services.pagination import PageRequest, paginate

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_VERSION_NUMBER = re.compile(r"[0-9]{1,10}")


def _not_found(ref: str) -> ApiError:
    return ApiError(404, "model_not_found", f"no model version '{ref}'", "name")


def get_version(session: Session, *, tenant_id: str, name: str, version: int) -> ModelVersion:
    """Version `version` of the tenant's model `name`; 404 otherwise."""
    found = session.scalar(
        select(ModelVersion).where(
            ModelVersion.tenant_id == tenant_id, ModelVersion.name == name, ModelVersion.version == version
        )
    )
    if found is None:
        raise _not_found(f"{name}:{version}")
    return found


def resolve_version(session: Session, *, tenant_id: str, ref: str) -> ModelVersion:
    """The version `ref` names: `name` (its `production` alias, else latest), `name@alias`, `name:version`."""
    if ":" in ref:
        name, _, number = ref.partition(":")
        # ASCII digits only (`str.isdigit` also takes '²', which int() refuses), and no more than a column holds.
        if not _VERSION_NUMBER.fullmatch(number) or int(number) > INTEGER_MAX:
            raise _not_found(ref)
        return get_version(session, tenant_id=tenant_id, name=name, version=int(number))
    name, _, alias = ref.partition("@")
    if alias:
        version = _aliased_version(session, tenant_id=tenant_id, name=name, alias=alias)
        if version is None:
            raise _not_found(ref)
        return version
    version = _aliased_version(session, tenant_id=tenant_id, name=name, alias=DEFAULT_ALIAS)
    if version is None:
        version = session.scalar(
            select(ModelVersion)
            .where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
            .order_by(ModelVersion.version.desc())
            .limit(1)
        )
    if version is None:
        raise _not_found(ref)
    return version


def _aliased_version(session: Session, *, tenant_id: str, name: str, alias: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion)
        .join(Alias, Alias.version_id == ModelVersion.id)
        .where(Alias.tenant_id == tenant_id, Alias.name == name, Alias.alias == alias)
    )


def set_alias(session: Session, *, tenant_id: str, name: str, alias: str, version: int) -> Alias:
    """Point `name@alias` at `version` (promote or roll back); commits."""
    if not ALIAS_PATTERN.match(alias):
        raise ApiError(
            422,
            "invalid_request",
            "alias: lowercase letters, digits, '_' and '-', starting with a letter",
            "alias",
        )
    target = get_version(session, tenant_id=tenant_id, name=name, version=version)
    row = session.scalar(select(Alias).where(Alias.tenant_id == tenant_id, Alias.name == name, Alias.alias == alias))
    if row is None:
        row = Alias(tenant_id=tenant_id, name=name, alias=alias, version_id=target.id)
        session.add(row)
    else:
        row.version_id = target.id
        row.updated_at = utcnow()
    session.commit()
    log.info("alias %s@%s -> version %d (tenant %s)", name, alias, version, tenant_id)
    return row


def delete_alias(session: Session, *, tenant_id: str, name: str, alias: str) -> None:
    """Remove `name@alias` (its version stays registered); 404 when there is no such alias; commits."""
    row = session.scalar(select(Alias).where(Alias.tenant_id == tenant_id, Alias.name == name, Alias.alias == alias))
    if row is None:
        raise ApiError(404, "alias_not_found", f"no alias '{name}@{alias}'", "alias")
    session.delete(row)
    session.commit()
    log.info("alias %s@%s deleted (tenant %s)", name, alias, tenant_id)


def list_aliases(session: Session, *, tenant_id: str, name: str) -> list[tuple[Alias, int]]:
    """The aliases of model `name` with the version number each points at."""
    rows = session.execute(
        select(Alias, ModelVersion.version)
        .join(ModelVersion, Alias.version_id == ModelVersion.id)
        .where(Alias.tenant_id == tenant_id, Alias.name == name)
        .order_by(Alias.alias)
    )
    return [(alias, version) for alias, version in rows]


def list_versions(
    session: Session, *, tenant_id: str, page: PageRequest, name: str | None = None
) -> tuple[list[ModelVersion], str | None]:
    """The tenant's model versions newest first, optionally of one model `name`."""
    stmt = select(ModelVersion).where(ModelVersion.tenant_id == tenant_id)
    if name is not None:
        stmt = stmt.where(ModelVersion.name == name)
    return paginate(session, stmt, created_at=ModelVersion.created_at, row_id=ModelVersion.id, page=page)


def register_version(
    session: Session,
    *,
    tenant_id: str,
    name: str,
    job_id: str | None,
    artifact_uri: str,
    metrics: dict[str, Any],
) -> ModelVersion:
    """Register an ensemble as the next version of `name`; once per job (a rerun gets the same row)."""
    for _ in range(5):
        if job_id is not None:
            existing = session.scalar(select(ModelVersion).where(ModelVersion.job_id == job_id))
            if existing is not None:
                return existing
        latest = session.scalar(
            select(func.max(ModelVersion.version)).where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
        )
        row = ModelVersion(
            tenant_id=tenant_id,
            name=name,
            version=(latest or 0) + 1,
            job_id=job_id,
            artifact_uri=artifact_uri,
            metrics=metrics,
        )
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            # Another job of the same model registered this number first: take the next one.
            session.rollback()
            continue
        log.info("registered %s:%d from job %s", name, row.version, job_id)
        return row
    raise RuntimeError(f"could not register a version of {name} for job {job_id}")
