"""tei.v1 calls more than one front door makes, over a :class:`Session`."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

from tei_manager._proto.tei.v1 import tei_grpc, tei_pb2
from tei_manager.errors import quote
from tei_manager.gateway import encoding
from tei_manager.gateway.errors import InferenceError, Kind
from tei_manager.gateway.relay import Session
from tei_manager.grpc.rpc import MethodSpec

__all__ = ["decode_ids", "embed_texts", "unary_or_stream"]


async def unary_or_stream(
    session: Session,
    unary: MethodSpec[Any, Any],
    stream: MethodSpec[Any, Any],
    messages: list[bytes],
) -> list[bytes]:
    """One message as a unary call, more as one stream call with all in flight."""
    if len(messages) == 1:
        return [await session.unary(unary, messages[0])]
    return await session.stream(stream, messages)


async def decode_ids(session: Session, lists: list[list[int]]) -> list[str]:
    """Token-id lists as text, by the instance's tokenizer (one DecodeStream call)."""
    messages = [
        tei_pb2.DecodeRequest(ids=ids, skip_special_tokens=True).SerializeToString()
        for ids in lists
    ]
    replies = await session.stream(tei_grpc.Tokenize.DecodeStream, messages)
    return [tei_pb2.DecodeResponse.FromString(r).text for r in replies]


async def embed_texts(
    session: Session,
    texts: list[str],
    *,
    normalize: bool,
    dimensions: int | None,
    truncate: bool = False,
    direction: int = 0,
    prompt_name: str | None = None,
) -> tuple[encoding.Matrix, int]:
    """The embeddings of ``texts`` (one row each) and the tokens the instance computed.

    One text is one ``Embed`` call; more are one ``EmbedStream`` call.
    """
    messages = [
        tei_pb2.EmbedRequest(
            inputs=text,
            truncate=truncate,
            normalize=normalize,
            truncation_direction=direction,  # type: ignore[arg-type]
            dimensions=dimensions,
            prompt_name=prompt_name,
        ).SerializeToString()
        for text in texts
    ]
    replies = await unary_or_stream(
        session, tei_grpc.Embed.Embed, tei_grpc.Embed.EmbedStream, messages
    )
    try:
        return encoding.dense_embeddings(replies)
    except (ValueError, DecodeError) as error:
        raise InferenceError(
            Kind.BACKEND, f"instance {quote(session.instance.name)} answered badly: {error}"
        ) from None
