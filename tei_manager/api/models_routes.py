"""The ``/models`` routes: handlers over the model registry (:mod:`tei_manager.hub`).

A model id contains a ``/``. Clients send it raw (``/models/BAAI/bge-small-en-v1.5``)
or URL-encoded (``/models/BAAI%2Fbge-small-en-v1.5``); the server decodes the path
before routing, so both arrive the same. :class:`ModelIdConverter` lets the
parameter span slashes, and keeps a leading one (``/models//etc/passwd``), so that
a path where a model id belongs is refused by the registry's validation with
INVALID_MODEL_ID instead of being redirected or answered as an unknown route.
"""

from __future__ import annotations

import msgspec
from quart import Response, request
from werkzeug.routing import BaseConverter

from tei_manager.api.dto import AddModelRequest
from tei_manager.api.facade import ManagerFacade
from tei_manager.api.responses import json_response
from tei_manager.errors import ErrorCode, ValidationError, from_msgspec_error

__all__ = ["ModelHandlers", "ModelIdConverter", "decode_add_model"]


class ModelIdConverter(BaseConverter):
    """Any non-empty text, slashes included, matched as little as possible, so that
    ``/models/org/name/download`` is the download route of ``org/name``."""

    regex = ".+?"
    part_isolating = False


def decode_add_model(body: bytes) -> AddModelRequest:
    """Decode a ``POST /models`` body; bad JSON raises ``MALFORMED_JSON``."""
    try:
        return msgspec.json.decode(body, type=AddModelRequest)
    except msgspec.ValidationError as e:
        raise from_msgspec_error(e) from None
    except msgspec.DecodeError as e:
        raise ValidationError("body", f"invalid JSON: {e}", code=ErrorCode.MALFORMED_JSON) from None


class ModelHandlers:
    """One method per model operation in the route table, named by its endpoint."""

    def __init__(self, manager: ManagerFacade) -> None:
        self._manager = manager

    async def list_models(self) -> Response:
        return json_response(self._manager.models.list_models())

    async def add_model(self) -> Response:
        # JSON whatever the Content-Type says, as for POST /instances.
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        wanted = decode_add_model(body)
        info, created = await self._manager.models.add_model(wanted.model_id, wanted.revision)
        return json_response(info, 201 if created else 200)

    async def get_model(self, model_id: str) -> Response:
        return json_response(self._manager.models.get_model(model_id))

    async def download_model(self, model_id: str) -> Response:
        return json_response(self._manager.models.start_download(model_id), 202)

    async def load_model(self, model_id: str) -> Response:
        return json_response(self._manager.models.start_load(model_id), 202)

    async def delete_model(self, model_id: str) -> Response:
        return json_response(await self._manager.models.delete_model(model_id))
