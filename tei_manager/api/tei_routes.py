"""TEI's own HTTP API, per instance, under ``/tei/{model}/``.

The routes, request bodies, response bodies, error bodies (``{"error",
"error_type"}``) and statuses of text-embeddings-inference's HTTP server, so a
client written for one TEI works against any instance by changing only its base
URL. ``{model}`` is an instance name, a ``served_model_name`` or a model id (then
balanced over running replicas). Requests are relayed as tei.v1 calls: a batch is
one stream call, every input in flight, so the instance batches it.

TEI's statuses: 400 empty input, 413 body too large, 422 validation or tokenizer
error (a batch over ``max_client_batch_size`` included), 424 the model cannot do
it or failed, 429 overloaded, 503 unhealthy. We add 404 for a model nobody serves
(TEI serves one model, so it has no such answer).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
import numpy as np
import trio

from tei_manager import __version__
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
from tei_manager.core.instances import InstanceStatus
from tei_manager.errors import quote
from tei_manager.gateway import encoding
from tei_manager.gateway.calls import decode_ids, embed_texts, unary_or_stream
from tei_manager.gateway.errors import InferenceError, Kind
from tei_manager.gateway.relay import Gateway, Session
from tei_manager.grpc.rpc import MethodSpec

__all__ = ["TEI_ROUTES", "TeiDoor", "TeiHandlers"]

_encode: Final = msgspec.json.encode

Direction = Literal["left", "right", "Left", "Right"]
TextOrIds = str | list[int]


# --- bodies (TEI's http/types.rs) ------------------------------------------------------------


class TeiEmbedRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[str | int | list[int]]
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None
    normalize: bool = True
    dimensions: int | None = None


class TeiEmbedSparseRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[str | int | list[int]]
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


class TeiEmbedAllRequest(TeiEmbedSparseRequest, kw_only=True):
    pass


class TeiPredictRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[str | list[str]]
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False


class TeiRerankRequest(msgspec.Struct, kw_only=True):
    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False
    return_text: bool = False


class TeiSimilarityInput(msgspec.Struct, kw_only=True):
    source_sentence: str
    sentences: list[str]


class TeiSimilarityParameters(msgspec.Struct, kw_only=True):
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


class TeiSimilarityRequest(msgspec.Struct, kw_only=True):
    inputs: TeiSimilarityInput
    parameters: TeiSimilarityParameters | None = None


class TeiTokenizeRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class TeiDecodeRequest(msgspec.Struct, kw_only=True):
    ids: list[int | list[int]]
    skip_special_tokens: bool = True


class TeiSparseValue(msgspec.Struct):
    index: int
    value: float


class TeiPrediction(msgspec.Struct):
    score: float
    label: str


class TeiRank(msgspec.Struct, omit_defaults=True):
    index: int
    score: float
    text: str | None = None


class TeiSimpleToken(msgspec.Struct):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TeiEmbeddingModel(msgspec.Struct):
    pooling: str


class TeiClassifierModel(msgspec.Struct):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TeiModelType(msgspec.Struct, omit_defaults=True):
    embedding: TeiEmbeddingModel | None = None
    classifier: TeiClassifierModel | None = None
    reranker: TeiClassifierModel | None = None


class TeiInfo(msgspec.Struct, kw_only=True):
    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: TeiModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None


class TeiErrorResponse(msgspec.Struct):
    error: str
    error_type: str


# --- errors ------------------------------------------------------------------------------

# TEI's ErrorType names, as its serde writes them, and its statuses.
_ERRORS: Final = {
    Kind.VALIDATION: (422, "Validation"),
    Kind.EMPTY: (400, "Empty"),
    Kind.TOO_LARGE: (413, "Validation"),
    Kind.NOT_FOUND: (404, "Validation"),
    Kind.UNSUPPORTED: (424, "Backend"),
    Kind.OVERLOADED: (429, "Overloaded"),
    Kind.UNAVAILABLE: (503, "Unhealthy"),
    Kind.TIMEOUT: (424, "Backend"),
    Kind.BACKEND: (424, "Backend"),
}


class TeiDoor:
    """TEI's error shape and statuses."""

    error_type: object = TeiErrorResponse

    def status(self, error: InferenceError) -> int:
        return _ERRORS[error.kind][0]

    def error_response(self, error: InferenceError) -> Answer:
        status, name = _ERRORS[error.kind]
        body = _encode(TeiErrorResponse(error.message, name))
        return json_bytes(body, status, retry_headers(error))


