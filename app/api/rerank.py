"""What the rerank routes of other APIs share: ranking through the serving runtime, and errors in their own shape.

Cohere's `/v2/rerank` (app/api/rerank_cohere.py) and text-embeddings-inference's `/rerank`
(app/api/rerank_tei.py) rank with the same runtime, micro-batcher, API keys and limits as
`/v1/models/{ref}/answer`; only the request and response shapes differ. Their clients parse errors in their
own shape, so each router renders every error (validation, auth, limits, overload) through its own function.
"""

import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import bearer, bearer_token
from app.api.errors import database_unavailable, validation_error
from app.api.limits import check_limits
from app.api.lookup import VersionLookup
from app.db.retry import is_transient
from app.services.errors import ApiError
from app.services.redact import redact_text
from app.serving.batcher import QueueFullError
from app.serving.runtime import Answer, ModelLoadError, ServingRuntime
from app.settings import Settings

ErrorRenderer = Callable[[ApiError], Response]
# A log-odds beyond which float32 clients see a probability of exactly 0 or 1 anyway.
MAX_LOG_ODDS = 40.0


def error_shaped_route(render: ErrorRenderer) -> type[APIRoute]:
    """An APIRoute class whose every error, raised by the route or by its dependencies, `render` answers."""

    class ShapedErrorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except ApiError as err:
                    return render(err)
                except RequestValidationError as exc:
                    return render(validation_error(list(exc.errors())))
                except StarletteHTTPException as exc:  # e.g. a body that is not JSON at all
                    return render(ApiError(exc.status_code, "invalid_request", f"body: {exc.detail}", "body"))
                except DataError:  # a value no check caught, refused by the database: the request's fault
                    return render(ApiError(422, "invalid_request", "a value of the request is out of range"))
                except DBAPIError as exc:
                    if not is_transient(exc):
                        raise
                    return render(database_unavailable())

            return handle

    return ShapedErrorRoute


async def api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The `Authorization: Bearer <key>` API key; 401 before the body is looked at when there is none."""
    return bearer_token(credentials)


ApiKeyDep = Annotated[str, Depends(api_key)]


async def rank(
    request: Request,
    *,
    key: str,
    ref: str,
    query: tuple[str, str],
    documents: tuple[str, Sequence[str]],
    top_n: int | None,
) -> Answer:
    """Rank `documents` for `query` with the version `ref` names for the key's tenant, best first.

    `query` and `documents` are (field name, value): errors name the field as the caller's API calls it.
    Raises ApiError: 401/404 from the lookup, 422 `empty`/`too_long`/`too_many_passages` on the limits of
    `/answer`, 500 `model_unavailable`, 503 `overloaded` with Retry-After when the model's queue is full.
    """
    settings: Settings = request.app.state.settings
    check_limits(query, documents, settings)
    lookup: VersionLookup = request.app.state.version_lookup
    version = await lookup.resolve(key, ref)
    runtime: ServingRuntime = request.app.state.serving
    try:
        return await runtime.answer(version, query[1], documents[1], top_k=top_n)
    except ModelLoadError as err:
        raise ApiError(500, "model_unavailable", redact_text(str(err))) from err
    except QueueFullError as err:
        raise ApiError(503, "overloaded", str(err), headers={"Retry-After": str(err.retry_after_s)}) from err


def log_odds(probability: float) -> float:
    """log(p / (1 - p)): the score whose sigmoid is `probability`, bounded to +-MAX_LOG_ODDS."""
    p = min(max(probability, 0.0), 1.0)
    if p <= 0.0:
        return -MAX_LOG_ODDS
    if p >= 1.0:
        return MAX_LOG_ODDS
    return max(-MAX_LOG_ODDS, min(MAX_LOG_ODDS, math.log(p) - math.log1p(-p)))
