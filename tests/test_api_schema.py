"""The OpenAPI document against the server it describes, checked by schemathesis.

The real app serves over a real socket (in a thread running its own trio loop) with
an in-memory manager; schemathesis reads ``/openapi.json`` from it, generates
requests for every operation (valid ones, and ones the schema forbids) and checks
each answer: no 5xx, only documented statuses, bodies and content types as
documented, valid data accepted and invalid data rejected. Fixed seed
(``derandomize``) and a bounded number of examples per operation.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import requests
import schemathesis
import tomli_w
import trio
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tei_manager.api import serve_api
from tei_manager.api.routes import OPERATIONS
from tei_manager.config import ManagerConfig
from tei_manager.errors import ErrorCode
from tei_manager.hub.retry import RetryPolicy
from tei_manager.hub.settings import HubSettings, RegistrySettings
from tests.fake_manager import FakeManager
from tests.hubserver import HubServer

# Examples per operation and generation mode: ~20 operations x 2 modes x this.
EXAMPLES = 30


@pytest.fixture
def base_url(tmp_path: Path) -> Iterator[str]:
    """The REST API served in a thread with its own trio loop; its base URL."""
    with contextlib.ExitStack() as stack:
        yield from _serve(tmp_path, stack)


def _serve(tmp_path: Path, stack: contextlib.ExitStack) -> Iterator[str]:
    config = ManagerConfig(
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        api_port=0,
        grpc_port=0,
        instance_port_start=20000,
        instance_port_end=20099,
    )
    # The GPU count is the host's, which no schema can state: with it unknown, any
    # gpu_id the schema allows is taken.
    hub = stack.enter_context(HubServer())  # an empty Hub: every download ends in 404
    manager = FakeManager(
        config,
        gpu_count=None,
        hub=HubSettings(cache_dir=str(tmp_path / "cache"), endpoint=hub.url),
        model_settings=RegistrySettings(retry=RetryPolicy(max_retries=0)),
    )
    # Ready and started: the probes' documented 503s are for a manager that is not.
    manager.state_restored = manager.startup_complete = True
    started: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.models.run)
            port = await nursery.start(serve_api, manager, "127.0.0.1", 0)
            started.put((port, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    port, token, scope = started.get(timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=30)


# An import is checked whole (unique names and ports, each instance as on create):
# rules across its entries that no schema states, so valid-looking data may be refused.
WHOLE_DOCUMENT: Final = "POST /state/import"


def _toml_value(value: object) -> object:
    # TOML has no null. Dropping the key could turn a bad document into a good one
    # (an unknown key whose value is null), so a null becomes an empty table, which
    # no field of the document takes.
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: _toml_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_toml_value(v) for v in value]
    return value


@schemathesis.serializer("application/toml")
def toml_body(ctx: object, value: object) -> bytes:
    """Generated bodies as TOML; what TOML cannot hold is sent as it is (a bad document)."""
    try:
        if isinstance(value, dict):
            return tomli_w.dumps(_toml_value(value)).encode()
    except (TypeError, ValueError):
        pass
    return repr(value).encode()


# The one rule of POST /instances that JSON Schema cannot state: prometheus_port and
# port must differ (the GPU count, the other, is left unknown above).
CROSS_FIELD: Final = ("POST /instances", ErrorCode.INVALID_PORT.value)


@schemathesis.check
def rejected_only_for_a_cross_field_rule(
    ctx: CheckContext, response: Response, case: Case
) -> bool | None:
    """Valid POST /instances data is taken, unless port and prometheus_port are one port."""
    if response.status_code != 400 or case.meta is None:
        return None
    if not case.meta.generation.mode.is_positive:
        return None
    body = case.body if isinstance(case.body, dict) else {}
    same_port = body.get("port") == body.get("prometheus_port") not in (None, 0)
    code = json.loads(response.content).get("code")
    assert same_port and code == CROSS_FIELD[1], f"valid data rejected: {response.content!r}"
    return True


def check_operation(
    operation: APIOperation, mode: GenerationMode, base_url: str, session: requests.Session
) -> None:
    """Generated requests for ``operation``; raises on the first broken promise."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Case) -> None:
        if operation.label == CROSS_FIELD[0]:
            case.call_and_validate(
                base_url=base_url,
                session=session,
                excluded_checks=[positive_data_acceptance],
                additional_checks=[rejected_only_for_a_cross_field_rule],
            )
        elif operation.label == WHOLE_DOCUMENT:
            case.call_and_validate(
                base_url=base_url,
                session=session,
                excluded_checks=[positive_data_acceptance, rejected_only_for_a_cross_field_rule],
            )
        else:
            case.call_and_validate(base_url=base_url, session=session)

    check()


def test_the_server_keeps_every_promise_of_its_openapi_document(base_url: str) -> None:
    failures: list[str] = []
    with requests.Session() as session:
        # The document as served, not as built in this process.
        schema = schemathesis.openapi.from_dict(session.get(f"{base_url}/openapi.json").json())
        operations = [result.ok() for result in schema.get_all_operations()]
        # The inference routes (tag "inference") are left out on purpose: their
        # contracts are OpenAI's and TEI's, not this document's rules: TEI answers a
        # documented 503 "Unhealthy" and 424, which this check takes for server
        # errors, and whether a schema-valid body is served depends on the model
        # behind the route (its kind, its token limit), which no static schema states.
        # tests/test_inference_routes.py and tests/test_http_inference.py check them
        # with the real clients; test_inference_routes also checks their document.
        operations = [op for op in operations if "inference" not in (op.tags or [])]
        assert len(operations) == len(OPERATIONS)
        for operation in operations:
            has_input = bool(operation.path_parameters or operation.query or operation.body)
            # Nothing to get wrong in a request with no input: only valid ones exist.
            modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if has_input else 1]
            for mode in modes:
                try:
                    check_operation(operation, mode, base_url, session)
                except (Exception, BaseExceptionGroup) as error:
                    failures.append(f"{operation.label} ({mode}): {error}"[:3000])
    assert not failures, "\n\n".join(failures)
