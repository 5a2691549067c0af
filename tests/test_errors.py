from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

import msgspec
import pytest

from tei_manager.errors import (
    ERROR_TABLE,
    ConfigError,
    ConflictError,
    ErrorBody,
    ErrorCode,
    LimitError,
    NotFoundError,
    TeiError,
    ValidationError,
    error_body,
    from_msgspec_error,
    quote,
    rfc3339_utc,
)
from tei_manager.grpc.rpc import StatusCode

# The REST contract's error table, copied here so a change to either side fails.
CONTRACT = {
    400: "INVALID_CONFIG INVALID_PORT INVALID_GPU_ID INVALID_NAME INVALID_MODEL_ID "
    "VALIDATION_ERROR MALFORMED_JSON",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "INSTANCE_NOT_FOUND MODEL_NOT_FOUND NOT_FOUND",
    409: "INSTANCE_EXISTS PORT_CONFLICT ALREADY_RUNNING NOT_RUNNING MODEL_BUSY MODEL_IN_USE",
    413: "PAYLOAD_TOO_LARGE",
    422: "MAX_INSTANCES_REACHED PORT_ALLOCATION_FAILED",
    429: "OVERLOADED",
    503: "BACKEND_UNAVAILABLE NOT_READY",
    504: "TIMEOUT",
    500: "INTERNAL_ERROR IO_ERROR",
}
# Codes of our own where the contract's table has none.
BEYOND_CONTRACT = {
    405: "METHOD_NOT_ALLOWED",
    409: "INSUFFICIENT_MEMORY",  # models on demand (issue 17)
    503: "CAPACITY_EXHAUSTED",
}
CONTRACT_STATUS = {
    code: status
    for status, codes in (*CONTRACT.items(), *BEYOND_CONTRACT.items())
    for code in codes.split()
}


def test_table_covers_exactly_the_contract_codes() -> None:
    assert {c.value for c in ErrorCode} == set(CONTRACT_STATUS)
    assert set(ERROR_TABLE) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_http_status_matches_contract(code: ErrorCode) -> None:
    assert ERROR_TABLE[code].http_status == CONTRACT_STATUS[code.value]
    assert TeiError(code, "x").http_status == CONTRACT_STATUS[code.value]


@pytest.mark.parametrize(
    ("code", "grpc"),
    [
        (ErrorCode.VALIDATION_ERROR, StatusCode.INVALID_ARGUMENT),
        (ErrorCode.MALFORMED_JSON, StatusCode.INVALID_ARGUMENT),
        (ErrorCode.UNAUTHENTICATED, StatusCode.UNAUTHENTICATED),
        (ErrorCode.FORBIDDEN, StatusCode.PERMISSION_DENIED),
        (ErrorCode.INSTANCE_NOT_FOUND, StatusCode.NOT_FOUND),
        (ErrorCode.INSTANCE_EXISTS, StatusCode.ALREADY_EXISTS),
        (ErrorCode.NOT_RUNNING, StatusCode.FAILED_PRECONDITION),
        (ErrorCode.METHOD_NOT_ALLOWED, StatusCode.UNIMPLEMENTED),
        (ErrorCode.PAYLOAD_TOO_LARGE, StatusCode.RESOURCE_EXHAUSTED),
        (ErrorCode.OVERLOADED, StatusCode.RESOURCE_EXHAUSTED),
        (ErrorCode.BACKEND_UNAVAILABLE, StatusCode.UNAVAILABLE),
        (ErrorCode.NOT_READY, StatusCode.UNAVAILABLE),
        (ErrorCode.TIMEOUT, StatusCode.DEADLINE_EXCEEDED),
        (ErrorCode.INTERNAL_ERROR, StatusCode.INTERNAL),
        (ErrorCode.IO_ERROR, StatusCode.INTERNAL),
    ],
)
def test_grpc_status(code: ErrorCode, grpc: StatusCode) -> None:
    assert TeiError(code, "x").grpc_status is grpc


def test_no_error_maps_to_grpc_ok_or_unknown() -> None:
    for mapping in ERROR_TABLE.values():
        assert mapping.grpc_status not in (StatusCode.OK, StatusCode.UNKNOWN)


def test_grpc_status_groups_follow_http_status() -> None:
    # Codes that share an HTTP status in the 400/404 families share a gRPC status too.
    for code, mapping in ERROR_TABLE.items():
        if mapping.http_status == 400:
            assert mapping.grpc_status is StatusCode.INVALID_ARGUMENT, code
        if mapping.http_status == 404:
            assert mapping.grpc_status is StatusCode.NOT_FOUND, code


