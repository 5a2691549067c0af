"""``/state``: reset to the configuration's seeds, export and import the desired state.

All three need the ``admin`` scope (:func:`tei_manager.api.auth.scope_for`): an
export holds every instance's configuration. The document is TOML (see
:mod:`tei_manager.manager.backup`); an import is checked whole before anything
changes, and a bad one is a 400 naming the field.
"""

from __future__ import annotations

from typing import Final

from quart import Response, request

from tei_manager.api.facade import ManagerFacade
from tei_manager.api.responses import json_response
from tei_manager.manager.backup import decode_backup, encode_backup

__all__ = ["TOML", "StateHandlers"]

TOML: Final = "application/toml"


class StateHandlers:
    """Handlers of the ``/state`` operations in :data:`~tei_manager.api.routes.OPERATIONS`."""

    def __init__(self, manager: ManagerFacade) -> None:
        self._manager = manager

    async def reset_state(self) -> Response:
        return json_response(await self._manager.reset_state())

    async def export_state(self) -> Response:
        body = encode_backup(self._manager.export_state())
        response = Response(body, status=200, content_type=TOML)
        response.headers["Content-Disposition"] = 'attachment; filename="tei-manager-state.toml"'
        return response

    async def import_state(self) -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        manager = self._manager
        backup = decode_backup(body, manager.config, gpu_count=manager.gpu_count)
        return json_response(await manager.import_state(backup))
