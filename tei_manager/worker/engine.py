"""The worker's inference engine: what the tei.v1 servicer calls, one method per operation."""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal, cast

import msgspec
import trio

from tei_manager.worker.batching import Batcher, InThread, RowResult
from tei_manager.worker.errors import (
    EngineError,
    ErrorKind,
    ModelLoadError,
    unsupported,
    validation,
)
from tei_manager.worker.model import Model, ModelType, Row, RowOutput, Task, load_model
from tei_manager.worker.options import WorkerOptions
from tei_manager.worker.tokenization import Direction, Token

if TYPE_CHECKING:
    from tei_manager.worker.onnx_model import OnnxModel

__all__ = [
    "Engine",
    "EngineError",
    "EngineStatistics",
    "ErrorKind",
    "ModelInfo",
    "ModelLoadError",
    "Timings",
    "Token",
]

Outcome = Literal["success", "validation", "overloaded", "unsupported", "backend", "cancelled"]


class Timings(msgspec.Struct, frozen=True):
    """The tei.v1 ``Metadata`` of one call."""

    compute_chars: int
    compute_tokens: int
    total_time_ns: int
    tokenization_time_ns: int
    queue_time_ns: int
    inference_time_ns: int


class ModelInfo(msgspec.Struct, frozen=True):
    """What the Info call reports about the loaded model and the limits it runs with."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: ModelType
    is_splade: bool
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_concurrent_requests: int
    max_client_batch_size: int
    tokenization_workers: int
    hidden_size: int
    labels: tuple[str, ...]
    prompts: dict[str, str]


class EngineStatistics(msgspec.Struct, frozen=True):
    """A snapshot for metrics: the queue, the batches, and finished calls by outcome."""

    queued_rows: int
    in_flight_requests: int
    max_concurrent_requests: int
    batches_run: int
    rows_run: int
    rows_dropped: int
    last_batch_rows: int
    last_batch_tokens: int
    inference_running: bool
    inference_time_total_s: float
    # Finished calls by outcome (numbers only, so a collector can export every field).
    requests_success: int
    requests_validation: int
    requests_overloaded: int
    requests_unsupported: int
    requests_backend: int
    requests_cancelled: int


class Engine:
    """Tokenizes requests, queues them for the batcher and shapes the model's outputs."""

    def __init__(self, model: Model | OnnxModel, options: WorkerOptions) -> None:
        self._model = model
        self._tokens = model.tokenization
        self._auto_truncate = options.auto_truncate
        self._batcher: Batcher[Row, RowOutput] = Batcher(
            InThread(model.forward),
            max_batch_tokens=options.max_batch_tokens,
            max_batch_requests=options.max_batch_requests,
            max_concurrent_requests=options.max_concurrent_requests,
        )
        self._outcomes: Counter[Outcome] = Counter()
        self.info = ModelInfo(
            model_id=options.served_model_name or options.model_id,
            model_sha=model.model_sha,
            model_dtype=model.dtype,
            model_type=model.model_type,
            is_splade=model.is_splade,
            max_input_length=self._tokens.max_input_length,
            max_batch_tokens=options.max_batch_tokens,
            max_batch_requests=options.max_batch_requests,
            max_concurrent_requests=options.max_concurrent_requests,
            max_client_batch_size=options.max_client_batch_size,
            tokenization_workers=options.tokenization_workers or 1,
            hidden_size=model.hidden_size,
            labels=model.labels,
            prompts=dict(self._tokens.prompts),
        )

    @classmethod
    def load(cls, options: WorkerOptions) -> Engine:
        """Resolve, load and warm up the model. Blocking and slow: run it in a thread."""
        model = load_model(options)
        task: Task = "scores" if model.model_type != "embedding" else "pooled"
        try:
            model.forward([Row(model.tokenization.encode("warm up", truncate=True), task)])
        except Exception as exc:  # the first forward is where a broken model shows itself
            raise ModelLoadError(f"model {options.model_id!r} failed its first run: {exc}") from exc
        return cls(model, options)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the batcher until cancelled; ``started()`` once requests can be served."""
        await self._batcher.run(task_status=task_status)

    async def embed(
        self,
        text: str,
        *,
        truncate: bool,
        direction: Direction = "right",
        normalize: bool = True,
        dimensions: int | None = None,
        prompt_name: str | None = None,
    ) -> tuple[list[float], Timings]:
        """The pooled embedding of ``text``, cut to ``dimensions`` and normalized if asked."""
        with self._counted():
            self._require_embedding()
            if self._model.is_splade and normalize:
                raise unsupported("`normalize` is not available for SPLADE models")
            if dimensions is not None and dimensions <= 0:
                raise validation("`dimensions` should be positive")
            if dimensions is not None and dimensions > self._model.hidden_size:
                raise validation(
                    "`dimensions` should be smaller than the maximum embedding dimension "
                    f"({self._model.hidden_size}). Given: {dimensions}"
                )
            truncate = truncate or self._auto_truncate
            outputs, timings = await self._infer(
                lambda: [
                    Row(
                        self._tokens.encode(
                            text, truncate=truncate, direction=direction, prompt_name=prompt_name
                        ),
                        "pooled",
                        normalize,
                        dimensions,
                    )
                ],
                len(text),
            )
            return cast(list[float], outputs[0]), timings

    async def embed_sparse(
        self,
        text: str,
        *,
        truncate: bool,
        direction: Direction = "right",
        prompt_name: str | None = None,
    ) -> tuple[list[tuple[int, float]], Timings]:
        """The SPLADE vector of ``text`` as its non-zero ``(index, value)`` pairs."""
        with self._counted():
            if not self._model.is_splade:
                raise unsupported("Model is not an embedding model with SPLADE pooling")
            outputs, timings = await self._infer(
                self._single(text, "sparse", truncate, direction, prompt_name), len(text)
            )
            return cast(list[tuple[int, float]], outputs[0]), timings

    async def embed_all(
        self,
        text: str,
        *,
        truncate: bool,
        direction: Direction = "right",
        prompt_name: str | None = None,
    ) -> tuple[list[list[float]], Timings]:
        """One hidden-state vector per token of ``text``, special tokens included."""
        with self._counted():
            self._require_embedding()
            if self._model.is_splade:
                raise unsupported("`embed_all` is not available for SPLADE models")
            outputs, timings = await self._infer(
                self._single(text, "tokens", truncate, direction, prompt_name), len(text)
            )
            return cast(list[list[float]], outputs[0]), timings

    async def predict(
        self,
        inputs: str | tuple[str, str],
        *,
        truncate: bool,
        direction: Direction = "right",
        raw_scores: bool = False,
    ) -> tuple[list[tuple[float, str]], Timings]:
        """Every label's score, best first: softmax (or sigmoid for one label) unless raw."""
        with self._counted():
            if self._model.model_type == "embedding":
                raise unsupported("Model is not a classifier model")
            truncate = truncate or self._auto_truncate
            if isinstance(inputs, str):
                chars = len(inputs)
                encode = self._single(inputs, "scores", truncate, direction, None)
            else:
                first, second = inputs
                chars = len(first) + len(second)

                def encode() -> list[Row]:
                    pair = self._tokens.encode_pair(
                        first, second, truncate=truncate, direction=direction
                    )
                    return [Row(pair, "scores")]

            outputs, timings = await self._infer(encode, chars)
            scores = _activate(_checked_scores(outputs[0]), raw_scores)
            predictions = sorted(
                zip(scores, self._model.labels, strict=True), key=lambda p: p[0], reverse=True
            )
            return predictions, timings

    async def rerank(
        self,
        query: str,
        texts: Sequence[str],
        *,
        truncate: bool,
        direction: Direction = "right",
        raw_scores: bool = False,
    ) -> tuple[list[float], Timings]:
        """One relevance score per text, in input order (sigmoid unless ``raw_scores``).

        Each (query, text) pair is its own row in the queue, so a long list spreads over
        batches like any other rows. The call counts as one request against
        ``max_concurrent_requests``; ``max_client_batch_size`` bounds its rows.
        """
        with self._counted():
            if self._model.model_type == "embedding":
                raise unsupported("Model is not a classifier model")
            if self._model.model_type == "classifier":
                raise unsupported("Model is not a re-ranker model")
            if not texts:
                raise validation("`texts` cannot be empty")
            limit = self.info.max_client_batch_size
            if len(texts) > limit:
                raise validation(f"batch size {len(texts)} > maximum allowed batch size {limit}")
            truncate = truncate or self._auto_truncate

            def encode() -> list[Row]:
                return [
                    Row(
                        self._tokens.encode_pair(
                            query, text, truncate=truncate, direction=direction
                        ),
                        "scores",
                    )
                    for text in texts
                ]

            chars = len(query) * len(texts) + sum(len(text) for text in texts)
            outputs, timings = await self._infer(encode, chars)
            scores = [_activate(_checked_scores(out), raw_scores)[0] for out in outputs]
            return scores, timings

    def tokenize(
        self, text: str, *, add_special_tokens: bool, prompt_name: str | None = None
    ) -> list[Token]:
        """The tokens of ``text`` with its prompt; no queueing, no model."""
        return self._tokens.tokenize(
            text, add_special_tokens=add_special_tokens, prompt_name=prompt_name
        )

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """The text of token ``ids``."""
        return self._tokens.decode(ids, skip_special_tokens=skip_special_tokens)

    def statistics(self) -> EngineStatistics:
        """A snapshot for metrics collectors."""
        batcher = self._batcher.statistics()
        return EngineStatistics(
            queued_rows=batcher.queued_rows,
            in_flight_requests=batcher.admitted_requests,
            max_concurrent_requests=batcher.max_concurrent_requests,
            batches_run=batcher.batches_run,
            rows_run=batcher.rows_run,
            rows_dropped=batcher.rows_dropped,
            last_batch_rows=batcher.last_batch_rows,
            last_batch_tokens=batcher.last_batch_tokens,
            inference_running=batcher.inference_running,
            inference_time_total_s=batcher.inference_time_total,
            requests_success=self._outcomes["success"],
            requests_validation=self._outcomes["validation"],
            requests_overloaded=self._outcomes["overloaded"],
            requests_unsupported=self._outcomes["unsupported"],
            requests_backend=self._outcomes["backend"],
            requests_cancelled=self._outcomes["cancelled"],
        )

    def _require_embedding(self) -> None:
        if self._model.model_type != "embedding":
            raise unsupported("Model is not an embedding model")

    def _single(
        self,
        text: str,
        task: Task,
        truncate: bool,
        direction: Direction,
        prompt_name: str | None,
    ) -> Callable[[], list[Row]]:
        truncate = truncate or self._auto_truncate

        def encode() -> list[Row]:
            encoding = self._tokens.encode(
                text, truncate=truncate, direction=direction, prompt_name=prompt_name
            )
            return [Row(encoding, task)]

        return encode

    async def _infer(
        self, encode: Callable[[], list[Row]], chars: int
    ) -> tuple[list[RowOutput], Timings]:
        """Admit the call, tokenize its rows, queue them and time it all."""
        start = trio.current_time()
        with self._batcher.admit():
            tokenizing = time.perf_counter_ns()
            rows = encode()
            tokenization_ns = time.perf_counter_ns() - tokenizing
            results = await self._batcher.submit([(row, len(row.encoding.ids)) for row in rows])
        return [result.output for result in results], _timings(
            rows, results, chars, start, tokenization_ns
        )

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count the call's outcome for ``statistics()``; every exception goes on up."""
        try:
            yield
        except EngineError as exc:
            self._outcomes[exc.kind.value] += 1
            raise
        except trio.Cancelled:
            self._outcomes["cancelled"] += 1
            raise
        self._outcomes["success"] += 1


