"""The Quart-Trio application: the REST routes over a :class:`ManagerFacade`.

Handlers are thin: decode, call the manager, encode with msgspec. Every failure
becomes the contract's error body in one place (:mod:`tei_manager.api.responses`),
and every request's duration is recorded by route template, method and status.
"""

from __future__ import annotations

import re
import time
from collections.abc import MutableMapping
from typing import Any, Final, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import generate_latest
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tei_manager.api.auth import install_auth
from tei_manager.api.dto import ProbeStatus
from tei_manager.api.exchange import Exchange
from tei_manager.api.facade import ManagerFacade
from tei_manager.api.inference import INFERENCE_MAX_BODY_BYTES, register_inference_routes
from tei_manager.api.inference_asgi import InferenceDispatch
from tei_manager.api.inference_doors import inference_doors
from tei_manager.api.models_routes import ModelHandlers, ModelIdConverter
from tei_manager.api.openapi import openapi_json
from tei_manager.api.refusals import door_error_renderer
from tei_manager.api.responses import (
    error_response,
    http_exception_response,
    json_response,
    unexpected_error_response,
)
from tei_manager.api.routes import MAX_BODY_BYTES, OPERATIONS, PROMETHEUS_TEXT, quart_rule
from tei_manager.api.state_routes import StateHandlers
from tei_manager.api.storage import check_storage
from tei_manager.auth.security import Security, build_security
from tei_manager.config import decode_instance_config
from tei_manager.errors import ErrorCode, TeiError, ValidationError, quote
from tei_manager.gateway.relay import Gateway

__all__ = ["NO_RESPONSE_STATUS", "UNMATCHED_ROUTE", "ApiApp", "create_app", "route_of"]

# Route label of a request no route matched (404, 405): the raw path would give
# every scanner's probe its own time series.
UNMATCHED_ROUTE: Final = "unmatched"
# Status label of a request that ended without a response: the client went away
# or shutdown cancelled it (nginx's "client closed request").
NO_RESPONSE_STATUS: Final = 499
# Where the matched route template travels from the request hook to the timer.
_ROUTE_KEY: Final = "tei_manager.route"
_TEMPLATES: Final = {op.endpoint: op.path for op in OPERATIONS}
# Slice bounds: an optional sign and digits. Stricter than int(), which also takes
# "1_000" and " 5", and short enough that no 4300-digit number gets parsed.
_INT_RE: Final = re.compile(r"[+-]?[0-9]{1,18}")
_PROBE_OK: Final = ProbeStatus()


def _scope_extras(scope: Scope) -> MutableMapping[str, Any]:
    # ASGI lets servers and middleware add their own scope keys; the TypedDicts
    # do not know ours.
    return cast(MutableMapping[str, Any], scope)