async def _per_text(
    session: Session,
    texts: list[str],
    req: TeiEmbedSparseRequest | TeiEmbedAllRequest,
    request: Any,
    reply: Any,
    unary: MethodSpec[Any, Any],
    stream: MethodSpec[Any, Any],
) -> list[Any]:
    """One ``request`` per text with TEI's truncation and prompt fields, all sent
    together; the parsed replies, their compute tokens counted on ``session``."""
    direction = _direction(req.truncation_direction)
    messages = [
        request(
            inputs=text,
            truncate=bool(req.truncate),
            truncation_direction=direction,
            prompt_name=req.prompt_name,
        ).SerializeToString()
        for text in texts
    ]
    replies = [reply.FromString(r) for r in await unary_or_stream(session, unary, stream, messages)]
    session.tokens = sum(r.metadata.compute_tokens for r in replies)
    return replies


def _direction(value: Direction) -> int:
    return tei_pb2.TRUNCATION_DIRECTION_LEFT if value.lower() == "left" else 0


def _empty(what: str) -> InferenceError:
    return InferenceError(Kind.EMPTY, f"`{what}` cannot be empty")


def _check_batch(info: tei_pb2.InfoResponse, size: int) -> None:
    if size > info.max_client_batch_size:
        raise InferenceError(
            Kind.VALIDATION,
            f"batch size {size} > maximum allowed batch size {info.max_client_batch_size}",
        )


