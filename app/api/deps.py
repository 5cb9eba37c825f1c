"""Typed dependencies: a database session, the settings, the calling tenant, the artifact store."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.errors import database_unavailable
from app.db.base import INTEGER_MAX
from app.db.models import Tenant
from app.db.retry import is_transient, with_db_retry
from app.services.auth import authenticate
from app.services.errors import ApiError
from app.services.pagination import PageRequest
from app.settings import Settings
from app.storage import ArtifactStore

bearer = HTTPBearer(auto_error=False, description="An API key from `qadistill keys create --tenant NAME`.")


# Dependencies that only read app.state are `async def`: FastAPI runs a plain `def` one on a worker thread,
# a hop that costs the answering path more than the lookup itself.


async def get_settings_dep(request: Request) -> Settings:
    """The settings the application was created with."""
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request, committed by the service functions that write.

    Its connection is taken at once, retried with back-off for up to api_retry_max_s seconds while the
    database is unreachable (a restart, a dropped connection); after that the request is answered 503.
    """
    with request.app.state.sessionmaker() as session:
        try:
            with_db_retry(session.connection, max_s=request.app.state.settings.api_retry_max_s)
        except Exception as exc:
            if is_transient(exc):
                raise database_unavailable() from exc
            raise
        yield session


async def get_store(request: Request) -> ArtifactStore:
    """The artifact store."""
    return request.app.state.store


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]


async def reject_nul_characters(request: Request) -> None:
    """422 naming the parameter when a path or query parameter holds a NUL character.

    No id or name contains one, and PostgreSQL refuses one in any text it is asked to compare.
    """
    for params in (request.path_params, request.query_params):
        for name, value in params.items():
            # A list's cursor is checked whole by decode_cursor (400, as any cursor it did not hand out).
            if name != "cursor" and isinstance(value, str) and "\x00" in value:
                raise ApiError(422, "invalid_request", f"{name}: must not contain a NUL character", name)


def declared_length(request: Request) -> int | None:
    """The request's Content-Length when it is a plain decimal number (`str.isdigit` also takes '²')."""
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isascii() and declared.isdigit() else None


async def check_body_size(request: Request, settings: SettingsDep) -> None:
    """422 when the request body is larger than max_request_bytes."""
    declared = declared_length(request)
    too_big = declared is not None and declared > settings.max_request_bytes
    if too_big or len(await request.body()) > settings.max_request_bytes:
        raise ApiError(
            422,
            "request_too_large",
            f"body: the request is larger than {settings.max_request_bytes} bytes",
            "body",
        )


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The API key of an `Authorization: Bearer <key>` header; 401 without one."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'")
    return credentials.credentials


def tenant_of_key(session: Session, token: str) -> Tenant:
    """The tenant owning the live API key `token`; 401 when there is none."""
    tenant = authenticate(session, token)
    if tenant is None:
        raise ApiError(401, "unauthorized", "the API key is not valid")
    return tenant


def get_current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    """The tenant whose Bearer API key came with the request; 401 without a valid one."""
    return tenant_of_key(session, bearer_token(credentials))


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def query_parameters(dependant: Dependant) -> set[str]:
    """The names of the query parameters a route (its own and its dependencies') takes."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= query_parameters(sub)
    return names


async def get_page(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page; any other value is a 400.")
    ] = None,
) -> PageRequest:
    """The page a list request asks for; 400 on a query parameter the list does not take.

    A client paging by another API's convention (`after`, `starting_after`, `page`, `offset`) would otherwise
    get the first page back for ever.
    """
    route = request.scope.get("route")
    if isinstance(route, APIRoute):
        known = query_parameters(route.dependant)
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise ApiError(
                400,
                "invalid_request",
                f"{unknown[0]}: not a parameter of this list (it takes {', '.join(sorted(known))}); "
                "pass the previous page's `next_cursor` as `cursor`",
                unknown[0],
            )
    return PageRequest(limit=limit, cursor=cursor)


PageDep = Annotated[PageRequest, Depends(get_page)]
VersionNumber = Annotated[int, Path(ge=1, le=INTEGER_MAX, description="A version number of the model.")]