class ApiApp(QuartTrio):
    """A QuartTrio app bound to one manager, timing every HTTP request it answers.

    The inference routes, once :meth:`serve_inference` is given them, are answered
    in front of Quart (:mod:`.inference_asgi`); everything else is Quart's.
    """

    def __init__(self, manager: ManagerFacade) -> None:
        super().__init__(__name__, static_folder=None)
        self.manager = manager
        self._inference: InferenceDispatch | None = None

    @property
    def inference(self) -> InferenceDispatch | None:
        """What answers the inference routes ahead of Quart; None without a gateway."""
        return self._inference

    def serve_inference(self, dispatch: InferenceDispatch) -> None:
        """Answer the requests ``dispatch`` matches with it, before Quart."""
        self._inference = dispatch

    async def asgi_app(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one ASGI connection; HTTP requests are timed around the whole exchange
        and kept safe for the connection that carries them (:mod:`.exchange`)."""
        if scope["type"] != "http":
            await super().asgi_app(scope, receive, send)
            return
        started = time.perf_counter()
        matched = None if self._inference is None else self._inference.match(scope)
        if matched is not None:
            _scope_extras(scope)[_ROUTE_KEY] = matched.label
        limit = MAX_BODY_BYTES if matched is None else INFERENCE_MAX_BODY_BYTES
        exchange = Exchange(scope, receive, send, max_body_bytes=limit)
        try:
            if matched is None:
                await super().asgi_app(scope, exchange.receive, exchange.send)
            else:
                assert self._inference is not None
                await self._inference.serve(matched, scope, exchange)
            await exchange.read_off_body()
        except Exception:
            # The server answers 500 for what escapes the app.
            exchange.status = exchange.status or 500
            raise
        finally:
            # Also on cancellation: a request cut off at shutdown still took time.
            self.manager.metrics.observe_http(
                _scope_extras(scope).get(_ROUTE_KEY, UNMATCHED_ROUTE),
                scope["method"],
                exchange.status or NO_RESPONSE_STATUS,
                time.perf_counter() - started,
            )


class _Handlers:
    """One method per operation in :data:`OPERATIONS`, named by its endpoint."""

    def __init__(self, manager: ManagerFacade) -> None:
        self._manager = manager
        self._openapi = openapi_json()

    async def list_instances(self) -> Response:
        return json_response(self._manager.list_instances())

    async def create_instance(self) -> Response:
        # The body is JSON whatever the Content-Type says: the original's runbooks
        # use `curl -d '{...}'`, which sends application/x-www-form-urlencoded.
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        config = decode_instance_config(body)
        return json_response(await self._manager.create_instance(config), 201)

    async def get_instance(self, name: str) -> Response:
        return json_response(self._manager.get_instance(name))

    async def delete_instance(self, name: str) -> Response:
        return json_response(await self._manager.delete_instance(name))

    async def start_instance(self, name: str) -> Response:
        return json_response(await self._manager.start_instance(name))

    async def stop_instance(self, name: str) -> Response:
        return json_response(await self._manager.stop_instance(name))

    async def restart_instance(self, name: str) -> Response:
        return json_response(await self._manager.restart_instance(name))

    async def instance_logs(self, name: str) -> Response:
        start, end = _int_arg("start"), _int_arg("end")
        return json_response(await self._manager.instance_logs(name, start, end))

    async def devices(self) -> Response:
        return json_response(self._manager.devices_report())

    async def health(self) -> Response:
        summary = self._manager.health_summary()
        storage = await check_storage(
            self._manager.config.log_dir, model_cache=self._manager.models.cache_dir
        )
        return json_response({**summary, "storage": storage})

    async def health_live(self) -> Response:
        return json_response(_PROBE_OK)

    async def health_ready(self) -> Response:
        reason = self._manager.not_ready_reason()
        if reason is not None:
            raise TeiError(ErrorCode.NOT_READY, reason)
        return json_response(_PROBE_OK)

    async def health_startup(self) -> Response:
        if not self._manager.startup_complete:
            raise TeiError(
                ErrorCode.NOT_READY,
                "startup has not finished: restoring state and launching seed instances",
            )
        return json_response(_PROBE_OK)

    async def metrics(self) -> Response:
        # generate_latest walks every collector synchronously; keep it off the loop.
        text = await trio.to_thread.run_sync(generate_latest, self._manager.metrics.prometheus)
        return Response(text, status=200, content_type=PROMETHEUS_TEXT)

    async def openapi(self) -> Response:
        return Response(self._openapi, status=200, content_type="application/json")


def _int_arg(name: str) -> int | None:
    """Query parameter ``name`` as an int; absent or empty is None."""
    raw = request.args.get(name)
    if not raw:
        return None
    if not _INT_RE.fullmatch(raw):
        shown = raw if len(raw) <= 32 else raw[:32] + "..."
        raise ValidationError(name, f"{quote(shown)} is not an integer")
    return int(raw)


def route_of(scope: Scope) -> str:
    """The template of the route that served the request of ``scope``, once matched."""
    return str(_scope_extras(scope).get(_ROUTE_KEY, UNMATCHED_ROUTE))


async def _note_route() -> None:
    """Hand the matched route's template to the timer in :meth:`ApiApp.asgi_app`."""
    rule = request.url_rule
    if rule is not None and rule.endpoint is not None:
        template = _TEMPLATES.get(rule.endpoint, rule.rule)
        _scope_extras(request.scope)[_ROUTE_KEY] = template


async def _on_tei_error(error: TeiError) -> Response:
    return error_response(error)


async def _on_http_exception(error: HTTPException) -> Response:
    # Under /v1/ and /tei/ a client of that door reads the door's error shape.
    render = door_error_renderer(request.path)
    return http_exception_response(error, request.method, request.path, render)


async def _on_exception(error: Exception) -> Response:
    # Reached only by exceptions nobody handled: HTTPException and TeiError have
    # their own handlers, and Quart-Trio offers each member of an exception group
    # to the handlers one by one before a group gets here.
    return unexpected_error_response(error, request.method, request.path)


def create_app(
    manager: ManagerFacade, security: Security | None = None, gateway: Gateway | None = None
) -> ApiApp:
    """The REST API for ``manager``: every route in :data:`OPERATIONS`, behind
    ``security`` (default: built from ``manager.config``), and the inference routes
    (scope ``inference``) when a ``gateway`` serves them."""
    app = ApiApp(manager)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.url_map.converters["model_id"] = ModelIdConverter
    handlers = _Handlers(manager)
    model_handlers = ModelHandlers(manager)
    state_handlers = StateHandlers(manager)
    for op in OPERATIONS:
        handler = (
            getattr(handlers, op.endpoint, None)
            or getattr(model_handlers, op.endpoint, None)
            or getattr(state_handlers, op.endpoint)
        )
        app.add_url_rule(
            quart_rule(op.path),
            op.endpoint,
            handler,
            methods=[op.method],
            # A model id is never rewritten: "//etc" stays a (refused) model id.
            merge_slashes="{model_id}" not in op.path,
        )
    views = None if gateway is None else register_inference_routes(app, inference_doors(gateway))
    app.before_request(_note_route)
    guard = install_auth(
        app, security or build_security(manager.config, manager.metrics.prometheus)
    )
    if views is not None:
        app.serve_inference(InferenceDispatch(app.url_map, views, guard))
    app.register_error_handler(TeiError, _on_tei_error)
    app.register_error_handler(HTTPException, _on_http_exception)
    app.register_error_handler(Exception, _on_exception)
    return app
