"""OpenAI's ``/v1/embeddings`` and ``/v1/models``, and the Cohere/Jina ``/v1/rerank``.

``model`` names an instance, a ``served_model_name`` or a model id (balanced over
running replicas). A list input goes to the instance as one ``EmbedStream`` call
with every input in flight, so the instance batches them; token-id inputs are
decoded to text by the instance's own tokenizer first (tei.v1 embeds text only).
``dimensions`` is tei.v1's Matryoshka field: the instance truncates and
renormalises. The response JSON is assembled from the reply bytes (see
:mod:`tei_manager.gateway.encoding`).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
``code`` being the manager's machine code (``MODEL_NOT_FOUND``, ``OVERLOADED`` ...).
"""

from __future__ import annotations

import uuid
from typing import Final, Literal

import msgspec
import trio

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.api.inference import (
    Answer,
    InferenceRequest,
    InferenceRoute,
    decode_body,
    json_bytes,
    retry_headers,
)
from tei_manager.api.routing_key import request_target
from tei_manager.errors import quote
from tei_manager.gateway import encoding
from tei_manager.gateway.calls import decode_ids, embed_texts
from tei_manager.gateway.errors import InferenceError, Kind
from tei_manager.gateway.relay import Gateway, status_hint

__all__ = ["OPENAI_ROUTES", "OpenAIDoor", "OpenAIHandlers"]

#: OpenAI's own limit on inputs per embeddings request.
MAX_INPUTS: Final = 2048

_encode: Final = msgspec.json.encode


# --- bodies ------------------------------------------------------------------------------


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings`` (unknown fields are ignored, as OpenAI-compatible servers do).

    ``model`` may be left out when an ``x-tei-model`` or ``x-tei-instance`` header names it.
    """

    model: str | None = None
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Embedding(msgspec.Struct, kw_only=True):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tei-manager"


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RerankDocument(msgspec.Struct):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/rerank``: the body Cohere's and Jina's rerank APIs share (``model``
    as in :class:`EmbeddingsRequest`)."""

    model: str | None = None
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = None
    return_documents: bool = False


class RerankResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(msgspec.Struct, kw_only=True):
    total_tokens: int


class RerankResponse(msgspec.Struct, kw_only=True):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(msgspec.Struct, kw_only=True):
    error: ErrorDetail


# --- errors ------------------------------------------------------------------------------


class OpenAIDoor:
    """OpenAI's error shape and statuses."""

    error_type: object = OpenAIError

    def status(self, error: InferenceError) -> int:
        return status_hint(error)

    def error_response(self, error: InferenceError) -> Answer:
        status = status_hint(error)
        if status == 429:
            kind = "rate_limit_error"
        elif status >= 500:
            kind = "server_error"
        else:
            kind = "invalid_request_error"
        body = OpenAIError(
            error=ErrorDetail(
                message=error.message, type=kind, param=error.param, code=error.code.value
            )
        )
        return json_bytes(_encode(body), status, retry_headers(error))


# --- inputs ------------------------------------------------------------------------------


def _texts_or_ids(
    value: str | list[str | int | list[int]],
) -> tuple[list[str], list[list[int]]]:
    """``input`` as texts or (the other list empty) token-id lists.

    EMPTY or VALIDATION naming the item otherwise.
    """
    if isinstance(value, str):
        items: list[str | int | list[int]] = [value]
    else:
        items = value
    if not items:
        raise InferenceError(Kind.EMPTY, "input: must not be empty", param="input")
    if len(items) > MAX_INPUTS:
        raise InferenceError(
            Kind.VALIDATION,
            f"input: {len(items)} items, at most {MAX_INPUTS} per request",
            param="input",
        )
    first = items[0]
    if isinstance(first, int):  # one token-id list
        if not all(isinstance(i, int) for i in items):
            raise InferenceError(
                Kind.VALIDATION, "input: a token-id list holds only integers", param="input"
            )
        return [], [_token_ids(items, "input")]  # type: ignore[arg-type]
    if isinstance(first, str):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise InferenceError(
                    Kind.VALIDATION,
                    f"input[{i}]: expected a string like input[0]",
                    param=f"input[{i}]",
                )
            if not item:
                raise InferenceError(
                    Kind.EMPTY, f"input[{i}]: must not be empty", param=f"input[{i}]"
                )
        return items, []  # type: ignore[return-value]
    lists: list[list[int]] = []
    for i, item in enumerate(items):
        if not isinstance(item, list):
            raise InferenceError(
                Kind.VALIDATION,
                f"input[{i}]: expected a token-id list like input[0]",
                param=f"input[{i}]",
            )
        lists.append(_token_ids(item, f"input[{i}]"))
    return [], lists


def _token_ids(ids: list[int], where: str) -> list[int]:
    if not ids:
        raise InferenceError(Kind.EMPTY, f"{where}: must not be empty", param="input")
    for i in ids:
        if not 0 <= i < 1 << 32:
            raise InferenceError(
                Kind.VALIDATION, f"{where}: token id {i} is out of range", param="input"
            )
    return ids


# --- handlers ------------------------------------------------------------------------------


