"""The serving request contract without Ray: every input is a valid request or a 4xx RequestError."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.serving_api import (
    GenerateRequest,
    RequestError,
    ServingLimits,
    generate_response,
    parse_generate_request,
    parse_reset_request,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
fields = {
    "user_id": st.text(max_size=140) | json_values,
    "prompt": st.text(max_size=50) | json_values,
    "prompt_b64": st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=12) | json_values,
    "max_new_bytes": st.integers(-10, 5000) | json_values,
    "temperature": st.floats() | st.integers(-5, 20) | json_values,
    "learn": json_values,
    "extra": json_values,
}


def _parses_or_rejects(body: bytes) -> None:
    try:
        request = parse_generate_request(body)
    except RequestError as error:
        assert 400 <= error.status < 500 and error.message
        return
    assert isinstance(request, GenerateRequest)
    assert 1 <= len(request.user_id) <= 128 and 1 <= len(request.prompt) <= 8192
    assert 0 <= request.max_new_bytes <= 1024 and 0.0 <= request.temperature <= 10.0
    assert isinstance(request.learn, bool)


@settings(max_examples=300, deadline=None)
@given(document=st.fixed_dictionaries({}, optional=fields))
def test_fuzzed_json_objects_parse_or_get_a_4xx(document):
    _parses_or_rejects(json.dumps(document).encode())


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_bodies_parse_or_get_a_4xx(body):
    _parses_or_rejects(body)


def test_valid_request_with_defaults():
    request = parse_generate_request(b'{"user_id": "ann", "prompt": "hi"}')
    assert request == GenerateRequest("ann", b"hi", 64, 0.8, True)


def test_prompt_b64_carries_arbitrary_bytes():
    body = json.dumps({"user_id": "ann", "prompt_b64": base64.b64encode(b"\xff\x00").decode(), "learn": False})
    assert parse_generate_request(body.encode()).prompt == b"\xff\x00"


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"x" * (2 << 20), 413, "limit"),
    (b'{"user_id": "a", "prompt": "x", "mood": 1}', 400, "unknown field"),
    (b'{"user_id": "a\\u0000", "prompt": "x"}', 400, "non-printable"),
    (b'{"user_id": "a", "prompt": ""}', 400, "empty"),
    (b'{"user_id": "a", "prompt": "x", "max_new_bytes": 2.5}', 400, "integer"),
    (b'{"user_id": "a", "prompt": "x", "max_new_bytes": true}', 400, "integer"),
    (b'{"user_id": "a", "prompt": "x", "temperature": 1e999}', 400, "temperature"),
    (b'\xff\xfe', 400, "not valid JSON"),
])
def test_each_mistake_is_named(body, status, message):
    with pytest.raises(RequestError, match=message) as caught:
        parse_generate_request(body)
    assert caught.value.status == status


def test_reset_takes_only_a_user_id():
    assert parse_reset_request(b'{"user_id": "ann"}') == "ann"
    with pytest.raises(RequestError, match="user_id is required"):
        parse_reset_request(b"{}")


def test_response_has_no_nan_and_round_trips_bytes():
    body = generate_response(b"\xffok", "v0001", {"active_params": 10, "latency_ms": 1.5,
                                                  "complexity": float("nan"), "memory_writes": 2}, "e1")
    assert json.loads(json.dumps(body, allow_nan=False))["metrics"]["complexity"] is None
    assert base64.b64decode(body["response_b64"]) == b"\xffok" and body["text"] == "\ufffdok"
