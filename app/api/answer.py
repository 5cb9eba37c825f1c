"""`POST /v1/models/{name}/answer`: rank a question's candidate passages with a registered ensemble."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import SettingsDep, bearer, bearer_token, check_body_size
from app.api.limits import check_limits
from app.api.lookup import VersionLookup
from app.api.schemas import ErrorBody
from app.services.errors import ApiError
from app.services.redact import redact_text
from app.serving.batcher import QueueFullError
from app.serving.runtime import ModelLoadError, ServedVersion, ServingRuntime

router = APIRouter(prefix="/v1/models", tags=["answer"])


class AnswerRequest(BaseModel):
    """A question and its candidate passages."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="The question.")
    passages: list[str] = Field(min_length=1, description="Candidate passages, ranked in the answer.")
    top_k: int | None = Field(None, ge=1, description="Return only the best k passages.")
    explain: bool = Field(False, description="Include each member's and each head's score.")
    include_passages: bool = Field(True, description="Echo each passage's text in the answer.")


class ModelRef(BaseModel):
    """The model version that answered."""

    name: str
    version: int


class AnsweredPassage(BaseModel):
    """One passage: its index in the request, its score (P(relevant)) and, when explained, its parts."""

    index: int
    passage: str | None = None
    score: float
    members: list[float] | None = Field(None, description="Each ensemble member's score.")
    heads: dict[str, float] | None = Field(None, description="Each teacher head's score, mean over members.")


class AnswerResponse(BaseModel):
    """The passages, best first."""

    model: ModelRef
    answers: list[AnsweredPassage]
    took_ms: float = Field(description="Server time from arrival at the model to the ranking, milliseconds.")


async def get_runtime(request: Request) -> ServingRuntime:
    """The application's serving runtime."""
    return request.app.state.serving


async def resolve_served_version(
    name: str,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ServedVersion:
    """The version `name` points at now (`name`, `name@alias`, `name:version`); 401 or 404 when there is none.

    Resolved per request through a short-lived cache (VersionLookup): a moved alias answers within
    `serve_lookup_ttl_s` seconds, at once when moved through this process, without a restart.
    """
    lookup: VersionLookup = request.app.state.version_lookup
    return await lookup.resolve(bearer_token(credentials), name)


RuntimeDep = Annotated[ServingRuntime, Depends(get_runtime)]
VersionDep = Annotated[ServedVersion, Depends(resolve_served_version)]


@router.post(
    "/{name}/answer",
    response_model=AnswerResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(check_body_size)],
    responses={
        401: {"model": ErrorBody, "description": "No valid API key."},
        404: {"model": ErrorBody, "description": "No such model or version."},
        422: {"model": ErrorBody, "description": "The request breaks a limit; `param` names the field."},
        500: {"model": ErrorBody, "description": "The version's artifact could not be loaded."},
        503: {"model": ErrorBody, "description": "The model's queue is full; retry after Retry-After seconds."},
    },
)
async def answer(
    body: AnswerRequest, version: VersionDep, runtime: RuntimeDep, settings: SettingsDep
) -> dict | JSONResponse:
    """Rank the passages by the ensemble's score, best first."""
    check_limits(("question", body.question), ("passages", body.passages), settings)
    try:
        result = await runtime.answer(version, body.question, body.passages, top_k=body.top_k, explain=body.explain)
    except ModelLoadError as err:
        raise ApiError(500, "model_unavailable", redact_text(str(err))) from err
    except QueueFullError as err:
        # Rendered here rather than raised: the error handlers do not carry headers.
        return JSONResponse(
            ApiError(503, "overloaded", str(err)).to_dict(),
            status_code=503,
            headers={"Retry-After": str(err.retry_after_s)},
        )
    return {
        "model": {"name": result.version.name, "version": result.version.version},
        "answers": [
            {
                "index": ranked.index,
                "passage": ranked.passage if body.include_passages else None,
                "score": ranked.score,
                "members": ranked.members,
                "heads": ranked.heads,
            }
            for ranked in result.passages
        ],
        "took_ms": round(result.took_ms, 3),
    }