class OpenAIHandlers:
    """One method per route in :data:`OPENAI_ROUTES`."""

    def __init__(self, gateway: Gateway, door: OpenAIDoor) -> None:
        self._gateway = gateway
        self._status = door.status

    async def openai_embeddings(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, EmbeddingsRequest)
        model = request_target(request, req.model)
        texts, id_lists = _texts_or_ids(req.input)
        if req.dimensions is not None and req.dimensions < 1:
            raise InferenceError(
                Kind.VALIDATION, "dimensions: must be at least 1", param="dimensions"
            )
        async with self._gateway.session("/v1/embeddings", model, self._status) as session:
            await session.require(tei_pb2.MODEL_TYPE_EMBEDDING, "embed: use /v1/rerank")
            if id_lists:
                texts = await decode_ids(session, id_lists)
            matrix, tokens = await embed_texts(
                session, texts, normalize=True, dimensions=req.dimensions
            )
            session.tokens = tokens
        if req.encoding_format == "base64":
            rows = encoding.base64_rows(matrix)
        elif matrix.size >= encoding.ARROW_MIN_FLOATS:
            rows = await trio.to_thread.run_sync(encoding.json_rows, matrix)
        else:
            rows = encoding.json_rows(matrix)
        return json_bytes(_embeddings_body(rows, model, tokens))

    async def openai_list_models(self, request: InferenceRequest) -> Answer:
        return json_bytes(_encode(ModelList(data=self._cards())))

    async def openai_retrieve_model(self, request: InferenceRequest) -> Answer:
        model = request_target(request, request.model)
        for card in self._cards():
            if card.id == model:
                return json_bytes(_encode(card))
        shown = model if len(model) <= 200 else model[:200] + "..."
        raise InferenceError(
            Kind.NOT_FOUND, f"no instance, alias or model {quote(shown)}", param="model"
        )

    def _cards(self) -> list[ModelCard]:
        """Every name a request's ``model`` can take: instance names, aliases, model ids."""
        cards: dict[str, ModelCard] = {}
        for record in self._gateway.instances:
            created = int(record.created_at.timestamp())
            for name in (record.name, record.config.served_model_name, record.config.model_id):
                if name is not None and name not in cards:
                    cards[name] = ModelCard(id=name, created=created)
        return list(cards.values())

    async def openai_rerank(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, RerankRequest)
        model = request_target(request, req.model)
        if not req.documents:
            raise InferenceError(Kind.EMPTY, "documents: must not be empty", param="documents")
        if req.top_n is not None and req.top_n < 1:
            raise InferenceError(Kind.VALIDATION, "top_n: must be at least 1", param="top_n")
        texts = [d if isinstance(d, str) else d.text for d in req.documents]
        async with self._gateway.session("/v1/rerank", model, self._status) as session:
            await session.require(tei_pb2.MODEL_TYPE_RERANKER, "rerank: use /v1/embeddings")
            message = tei_pb2.RerankRequest(query=req.query, texts=texts).SerializeToString()
            reply = tei_pb2.RerankResponse.FromString(
                await session.unary(tei_grpc.Rerank.Rerank, message)
            )
            session.tokens = reply.metadata.compute_tokens
        ranks = sorted(reply.ranks, key=lambda rank: rank.score, reverse=True)
        if req.top_n is not None:
            ranks = ranks[: req.top_n]
        results = [
            RerankResult(
                index=rank.index,
                relevance_score=rank.score,
                document=RerankDocument(texts[rank.index]) if req.return_documents else None,
            )
            for rank in ranks
        ]
        body = RerankResponse(
            id=f"rerank-{uuid.uuid4().hex}",
            model=model,
            results=results,
            usage=RerankUsage(total_tokens=session.tokens),
        )
        return json_bytes(_encode(body))


def _embeddings_body(rows: list[bytes], model: str, tokens: int) -> bytes:
    """OpenAI's embeddings response, assembled around the already encoded rows."""
    parts = [b'{"object":"list","data":[']
    for i, row in enumerate(rows):
        if i:
            parts.append(b",")
        parts.append(b'{"object":"embedding","index":%d,"embedding":' % i)
        parts.append(row)
        parts.append(b"}")
    parts.append(b'],"model":')
    parts.append(_encode(model))
    parts.append(b',"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (tokens, tokens))
    return b"".join(parts)


_IN: Final = (400, 404, 413, 429, 503, 504)

OPENAI_ROUTES: Final[tuple[InferenceRoute, ...]] = (
    InferenceRoute(
        "openai_embeddings", "POST", "/v1/embeddings",
        "OpenAI-compatible embeddings of a string, strings or token ids",
        EmbeddingsResponse, EmbeddingsRequest, _IN,
    ),
    InferenceRoute(
        "openai_list_models", "GET", "/v1/models",
        "The names a request's model can take: instances, served_model_names, model ids",
        ModelList,
    ),
    InferenceRoute(
        "openai_retrieve_model", "GET", "/v1/models/{model}", "One servable model", ModelCard,
        statuses=(404,),
    ),
    InferenceRoute(
        "openai_rerank", "POST", "/v1/rerank",
        "Cohere/Jina-style rerank: documents by relevance to the query",
        RerankResponse, RerankRequest, _IN,
    ),
)  # fmt: skip
