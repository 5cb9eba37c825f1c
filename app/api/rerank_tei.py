"""text-embeddings-inference's rerank API, `POST /rerank`, served by the configured QADISTILL_RERANK_MODEL.

What TEI's clients (LlamaIndex's and LangChain's TEI rerankers, plain HTTP) send and parse: the model is not
in the request, so QADISTILL_RERANK_MODEL names it, resolved for the calling key's tenant; errors are
`{"error": ..., "error_type": ...}` with TEI's statuses (400 `empty`, 413 `validation` for a limit, 429
`overloaded`, 424 `backend`).
"""

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import check_body_size
from app.api.rerank import ApiKeyDep, error_shaped_route, log_odds, rank
from app.services.errors import ApiError

# ApiError code -> TEI's (status, error_type); other errors keep their status.
_TEI_ERRORS = {
    "empty": (400, "empty"),
    "too_many_passages": (413, "validation"),
    "too_long": (413, "validation"),
    "request_too_large": (413, "validation"),
    "overloaded": (429, "overloaded"),
    "model_unavailable": (424, "backend"),
    "no_rerank_model": (424, "backend"),
    "database_unavailable": (503, "unhealthy"),
}
_TEI_TYPES = {401: "unauthorized", 404: "not_found", 422: "validation"}


def render_tei_error(err: ApiError) -> JSONResponse:
    """`{"error": message, "error_type": type}` with TEI's status for the error."""
    status, error_type = _TEI_ERRORS.get(err.code, (err.status, _TEI_TYPES.get(err.status, "backend")))
    return JSONResponse(
        {"error": err.message, "error_type": error_type}, status_code=status, headers=err.headers or None
    )


router = APIRouter(tags=["rerank"], route_class=error_shaped_route(render_tei_error))


class TeiRerankRequest(BaseModel):
    """TEI's rerank request."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="The question.")
    texts: list[str] = Field(description="The candidate passages.")
    raw_scores: bool = Field(
        False, description="Score as the log-odds of P(relevant) (its sigmoid is the default score)."
    )
    return_text: bool = Field(False, description="Echo each text as `text`.")
    truncate: bool | None = Field(
        None, description="Accepted; pairs are always truncated to the model's max_length tokens."
    )
    truncation_direction: Literal["right", "Right"] = Field(
        "right", description="Only `right`: the end of a long passage is cut."
    )


class TeiRank(BaseModel):
    index: int = Field(description="The text's position in the request.")
    score: float = Field(description="P(relevant), or its log-odds with raw_scores.")
    text: str | None = None


class TeiError(BaseModel):
    error: str
    error_type: str


_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": TeiError, "description": "`texts` is empty (`empty`)."},
    401: {"model": TeiError, "description": "No valid API key (`unauthorized`)."},
    404: {"model": TeiError, "description": "QADISTILL_RERANK_MODEL names no version of the tenant (`not_found`)."},
    413: {"model": TeiError, "description": "A limit is broken (`validation`): too many texts, a text too long."},
    422: {"model": TeiError, "description": "An invalid request (`validation`); the message names the field."},
    424: {"model": TeiError, "description": "No rerank model configured, or it could not be loaded (`backend`)."},
    429: {"model": TeiError, "description": "The model's queue is full (`overloaded`); retry after Retry-After."},
}


@router.post(
    "/rerank",
    response_model=list[TeiRank],
    response_model_exclude_none=True,
    dependencies=[Depends(check_body_size)],
    responses=_RESPONSES,
    summary="Rerank (text-embeddings-inference)",
)
async def rerank(body: TeiRerankRequest, request: Request, key: ApiKeyDep) -> list[dict]:
    """TEI's rerank: every text with its score, best first."""
    ref = request.app.state.settings.rerank_model
    if ref is None:
        raise ApiError(424, "no_rerank_model", "no rerank model is configured: set QADISTILL_RERANK_MODEL")
    answer = await rank(
        request, key=key, ref=ref, query=("query", body.query), documents=("texts", body.texts), top_n=None
    )
    return [
        {
            "index": ranked.index,
            "score": log_odds(ranked.score) if body.raw_scores else ranked.score,
            "text": ranked.passage if body.return_text else None,
        }
        for ranked in answer.passages
    ]