def _timings(
    rows: Sequence[Row],
    results: Sequence[RowResult[RowOutput]],
    chars: int,
    start: float,
    tokenization_ns: int,
) -> Timings:
    # A call of several rows (rerank) reports the mean per row, as TEI does.
    count = len(results)
    return Timings(
        compute_chars=chars,
        compute_tokens=sum(len(row.encoding.ids) for row in rows),
        total_time_ns=_ns(trio.current_time() - start),
        tokenization_time_ns=tokenization_ns // count,
        queue_time_ns=_ns(sum(r.queue_time for r in results) / count),
        inference_time_ns=_ns(sum(r.inference_time for r in results) / count),
    )


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _checked_scores(output: RowOutput) -> list[float]:
    logits = cast(list[float], output)
    if any(math.isnan(value) for value in logits):
        raise EngineError(ErrorKind.BACKEND, "score is NaN")
    return logits


def _activate(logits: list[float], raw_scores: bool) -> list[float]:
    """Softmax over several labels, sigmoid for one; TEI's scores unless raw ones are asked."""
    if raw_scores:
        return logits
    if len(logits) == 1:
        return [_sigmoid(logits[0])]
    top = max(logits)
    exps = [math.exp(value - top) for value in logits]
    total = sum(exps)
    return [value / total for value in exps]


def _sigmoid(value: float) -> float:
    # Written two ways so that exp() never overflows for a large logit of either sign.
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)