def _inputs(value: str | list[str | int | list[int]]) -> list[TextOrIds]:
    """TEI's ``Input``: a string, a token-id list, or a batch of either."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise _empty("inputs")
    if all(isinstance(v, int) for v in value):
        return [value]  # type: ignore[list-item]
    if any(isinstance(v, int) for v in value):
        raise InferenceError(
            Kind.VALIDATION, "inputs: a batch holds strings or token-id lists, not bare ids"
        )
    return value  # type: ignore[return-value]


async def _as_texts(session: Session, inputs: list[TextOrIds]) -> list[str]:
    """Token-id inputs decoded to text (tei.v1 takes text); strings as they are."""
    ids = [i for i, item in enumerate(inputs) if not isinstance(item, str)]
    if not ids:
        return inputs  # type: ignore[return-value]
    decoded = await decode_ids(session, [inputs[i] for i in ids])  # type: ignore[misc]
    texts = list(inputs)
    for i, text in zip(ids, decoded, strict=True):
        texts[i] = text
    return texts  # type: ignore[return-value]


_ROOT_ROUTE: Final = "/tei/{model}/"


class TeiHandlers:
    """One method per route in :data:`TEI_ROUTES`."""

    def __init__(self, gateway: Gateway, door: TeiDoor) -> None:
        self._gateway = gateway
        self._status = door.status

    def _session(self, route: str, request: InferenceRequest) -> Session:
        model = request_target(request, request.model)  # a header must name the URL's
        return self._gateway.session(f"/tei/{{model}}/{route}", model, self._status)

    # -- metadata ----------------------------------------------------------------------
    async def tei_info(self, request: InferenceRequest) -> Answer:
        model = request_target(request, request.model)
        record = self._gateway.resolve(model)
        if self._gateway.resting(record):  # idle on demand: what its last process said
            info = self._gateway.resting_info(record)
        else:
            async with self._session("info", request) as session:
                info = await session.info()
                record = session.instance
        config = record.config
        if info.model_type == tei_pb2.MODEL_TYPE_EMBEDDING:
            kind = TeiModelType(embedding=TeiEmbeddingModel(config.pooling or "default"))
        else:
            # tei.v1 Info carries no labels; predictions name them.
            labels = TeiClassifierModel({}, {})
            kind = (
                TeiModelType(reranker=labels)
                if info.model_type == tei_pb2.MODEL_TYPE_RERANKER
                else TeiModelType(classifier=labels)
            )
        body = TeiInfo(
            model_id=info.model_id,
            model_sha=info.model_sha if info.HasField("model_sha") else None,
            model_dtype=info.model_dtype,
            served_model_name=config.served_model_name or info.model_id,
            model_type=kind,
            max_concurrent_requests=info.max_concurrent_requests,
            max_input_length=info.max_input_length,
            max_batch_tokens=info.max_batch_tokens,
            max_batch_requests=(
                info.max_batch_requests if info.HasField("max_batch_requests") else None
            ),
            max_client_batch_size=info.max_client_batch_size,
            auto_truncate=False,
            tokenization_workers=info.tokenization_workers,
            version=info.version or __version__,
            sha=info.sha if info.HasField("sha") else None,
            docker_label=info.docker_label if info.HasField("docker_label") else None,
        )
        return json_bytes(_encode(body))

    async def tei_health(self, request: InferenceRequest) -> Answer:
        model = request_target(request, request.model)
        record = self._gateway.resolve(model)  # unknown: 404; stopped, failed ...: 503
        if self._gateway.resting(record):
            # Never loads a model. Idle on demand: available, its first request loads
            # it (as a scale-to-zero service stays ready); loading or unloading: not
            # yet, as TEI is not while its model loads.
            if record.status is InstanceStatus.IDLE:
                return Answer(b"", content_type=None)
            raise InferenceError(
                Kind.UNAVAILABLE, f"instance {quote(record.name)} is {record.status.value}"
            )
        # Running: asked now. No checkpoint lies between the check above and the
        # pool's own (which starts an instance not running), so a probe never does.
        try:
            await self._gateway.instance_info(record, fresh=True)
        except InferenceError:
            raise InferenceError(Kind.UNAVAILABLE, "unhealthy") from None
        return Answer(b"", content_type=None)

    # -- embeddings --------------------------------------------------------------------
    async def tei_embed(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiEmbedRequest)
        inputs = _inputs(req.inputs)
        async with self._session("embed", request) as session:
            info = await session.require(tei_pb2.MODEL_TYPE_EMBEDDING, "embed")
            _check_batch(info, len(inputs))
            texts = await _as_texts(session, inputs)
            matrix, session.tokens = await embed_texts(
                session,
                texts,
                normalize=req.normalize,
                dimensions=req.dimensions,
                truncate=bool(req.truncate),
                direction=_direction(req.truncation_direction),
                prompt_name=req.prompt_name,
            )
        return json_bytes(await _matrix_json(matrix))

    async def tei_embed_sparse(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiEmbedSparseRequest)
        inputs = _inputs(req.inputs)
        async with self._session("embed_sparse", request) as session:
            info = await session.require(tei_pb2.MODEL_TYPE_EMBEDDING, "embed_sparse")
            _check_batch(info, len(inputs))
            texts = await _as_texts(session, inputs)
            replies = await _per_text(
                session,
                texts,
                req,
                tei_pb2.EmbedSparseRequest,
                tei_pb2.EmbedSparseResponse,
                tei_grpc.Embed.EmbedSparse,
                tei_grpc.Embed.EmbedSparseStream,
            )
        answer = [[TeiSparseValue(v.index, v.value) for v in r.sparse_embeddings] for r in replies]
        return json_bytes(_encode(answer))

    async def tei_embed_all(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiEmbedAllRequest)
        inputs = _inputs(req.inputs)
        async with self._session("embed_all", request) as session:
            info = await session.require(tei_pb2.MODEL_TYPE_EMBEDDING, "embed_all")
            _check_batch(info, len(inputs))
            texts = await _as_texts(session, inputs)
            replies = await _per_text(
                session,
                texts,
                req,
                tei_pb2.EmbedAllRequest,
                tei_pb2.EmbedAllResponse,
                tei_grpc.Embed.EmbedAll,
                tei_grpc.Embed.EmbedAllStream,
            )
        rows: list[bytes] = []
        for reply in replies:
            tokens = [np.asarray(t.embeddings, dtype="<f4") for t in reply.token_embeddings]
            matrix = np.stack(tokens) if tokens else np.zeros((0, 0), dtype="<f4")
            rows.append(await _matrix_json(matrix))
        return json_bytes(b"[" + b",".join(rows) + b"]")

    async def tei_similarity(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiSimilarityRequest)
        if not req.inputs.sentences:
            raise _empty("inputs.sentences")
        params = req.parameters or TeiSimilarityParameters()
        texts = [req.inputs.source_sentence, *req.inputs.sentences]
        async with self._session("similarity", request) as session:
            info = await session.require(tei_pb2.MODEL_TYPE_EMBEDDING, "compare sentences")
            _check_batch(info, len(texts))
            matrix, session.tokens = await embed_texts(
                session,
                texts,
                normalize=False,
                dimensions=None,
                truncate=bool(params.truncate),
                direction=_direction(params.truncation_direction),
                prompt_name=params.prompt_name,
            )
        vectors = matrix.astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        norms[norms == 0] = 1.0
        scores = (vectors[1:] @ vectors[0]) / (norms[1:] * norms[0])
        return json_bytes(_encode(scores.astype(np.float32).tolist()))

    # -- scores ------------------------------------------------------------------------
    async def tei_predict(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiPredictRequest)
        single, sequences = _predict_inputs(req.inputs)
        async with self._session("predict", request) as session:
            info = await session.info()
            if info.model_type == tei_pb2.MODEL_TYPE_EMBEDDING:
                raise InferenceError(Kind.UNSUPPORTED, "model is not a classifier model")
            if not single:
                _check_batch(info, len(sequences))
            replies = await _predict(session, sequences, req)
            session.tokens = sum(r.metadata.compute_tokens for r in replies)
        batch = [
            sorted(
                (TeiPrediction(p.score, p.label) for p in r.predictions),
                key=lambda p: p.score,
                reverse=True,
            )
            for r in replies
        ]
        return json_bytes(_encode(batch[0] if single else batch))

    async def tei_rerank(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiRerankRequest)
        if not req.texts:
            raise _empty("texts")
        async with self._session("rerank", request) as session:
            info = await session.info()
            if info.model_type != tei_pb2.MODEL_TYPE_RERANKER:
                raise InferenceError(Kind.UNSUPPORTED, "model is not a re-ranker model")
            _check_batch(info, len(req.texts))
            message = tei_pb2.RerankRequest(
                query=req.query,
                texts=req.texts,
                truncate=bool(req.truncate),
                raw_scores=req.raw_scores,
                return_text=req.return_text,
                truncation_direction=_direction(req.truncation_direction),  # type: ignore[arg-type]
            ).SerializeToString()
            reply = tei_pb2.RerankResponse.FromString(
                await session.unary(tei_grpc.Rerank.Rerank, message)
            )
            session.tokens = reply.metadata.compute_tokens
        ranks = sorted(reply.ranks, key=lambda rank: rank.score, reverse=True)
        answer = [
            TeiRank(r.index, r.score, r.text if req.return_text and r.HasField("text") else None)
            for r in ranks
        ]
        return json_bytes(_encode(answer))

    # -- tokenizer ---------------------------------------------------------------------
    async def tei_tokenize(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiTokenizeRequest)
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        if not texts:
            raise _empty("inputs")
        async with self._session("tokenize", request) as session:
            if not isinstance(req.inputs, str):
                _check_batch(await session.info(), len(texts))
            messages = [
                tei_pb2.EncodeRequest(
                    inputs=t, add_special_tokens=req.add_special_tokens, prompt_name=req.prompt_name
                ).SerializeToString()
                for t in texts
            ]
            replies = await unary_or_stream(
                session, tei_grpc.Tokenize.Tokenize, tei_grpc.Tokenize.TokenizeStream, messages
            )
        body = [
            [
                TeiSimpleToken(
                    t.id,
                    t.text,
                    t.special,
                    t.start if t.HasField("start") else None,
                    t.stop if t.HasField("stop") else None,
                )
                for t in tei_pb2.EncodeResponse.FromString(r).tokens
            ]
            for r in replies
        ]
        return json_bytes(_encode(body))

    async def tei_decode(self, request: InferenceRequest) -> Answer:
        req = decode_body(request.body, TeiDecodeRequest)
        if not req.ids:
            raise _empty("ids")
        if all(isinstance(i, int) for i in req.ids):
            lists: list[list[int]] = [req.ids]  # type: ignore[list-item]
        elif all(isinstance(i, list) for i in req.ids):
            lists = req.ids  # type: ignore[assignment]
        else:
            raise InferenceError(Kind.VALIDATION, "ids: a list of ids or a list of id lists")
        for i, ids in enumerate(lists):
            if any(not 0 <= t < 1 << 32 for t in ids):
                raise InferenceError(Kind.VALIDATION, f"ids[{i}]: a token id is out of range")
        async with self._session("decode", request) as session:
            if len(lists) > 1:
                _check_batch(await session.info(), len(lists))
            messages = [
                tei_pb2.DecodeRequest(
                    ids=ids, skip_special_tokens=req.skip_special_tokens
                ).SerializeToString()
                for ids in lists
            ]
            replies = await unary_or_stream(
                session, tei_grpc.Tokenize.Decode, tei_grpc.Tokenize.DecodeStream, messages
            )
        return json_bytes(_encode([tei_pb2.DecodeResponse.FromString(r).text for r in replies]))

    # -- TEI's POST / : the model type's main route ------------------------------------
    async def tei_root(self, request: InferenceRequest) -> Answer:
        """What TEI's ``POST /`` does for the model's type, and, for an embedding
        model, ``/similarity`` when ``inputs`` is a sentence-similarity object (as
        ``InferenceClient.sentence_similarity`` sends it to a base URL)."""
        record = self._gateway.resolve(request_target(request, request.model))
        info = await self._gateway.instance_info(record)
        if info.model_type == tei_pb2.MODEL_TYPE_CLASSIFIER:
            return await self.tei_predict(request)
        if info.model_type == tei_pb2.MODEL_TYPE_RERANKER:
            return await self.tei_rerank(request)
        if _is_similarity(request.body):
            return await self.tei_similarity(request)
        if record.config.pooling == "splade":
            return await self.tei_embed_sparse(request)
        return await self.tei_embed(request)


class _SimilarityProbe(msgspec.Struct):
    inputs: msgspec.Raw


def _is_similarity(body: bytes) -> bool:
    try:
        inputs = msgspec.json.decode(body, type=_SimilarityProbe).inputs
    except msgspec.DecodeError:  # ValidationError included: the embed route will say why
        return False
    return bytes(inputs).lstrip().startswith(b"{")


async def _matrix_json(matrix: encoding.Matrix) -> bytes:
    if matrix.size >= encoding.ARROW_MIN_FLOATS:
        rows = await trio.to_thread.run_sync(encoding.json_rows, matrix)
    else:
        rows = encoding.json_rows(matrix)
    return b"[" + b",".join(rows) + b"]"


def _predict_inputs(
    value: str | list[str | list[str]],
) -> tuple[bool, list[tuple[str, ...]]]:
    """TEI's ``PredictInput``: a string, a pair, or a batch of 1- and 2-string lists."""
    if isinstance(value, str):
        return True, [(value,)]
    if not value:
        raise _empty("inputs")
    if all(isinstance(v, str) for v in value):
        if len(value) > 2:
            raise InferenceError(
                Kind.VALIDATION, "inputs: a string, a pair of strings, or a batch of pairs"
            )
        return True, [tuple(value)]  # type: ignore[arg-type]
    batch: list[tuple[str, ...]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) or not 1 <= len(item) <= 2:
            raise InferenceError(
                Kind.VALIDATION, f"inputs[{i}]: a batch item is [text] or [text, text_pair]"
            )
        batch.append(tuple(item))
    return False, batch


