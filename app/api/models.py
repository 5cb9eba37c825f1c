"""/v1/models: the registry of model versions, and aliases to promote or roll back."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import CurrentTenant, PageDep, SessionDep, VersionNumber
from app.api.schemas import AliasPublic, AliasUpdate, ErrorBody, ModelVersionList, ModelVersionPublic
from app.services import registry

router = APIRouter(prefix="/v1/models", tags=["models"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 422)}


@router.get("", response_model=ModelVersionList, responses=_ERRORS, summary="List model versions")
def list_versions(
    tenant: CurrentTenant,
    session: SessionDep,
    page: PageDep,
    name: Annotated[str | None, Query(description="Only versions of this model.")] = None,
) -> ModelVersionList:
    """The tenant's model versions, newest first."""
    rows, next_cursor = registry.list_versions(session, tenant_id=tenant.id, page=page, name=name)
    return ModelVersionList(data=[ModelVersionPublic.of(r) for r in rows], next_cursor=next_cursor)


@router.get("/{ref}", response_model=ModelVersionPublic, responses=_ERRORS, summary="Get a model version")
def get_version(ref: str, tenant: CurrentTenant, session: SessionDep) -> ModelVersionPublic:
    """`name` (its `production` alias, else the latest version), `name@alias` or `name:version`."""
    return ModelVersionPublic.of(registry.resolve_version(session, tenant_id=tenant.id, ref=ref))


@router.get("/{name}/versions/{version}", response_model=ModelVersionPublic, responses=_ERRORS, summary="Get a version")
def get_numbered_version(
    name: str, version: VersionNumber, tenant: CurrentTenant, session: SessionDep
) -> ModelVersionPublic:
    """Version `version` of model `name`."""
    return ModelVersionPublic.of(registry.get_version(session, tenant_id=tenant.id, name=name, version=version))


@router.get("/{name}/aliases", response_model=list[AliasPublic], responses=_ERRORS, summary="List aliases")
def list_aliases(name: str, tenant: CurrentTenant, session: SessionDep) -> list[AliasPublic]:
    """The aliases of one model and the version each points at."""
    return [AliasPublic.of(a, v) for a, v in registry.list_aliases(session, tenant_id=tenant.id, name=name)]


@router.put("/{name}/aliases/{alias}", response_model=AliasPublic, responses=_ERRORS, summary="Set an alias")
def set_alias(
    name: str, alias: str, body: AliasUpdate, request: Request, tenant: CurrentTenant, session: SessionDep
) -> AliasPublic:
    """Point `name@alias` at a version: promote a new one to `production`, or roll back."""
    row = registry.set_alias(session, tenant_id=tenant.id, name=name, alias=alias, version=body.version)
    request.app.state.version_lookup.clear()  # this process answers with the new version at once
    return AliasPublic.of(row, body.version)


@router.delete("/{name}/aliases/{alias}", status_code=204, responses=_ERRORS, summary="Delete an alias")
def delete_alias(name: str, alias: str, request: Request, tenant: CurrentTenant, session: SessionDep) -> Response:
    """Remove `name@alias`: it stops resolving at once in this process (within serve_lookup_ttl_s elsewhere)."""
    registry.delete_alias(session, tenant_id=tenant.id, name=name, alias=alias)
    request.app.state.version_lookup.clear()
    return Response(status_code=204)
