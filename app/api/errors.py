"""Every error as `{"error": {"code", "message", "param"}}`: service, validation and HTTP errors."""

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.services.errors import ApiError

__all__ = ["ApiError", "install_error_handlers", "validation_error"]

# PipelineSpec's model validators name the field at fault as a prefix: "data.unlabeled: ...".
_FIELD_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*): (.+)$", re.DOTALL)
_LOCATION_ROOTS = {"body", "query", "path", "header", "cookie"}
_HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


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
    return JSONResponse(exc.to_dict(), status_code=exc.status)


async def _handle_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = validation_error(list(exc.errors()))
    return JSONResponse(error.to_dict(), status_code=422)


async def _handle_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail), "param": "body" if exc.status_code == 413 else None}},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the same way."""
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
