"""The inference front doors on the REST port, in one list for the app and OpenAPI."""

from __future__ import annotations

from tei_manager.api.inference import Door, InferenceRoute
from tei_manager.api.openai_routes import OPENAI_ROUTES, OpenAIDoor, OpenAIHandlers
from tei_manager.api.tei_routes import TEI_ROUTES, TeiDoor, TeiHandlers
from tei_manager.gateway.relay import Gateway

__all__ = ["DOOR_ROUTES", "inference_doors"]

_OPENAI = OpenAIDoor()
_TEI = TeiDoor()

#: Each door with its routes (for the OpenAPI document: no gateway needed).
DOOR_ROUTES: tuple[tuple[Door, tuple[InferenceRoute, ...]], ...] = (
    (_OPENAI, OPENAI_ROUTES),
    (_TEI, TEI_ROUTES),
)


def inference_doors(gateway: Gateway) -> list[tuple[Door, object, tuple[InferenceRoute, ...]]]:
    """Each door, its handlers over ``gateway``, and its routes."""
    return [
        (_OPENAI, OpenAIHandlers(gateway, _OPENAI), OPENAI_ROUTES),
        (_TEI, TeiHandlers(gateway, _TEI), TEI_ROUTES),
    ]
