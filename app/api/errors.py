"""Every error as `{"error": {"code", "message", "param"}}`: service, validation, HTTP and unexpected errors."""

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.retry import is_transient
from app.logs import REQUEST_ID
from app.services.errors import ApiError

__all__ = ["ApiError", "RequestIds", "install_error_handlers", "validation_error"]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own request id is echoed only when it is a short token: it lands in logs and in headers.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# PipelineSpec's model validators name the field at fault as a prefix: "data.unlabeled: ...".
_FIELD_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*): (.+)$", re.DOTALL)
_LOCATION_ROOTS = {"body", "query", "path", "header", "cookie"}
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "too_many_requests",
}
# The statuses whose error names the body (FastAPI answers 400 for a JSON body it cannot parse: nested too
# deeply, or a number with too many digits).
_BODY_STATUSES = frozenset({400, 413})


def validation_error(errors: list[Any]) -> ApiError:
    """A 422 ApiError for the first pydantic error, `param` the dotted path of the field at fault."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in _LOCATION_ROOTS:
        loc = loc[1:]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    param = ".".join(loc) or None
    match = _FIELD_PREFIX.match(message)
    if match:
        field, message = match.groups()
        param = ".".join([*loc, field])
    if param:
        message = f"{param}: {message}"
    return ApiError(422, "invalid_request", message, param)


async def _handle_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers or None)


async def _handle_data_error(request: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL refused a value of the request (out of range, a NUL, ...) that no check caught before it:
    # the request is at fault, not the service, but the log keeps it so that a check can be added.
    log.warning("request %s: the database refused a value: %s", request.scope.get("request_id"), exc.orig)
    error = ApiError(422, "invalid_request", "a value of the request is out of the range the service accepts")
    return JSONResponse(error.to_dict(), status_code=422)


# How long a client should wait before retrying while the database is unreachable (a restart takes seconds).
UNAVAILABLE_RETRY_AFTER_S = 5


def database_unavailable() -> ApiError:
    """The 503 answered while the database cannot be reached."""
    return ApiError(
        503,
        "database_unavailable",
        "the database is unreachable for the moment; retry later",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
    )


async def _handle_database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if not is_transient(exc):
        raise exc
    log.warning("request %s: database unreachable: %s", request.scope.get("request_id"), type(exc.orig).__name__)
    error = database_unavailable()
    return JSONResponse(error.to_dict(), status_code=503, headers=error.headers)


async def _handle_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = validation_error(list(exc.errors()))
    return JSONResponse(error.to_dict(), status_code=422)


async def _handle_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    param = "body" if exc.status_code in _BODY_STATUSES else None
    message = f"body: {exc.detail}" if param else str(exc.detail)
    return JSONResponse(
        {"error": {"code": code, "message": message, "param": param}},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the same way."""
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
    app.add_exception_handler(DataError, _handle_data_error)
    app.add_exception_handler(DBAPIError, _handle_database_error)


class RequestIds:
    """ASGI middleware: give every request an id and answer any unexpected error as a JSON 500 naming it.

    The id is the client's `X-Request-ID` when that is a short token, else a new one; it comes back in the
    response's `X-Request-ID` and in the log line of a failure, so that a user's report finds the traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope["request_id"] = request_id
        token = REQUEST_ID.set(request_id)  # every log line written while serving it carries it
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: %s %s failed", request_id, scope["method"], scope["path"])
            if started:  # a streamed response is under way: nothing else can be sent
                raise
            error = ApiError(
                500,
                "internal_error",
                f"an unexpected error occurred; quote request id {request_id} when reporting it",
            )
            await JSONResponse(error.to_dict(), status_code=500)(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