async def _predict(
    session: Session, sequences: list[tuple[str, ...]], req: TeiPredictRequest
) -> list[tei_pb2.PredictResponse]:
    """Singles as one PredictStream call, pairs as one PredictPairStream call, concurrently."""
    truncate = bool(req.truncate)
    direction = _direction(req.truncation_direction)
    singles = [i for i, s in enumerate(sequences) if len(s) == 1]
    pairs = [i for i, s in enumerate(sequences) if len(s) == 2]
    results: list[bytes] = [b""] * len(sequences)

    async def run(indices: list[int], pair: bool) -> None:
        if pair:
            messages = [
                tei_pb2.PredictPairRequest(
                    inputs=list(sequences[i]),
                    truncate=truncate,
                    raw_scores=req.raw_scores,
                    truncation_direction=direction,  # type: ignore[arg-type]
                ).SerializeToString()
                for i in indices
            ]
            specs: tuple[MethodSpec[Any, Any], MethodSpec[Any, Any]] = (
                tei_grpc.Predict.PredictPair,
                tei_grpc.Predict.PredictPairStream,
            )
        else:
            messages = [
                tei_pb2.PredictRequest(
                    inputs=sequences[i][0],
                    truncate=truncate,
                    raw_scores=req.raw_scores,
                    truncation_direction=direction,  # type: ignore[arg-type]
                ).SerializeToString()
                for i in indices
            ]
            specs = (tei_grpc.Predict.Predict, tei_grpc.Predict.PredictStream)
        replies = await unary_or_stream(session, *specs, messages)
        for i, reply in zip(indices, replies, strict=True):
            results[i] = reply

    try:
        async with trio.open_nursery() as nursery:
            for indices, pair in ((singles, False), (pairs, True)):
                if indices:
                    nursery.start_soon(run, indices, pair)
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        if isinstance(first, InferenceError):
            raise first from None
        raise
    return [tei_pb2.PredictResponse.FromString(r) for r in results]


