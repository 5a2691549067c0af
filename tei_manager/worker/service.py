"""The tei.v1 gRPC services of the worker, on top of the ``Engine``.

Requests map one-to-one onto engine calls; engine errors map onto the status
codes TEI's router uses. Streams run their items concurrently (so they batch)
and answer in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar

import trio

from tei_manager import __version__
from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.grpc.calls import CallContext
from tei_manager.grpc.rpc import GrpcError, Servicer, StatusCode
from tei_manager.grpc.streams import ordered_map
from tei_manager.worker.engine import Engine, EngineError, ErrorKind, Timings

T = TypeVar("T")
R = TypeVar("R")

_STATUS = {
    ErrorKind.VALIDATION: StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNSUPPORTED: StatusCode.FAILED_PRECONDITION,
    ErrorKind.BACKEND: StatusCode.INTERNAL,
}
_MODEL_TYPE = {
    "embedding": tei_pb2.MODEL_TYPE_EMBEDDING,
    "classifier": tei_pb2.MODEL_TYPE_CLASSIFIER,
    "reranker": tei_pb2.MODEL_TYPE_RERANKER,
}


def _direction(value: int) -> Literal["right", "left"]:
    return "left" if value == tei_pb2.TRUNCATION_DIRECTION_LEFT else "right"


def _metadata(t: Timings) -> tei_pb2.Metadata:
    return tei_pb2.Metadata(
        compute_chars=t.compute_chars,
        compute_tokens=t.compute_tokens,
        total_time_ns=t.total_time_ns,
        tokenization_time_ns=t.tokenization_time_ns,
        queue_time_ns=t.queue_time_ns,
        inference_time_ns=t.inference_time_ns,
    )


def _merge(timings: list[Timings]) -> Timings:
    """Timings of work done in parts: sums, except the wall-clock total (the longest)."""
    return Timings(
        compute_chars=sum(t.compute_chars for t in timings),
        compute_tokens=sum(t.compute_tokens for t in timings),
        total_time_ns=max(t.total_time_ns for t in timings),
        tokenization_time_ns=sum(t.tokenization_time_ns for t in timings),
        queue_time_ns=max(t.queue_time_ns for t in timings),
        inference_time_ns=max(t.inference_time_ns for t in timings),
    )


class EngineHolder:
    """The engine once loaded; calls before that fail with UNAVAILABLE."""

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def get(self) -> Engine:
        if self.engine is None:
            raise GrpcError(StatusCode.UNAVAILABLE, "the model is still loading")
        return self.engine


@contextmanager
def _as_grpc() -> Iterator[None]:
    """Turn an ``EngineError`` into the status code TEI answers with."""
    try:
        yield
    except EngineError as error:
        raise GrpcError(_STATUS[error.kind], error.message) from None


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    with _as_grpc():
        return await fn()


def _ranked(
    texts: list[str], scores: list[float], timings: Timings, *, return_text: bool
) -> tei_pb2.RerankResponse:
    """Ranks by score, best first, each with its input index (and text if asked)."""
    ranks = [
        tei_pb2.Rank(index=i, score=score, text=texts[i] if return_text else None)
        for i, score in enumerate(scores)
    ]
    ranks.sort(key=lambda rank: rank.score, reverse=True)
    return tei_pb2.RerankResponse(ranks=ranks, metadata=_metadata(timings))


def _stream(
    holder: EngineHolder,
    requests: AsyncIterator[T],
    context: CallContext,
    fn: Callable[[T], Awaitable[R]],
) -> AsyncIterator[R]:
    assert context.nursery is not None
    limit = holder.get().info.max_concurrent_requests
    return ordered_map(context.nursery, requests, fn, max_in_flight=limit)


class InfoService(tei_grpc.InfoServicer):
    def __init__(self, holder: EngineHolder) -> None:
        self.holder = holder

    async def Info(
        self, request: tei_pb2.InfoRequest, context: CallContext
    ) -> tei_pb2.InfoResponse:
        info = self.holder.get().info
        response = tei_pb2.InfoResponse(
            version=__version__,
            model_id=info.model_id,
            model_dtype=info.model_dtype,
            model_type=_MODEL_TYPE[info.model_type],
            max_concurrent_requests=info.max_concurrent_requests,
            max_input_length=info.max_input_length,
            max_batch_tokens=info.max_batch_tokens,
            max_client_batch_size=info.max_client_batch_size,
            tokenization_workers=info.tokenization_workers,
            docker_label="tei-manager-worker",
        )
        if info.model_sha is not None:
            response.model_sha = info.model_sha
        if info.max_batch_requests is not None:
            response.max_batch_requests = info.max_batch_requests
        return response


class EmbedService(tei_grpc.EmbedServicer):
    def __init__(self, holder: EngineHolder) -> None:
        self.holder = holder

    async def _embed(self, request: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        engine = self.holder.get()
        values, timings = await _call(
            lambda: engine.embed(
                request.inputs,
                truncate=request.truncate,
                direction=_direction(request.truncation_direction),
                normalize=request.normalize if request.HasField("normalize") else True,
                dimensions=request.dimensions if request.HasField("dimensions") else None,
                prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
            )
        )
        return tei_pb2.EmbedResponse(embeddings=values, metadata=_metadata(timings))

    async def _embed_sparse(
        self, request: tei_pb2.EmbedSparseRequest
    ) -> tei_pb2.EmbedSparseResponse:
        engine = self.holder.get()
        values, timings = await _call(
            lambda: engine.embed_sparse(
                request.inputs,
                truncate=request.truncate,
                direction=_direction(request.truncation_direction),
                prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
            )
        )
        return tei_pb2.EmbedSparseResponse(
            sparse_embeddings=[tei_pb2.SparseValue(index=i, value=v) for i, v in values],
            metadata=_metadata(timings),
        )

    async def _embed_all(self, request: tei_pb2.EmbedAllRequest) -> tei_pb2.EmbedAllResponse:
        engine = self.holder.get()
        rows, timings = await _call(
            lambda: engine.embed_all(
                request.inputs,
                truncate=request.truncate,
                direction=_direction(request.truncation_direction),
                prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
            )
        )
        return tei_pb2.EmbedAllResponse(
            token_embeddings=[tei_pb2.TokenEmbedding(embeddings=row) for row in rows],
            metadata=_metadata(timings),
        )

    async def Embed(
        self, request: tei_pb2.EmbedRequest, context: CallContext
    ) -> tei_pb2.EmbedResponse:
        return await self._embed(request)

    async def EmbedStream(
        self, requests: AsyncIterator[tei_pb2.EmbedRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedResponse]:
        async for reply in _stream(self.holder, requests, context, self._embed):
            yield reply

    async def EmbedSparse(
        self, request: tei_pb2.EmbedSparseRequest, context: CallContext
    ) -> tei_pb2.EmbedSparseResponse:
        return await self._embed_sparse(request)

    async def EmbedSparseStream(
        self, requests: AsyncIterator[tei_pb2.EmbedSparseRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedSparseResponse]:
        async for reply in _stream(self.holder, requests, context, self._embed_sparse):
            yield reply

    async def EmbedAll(
        self, request: tei_pb2.EmbedAllRequest, context: CallContext
    ) -> tei_pb2.EmbedAllResponse:
        return await self._embed_all(request)

    async def EmbedAllStream(
        self, requests: AsyncIterator[tei_pb2.EmbedAllRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EmbedAllResponse]:
        async for reply in _stream(self.holder, requests, context, self._embed_all):
            yield reply


def _predictions(scores: list[tuple[float, str]]) -> list[tei_pb2.Prediction]:
    return [tei_pb2.Prediction(score=score, label=label) for score, label in scores]


class PredictService(tei_grpc.PredictServicer):
    def __init__(self, holder: EngineHolder) -> None:
        self.holder = holder

    async def _predict(self, request: tei_pb2.PredictRequest) -> tei_pb2.PredictResponse:
        engine = self.holder.get()
        scores, timings = await _call(
            lambda: engine.predict(
                request.inputs,
                truncate=request.truncate,
                direction=_direction(request.truncation_direction),
                raw_scores=request.raw_scores,
            )
        )
        return tei_pb2.PredictResponse(
            predictions=_predictions(scores), metadata=_metadata(timings)
        )

    async def _predict_pair(self, request: tei_pb2.PredictPairRequest) -> tei_pb2.PredictResponse:
        engine = self.holder.get()
        if len(request.inputs) != 2:
            raise GrpcError(
                StatusCode.INVALID_ARGUMENT,
                f"`inputs` must have exactly 2 texts for a pair, got {len(request.inputs)}",
            )
        pair = (request.inputs[0], request.inputs[1])
        scores, timings = await _call(
            lambda: engine.predict(
                pair,
                truncate=request.truncate,
                direction=_direction(request.truncation_direction),
                raw_scores=request.raw_scores,
            )
        )
        return tei_pb2.PredictResponse(
            predictions=_predictions(scores), metadata=_metadata(timings)
        )

    async def Predict(
        self, request: tei_pb2.PredictRequest, context: CallContext
    ) -> tei_pb2.PredictResponse:
        return await self._predict(request)

    async def PredictPair(
        self, request: tei_pb2.PredictPairRequest, context: CallContext
    ) -> tei_pb2.PredictResponse:
        return await self._predict_pair(request)

    async def PredictStream(
        self, requests: AsyncIterator[tei_pb2.PredictRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.PredictResponse]:
        async for reply in _stream(self.holder, requests, context, self._predict):
            yield reply

    async def PredictPairStream(
        self, requests: AsyncIterator[tei_pb2.PredictPairRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.PredictResponse]:
        async for reply in _stream(self.holder, requests, context, self._predict_pair):
            yield reply


class RerankService(tei_grpc.RerankServicer):
    def __init__(self, holder: EngineHolder) -> None:
        self.holder = holder

    async def _rerank(
        self,
        query: str,
        texts: list[str],
        *,
        truncate: bool,
        direction: int,
        raw_scores: bool,
        return_text: bool,
    ) -> tei_pb2.RerankResponse:
        engine = self.holder.get()
        if not texts:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, "`texts` cannot be empty")
        scores, timings = await _call(
            lambda: engine.rerank(
                query,
                texts,
                truncate=truncate,
                direction=_direction(direction),
                raw_scores=raw_scores,
            )
        )
        return _ranked(texts, scores, timings, return_text=return_text)

    async def Rerank(
        self, request: tei_pb2.RerankRequest, context: CallContext
    ) -> tei_pb2.RerankResponse:
        return await self._rerank(
            request.query,
            list(request.texts),
            truncate=request.truncate,
            direction=request.truncation_direction,
            raw_scores=request.raw_scores,
            return_text=request.return_text,
        )

    async def RerankStream(
        self, requests: AsyncIterator[tei_pb2.RerankStreamRequest], context: CallContext
    ) -> tei_pb2.RerankResponse:
        first: tei_pb2.RerankStreamRequest | None = None
        texts: list[str] = []
        async for request in requests:
            if first is None:
                first = request
            elif request.query != first.query:
                raise GrpcError(
                    StatusCode.INVALID_ARGUMENT,
                    "`query` must be the same in every message of a RerankStream",
                )
            texts.append(request.text)
        if first is None:
            raise GrpcError(StatusCode.INVALID_ARGUMENT, "RerankStream received no message")
        # A stream has no client batch limit (TEI scores each message on its own): score
        # it in chunks the engine accepts, concurrently so they share batches.
        engine = self.holder.get()
        size = engine.info.max_client_batch_size
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        scores: list[list[float]] = [[] for _ in chunks]
        timings: list[Timings] = []

        async def score(index: int, chunk: list[str]) -> None:
            values, timing = await _call(
                lambda: engine.rerank(
                    first.query,
                    chunk,
                    truncate=first.truncate,
                    direction=_direction(first.truncation_direction),
                    raw_scores=first.raw_scores,
                )
            )
            scores[index] = values
            timings.append(timing)

        try:
            async with trio.open_nursery() as nursery:
                for index, chunk in enumerate(chunks):
                    nursery.start_soon(score, index, chunk)
        except BaseExceptionGroup as group:
            grpc_errors, _ = group.split(GrpcError)
            if grpc_errors is not None:
                raise grpc_errors.exceptions[0] from None
            raise
        flat = [value for chunk_scores in scores for value in chunk_scores]
        return _ranked(texts, flat, _merge(timings), return_text=first.return_text)


class TokenizeService(tei_grpc.TokenizeServicer):
    def __init__(self, holder: EngineHolder) -> None:
        self.holder = holder

    async def _tokenize(self, request: tei_pb2.EncodeRequest) -> tei_pb2.EncodeResponse:
        engine = self.holder.get()
        with _as_grpc():
            tokens = engine.tokenize(
                request.inputs,
                add_special_tokens=request.add_special_tokens,
                prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
            )
        return tei_pb2.EncodeResponse(
            tokens=[
                tei_pb2.SimpleToken(
                    id=t.id, text=t.text, special=t.special, start=t.start, stop=t.stop
                )
                for t in tokens
            ]
        )

    async def _decode(self, request: tei_pb2.DecodeRequest) -> tei_pb2.DecodeResponse:
        engine = self.holder.get()
        with _as_grpc():
            text = engine.decode(list(request.ids), skip_special_tokens=request.skip_special_tokens)
        return tei_pb2.DecodeResponse(text=text)

    async def Tokenize(
        self, request: tei_pb2.EncodeRequest, context: CallContext
    ) -> tei_pb2.EncodeResponse:
        return await self._tokenize(request)

    async def TokenizeStream(
        self, requests: AsyncIterator[tei_pb2.EncodeRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.EncodeResponse]:
        async for request in requests:
            yield await self._tokenize(request)

    async def Decode(
        self, request: tei_pb2.DecodeRequest, context: CallContext
    ) -> tei_pb2.DecodeResponse:
        return await self._decode(request)

    async def DecodeStream(
        self, requests: AsyncIterator[tei_pb2.DecodeRequest], context: CallContext
    ) -> AsyncIterator[tei_pb2.DecodeResponse]:
        async for request in requests:
            yield await self._decode(request)


def tei_servicers(holder: EngineHolder) -> list[Servicer]:
    """All five tei.v1 services, sharing one engine."""
    return [
        InfoService(holder),
        EmbedService(holder),
        PredictService(holder),
        RerankService(holder),
        TokenizeService(holder),
    ]