def test_tei_error_carries_code_and_message() -> None:
    err = TeiError(ErrorCode.TIMEOUT, "backend took too long")
    assert err.code is ErrorCode.TIMEOUT
    assert str(err) == err.message == "backend took too long"
    assert repr(err) == "TeiError('TIMEOUT', 'backend took too long')"


def test_tei_error_accepts_code_string() -> None:
    assert TeiError("NOT_FOUND", "x").code is ErrorCode.NOT_FOUND  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "good", "bad"),
    [
        (NotFoundError, ErrorCode.MODEL_NOT_FOUND, ErrorCode.PORT_CONFLICT),
        (ConflictError, ErrorCode.MODEL_IN_USE, ErrorCode.INSTANCE_NOT_FOUND),
        (LimitError, ErrorCode.PORT_ALLOCATION_FAILED, ErrorCode.OVERLOADED),
    ],
)
def test_subclasses_refuse_codes_of_other_families(
    cls: type[TeiError], good: ErrorCode, bad: ErrorCode
) -> None:
    assert cls(good, "ok").code is good
    with pytest.raises(ValueError, match="cannot carry"):
        cls(bad, "no")


def test_validation_error_names_field_and_rule() -> None:
    err = ValidationError("port", "80 is privileged: use 1024-65535", code=ErrorCode.INVALID_PORT)
    assert str(err) == "port: 80 is privileged: use 1024-65535"
    assert (err.field, err.rule) == ("port", "80 is privileged: use 1024-65535")
    assert err.http_status == 400
    assert ValidationError("x", "bad").code is ErrorCode.VALIDATION_ERROR
    assert str(ValidationError("", 'unknown field "foo"')) == 'unknown field "foo"'
    with pytest.raises(ValueError, match="cannot carry"):
        ValidationError("x", "y", code=ErrorCode.TIMEOUT)


def test_validation_error_at_prefixes_the_field() -> None:
    err = ValidationError("name", "too long", code=ErrorCode.INVALID_NAME).at("instances[1]")
    assert str(err) == "instances[1].name: too long"
    assert err.code is ErrorCode.INVALID_NAME
    assert str(ValidationError("", "unknown field").at("instances[0]")) == (
        "instances[0]: unknown field"
    )


def test_config_error_is_one_line() -> None:
    err = ConfigError("invalid TOML:\nExpected '=' (at line 1)\r\n")
    assert "\n" not in str(err) and "\r" not in str(err)
    assert err.code is ErrorCode.INVALID_CONFIG
    wrapped = ConfigError.from_validation(ValidationError("api_port", "80 is privileged"))
    assert str(wrapped) == "api_port: 80 is privileged"
    assert isinstance(wrapped.__cause__, ValidationError)


def test_error_body_json() -> None:
    now = datetime(2025, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)
    body = error_body(NotFoundError(ErrorCode.INSTANCE_NOT_FOUND, "no such instance"), now=now)
    assert body == ErrorBody(
        error="no such instance", code="INSTANCE_NOT_FOUND", timestamp="2025-01-15T10:30:00Z"
    )
    assert msgspec.json.decode(msgspec.json.encode(body)) == {
        "error": "no such instance",
        "code": "INSTANCE_NOT_FOUND",
        "timestamp": "2025-01-15T10:30:00Z",
    }


def test_timestamps_are_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert rfc3339_utc(datetime(2025, 1, 15, 12, 30, tzinfo=plus_two)) == "2025-01-15T10:30:00Z"
    assert rfc3339_utc(datetime(2025, 1, 15, 10, 30)) == "2025-01-15T10:30:00Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rfc3339_utc())


def test_quote_keeps_messages_on_one_line() -> None:
    assert quote("a") == '"a"'
    assert quote('x\ny"') == '"x\\ny\\""'


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    port: int
    mode: Literal["a", "b"] = "a"


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    items: list[Inner]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"items": [{"port": 1}, {"port": "x"}]}, "items[1].port: expected int, got str"),
        ({"items": [{"port": 1, "extra": 2}]}, 'items[0]: unknown field "extra"'),
        ({"extra": 1, "items": []}, 'unknown field "extra"'),
        ({"items": [{}]}, "items[0].port: required field is missing"),
        ({}, "items: required field is missing"),
        ({"items": [{"port": 1, "mode": "c"}]}, 'items[0].mode: "c" is not allowed'),
        ({"items": [{"port": 1, "mode": "c' - at `$.x"}]}, "items[0].mode:"),
        ([], "doc: expected object, got array"),
    ],
)
def test_from_msgspec_error(data: object, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, Outer)
    err = from_msgspec_error(info.value, root="doc")
    assert err.code is ErrorCode.VALIDATION_ERROR
    assert str(err).startswith(message)
