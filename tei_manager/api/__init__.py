"""The REST management API: Quart-Trio routes over the manager, served by Hypercorn.

- :mod:`~tei_manager.api.routes`: the route table, the one list of what exists.
- :mod:`~tei_manager.api.app`: handlers, error handling, request timing.
- :mod:`~tei_manager.api.server`: :func:`serve_api`, bind and graceful shutdown.
- :mod:`~tei_manager.api.dto`, :mod:`~tei_manager.api.openapi`: bodies and their schema.
- :mod:`~tei_manager.api.facade`: what the API needs from the manager.
"""

from __future__ import annotations

from tei_manager.api.app import ApiApp, create_app
from tei_manager.api.facade import HttpMetrics, ManagerFacade
from tei_manager.api.server import serve_api

__all__ = ["ApiApp", "HttpMetrics", "ManagerFacade", "create_app", "serve_api"]
