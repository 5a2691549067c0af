"""The header routing key's rule, both doors' spellings of it."""

from __future__ import annotations

import pytest

from tei_manager.core.routing_key import MAX_KEY_CHARS, grpc_target, rest_target
from tei_manager.errors import ValidationError


def test_rest_takes_the_body_else_the_header() -> None:
    assert rest_target("a", "model", None, None) == "a"
    assert rest_target(None, "model", "inst", None) == "inst"
    assert rest_target("", "model", None, "org/m") == "org/m"
    assert rest_target("org/m", "model", None, "org/m") == "org/m"
    assert rest_target("inst", "model", "inst", "") == "inst"  # an empty header is none


@pytest.mark.parametrize(
    ("body", "instance", "model", "field"),
    [
        (None, None, None, "model"),
        ("a", None, "b", "model, x-tei-model"),
        ("a", "b", None, "model, x-tei-instance"),
        (None, "a", "a", "x-tei-instance, x-tei-model"),
        (None, None, "m" * (MAX_KEY_CHARS + 1), "x-tei-model"),
    ],
)
def test_rest_refusals_name_the_fields(
    body: str | None, instance: str | None, model: str | None, field: str
) -> None:
    with pytest.raises(ValidationError) as error:
        rest_target(body, "model", instance, model)
    assert error.value.field == field
    assert len(error.value.message) < 300


def test_grpc_header_fills_an_empty_target_and_must_match_a_given_one() -> None:
    assert grpc_target(None, None, None) is None
    assert grpc_target(("instance_index", 2), None, None) == ("instance_index", 2)
    assert grpc_target(None, "i", None) == ("instance_name", "i")
    assert grpc_target(None, None, "org/m") == ("model_id", "org/m")
    assert grpc_target(("model_id", "org/m"), None, "org/m") == ("model_id", "org/m")
    for target, instance, model in (
        (("model_id", "org/m"), None, "org/x"),
        (("model_id", "org/m"), "org/m", None),  # same string, other field
        (("instance_index", 0), "i", None),
        (None, "i", "org/m"),
    ):
        with pytest.raises(ValidationError):
            grpc_target(target, instance, model)


def test_a_long_value_is_shown_cut() -> None:
    with pytest.raises(ValidationError) as error:
        grpc_target(("instance_name", "x" * 1000), "y" * 1000, None)
    assert "(+936 characters)" in error.value.message
    assert len(error.value.message) < 400