_ERR: Final = (400, 404, 413, 422, 424, 429, 503)
_M: Final = "/tei/{model}"

TEI_ROUTES: Final[tuple[InferenceRoute, ...]] = (
    InferenceRoute("tei_info", "GET", f"{_M}/info", "TEI: the instance's model and limits",
                   TeiInfo, statuses=(404, 424, 503)),
    InferenceRoute("tei_health", "GET", f"{_M}/health", "TEI: 200 when it answers or rests idle",
                   None, statuses=(404, 503)),
    InferenceRoute("tei_embed", "POST", f"{_M}/embed", "TEI: dense embeddings",
                   list[list[float]], TeiEmbedRequest, _ERR),
    InferenceRoute("tei_embed_all", "POST", f"{_M}/embed_all", "TEI: token embeddings",
                   list[list[list[float]]], TeiEmbedAllRequest, _ERR),
    InferenceRoute("tei_embed_sparse", "POST", f"{_M}/embed_sparse", "TEI: sparse embeddings",
                   list[list[TeiSparseValue]], TeiEmbedSparseRequest, _ERR),
    InferenceRoute("tei_predict", "POST", f"{_M}/predict", "TEI: classify texts or pairs",
                   list[TeiPrediction | list[TeiPrediction]], TeiPredictRequest, _ERR),
    InferenceRoute("tei_rerank", "POST", f"{_M}/rerank", "TEI: rank texts against a query",
                   list[TeiRank], TeiRerankRequest, _ERR),
    InferenceRoute("tei_similarity", "POST", f"{_M}/similarity",
                   "TEI: cosine similarity of sentences to a source sentence",
                   list[float], TeiSimilarityRequest, _ERR),
    InferenceRoute("tei_tokenize", "POST", f"{_M}/tokenize", "TEI: tokenize texts",
                   list[list[TeiSimpleToken]], TeiTokenizeRequest, _ERR),
    InferenceRoute("tei_decode", "POST", f"{_M}/decode", "TEI: decode token ids",
                   list[str], TeiDecodeRequest, _ERR),
    InferenceRoute("tei_root", "POST", f"{_M}/", "TEI: the model type's route (embed, "
                   "embed_sparse, predict or rerank)", None, TeiEmbedRequest, _ERR),
)  # fmt: skip
