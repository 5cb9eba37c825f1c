"""Cohere's rerank API, `POST /v2/rerank` and `POST /v1/rerank`, over a registered model version.

What the `cohere` SDK sends (`ClientV2(base_url=..., api_key=...).rerank(...)`) and parses: `model` is a
qadistill model reference (`name`, `name@alias`, `name:version`), the key a tenant's API key, and errors are
`{"message": ...}` with Cohere's statuses (400 for any invalid request, 429 when the model's queue is full).
"""

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from app.api.deps import check_body_size
from app.api.rerank import ApiKeyDep, error_shaped_route, rank
from app.services.errors import ApiError


def render_cohere_error(err: ApiError) -> JSONResponse:
    """`{"message": ...}`; the limits' and validation's 422 are Cohere's 400, a full queue its 429."""
    status = 400 if err.status == 422 else 429 if err.code == "overloaded" else err.status
    return JSONResponse({"message": err.message}, status_code=status, headers=err.headers or None)


router = APIRouter(tags=["rerank"], route_class=error_shaped_route(render_cohere_error))


def document_text(value: Any) -> str:
    """A document's text: the string itself, or the `text` of an object (Cohere's v1 documents)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    raise ValueError("a string or an object with a string `text`")


Document = Annotated[
    str,
    BeforeValidator(document_text),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            ]
        }
    ),
]


class RelevantSpans(BaseModel):
    """Cohere's relevant spans: accepted only when disabled (a cross-encoder scores the document as a whole)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["disabled"]
    threshold: float | None = None
    max_spans: int | None = None


class CohereRerankRequest(BaseModel):
    """Cohere's rerank request (v1 and v2)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        min_length=1,
        description="`name`, `name@alias` or `name:version`. Required on /v2; on /v1 it defaults to "
        "QADISTILL_RERANK_MODEL.",
    )
    query: str = Field(description="The question.")
    documents: list[Document] = Field(description="Strings, or objects with a `text` (v1).")
    top_n: int | None = Field(None, ge=1, description="Return only the best n documents.")
    return_documents: bool = Field(False, description="Echo each document's text as `document.text`.")
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="Accepted; each pair is truncated to the model's own max_length tokens."
    )
    max_chunks_per_doc: int | None = Field(None, ge=1, description="Accepted (v1); documents are not chunked.")
    rank_fields: list[Literal["text"]] | None = Field(None, description="Only `text` is ranked (v1).")
    priority: int | None = Field(None, ge=0, description="Accepted; every request of a model shares one queue.")
    relevant_spans: RelevantSpans | None = None


class DocumentText(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int = Field(description="The document's position in the request.")
    relevance_score: float = Field(description="The ensemble's P(relevant), in [0, 1].")
    document: DocumentText | None = None


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class CohereMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class CohereRerankResponse(BaseModel):
    """The documents, best first."""

    id: str = Field(description="The request id (also the X-Request-ID header).")
    results: list[CohereResult]
    meta: CohereMeta


class CohereError(BaseModel):
    message: str


_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": CohereError, "description": "An invalid request or one over a limit; the message names the field."},
    401: {"model": CohereError, "description": "No valid API key."},
    404: {"model": CohereError, "description": "No such model or version."},
    429: {"model": CohereError, "description": "The model's queue is full; retry after Retry-After seconds."},
    500: {"model": CohereError, "description": "The version's artifact could not be loaded."},
}


async def _rerank(body: CohereRerankRequest, request: Request, key: str, *, api_version: str) -> dict:
    ref = body.model or (request.app.state.settings.rerank_model if api_version == "1" else None)
    if ref is None:
        raise ApiError(422, "invalid_request", "model: required (a model name, name@alias or name:version)", "model")
    if "\x00" in ref:  # PostgreSQL refuses one in any text it compares
        raise ApiError(422, "invalid_request", "model: must not contain a NUL character", "model")
    answer = await rank(
        request, key=key, ref=ref, query=("query", body.query), documents=("documents", body.documents),
        top_n=body.top_n,
    )
    return {
        "id": request.scope.get("request_id") or uuid.uuid4().hex,
        "results": [
            {
                "index": ranked.index,
                "relevance_score": ranked.score,
                "document": {"text": ranked.passage} if body.return_documents else None,
            }
            for ranked in answer.passages
        ],
        "meta": {"api_version": {"version": api_version}, "billed_units": {"search_units": 1}},
    }


@router.post(
    "/v2/rerank",
    response_model=CohereRerankResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(check_body_size)],
    responses=_RESPONSES,
    summary="Rerank (Cohere v2)",
)
async def rerank_v2(body: CohereRerankRequest, request: Request, key: ApiKeyDep) -> dict:
    """Cohere's v2 rerank: the documents ranked by the model's score, best first."""
    return await _rerank(body, request, key, api_version="2")


@router.post(
    "/v1/rerank",
    response_model=CohereRerankResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(check_body_size)],
    responses=_RESPONSES,
    summary="Rerank (Cohere v1)",
)
async def rerank_v1(body: CohereRerankRequest, request: Request, key: ApiKeyDep) -> dict:
    """Cohere's v1 rerank: as v2; `model` defaults to QADISTILL_RERANK_MODEL."""
    return await _rerank(body, request, key, api_version="1")
