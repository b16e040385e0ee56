"""The serving HTTP contract: request parsing and validation, and the response shape.

Plain functions, no Ray: every malformed request becomes a `RequestError` (a 4xx status and a
message that says what is wrong), and nothing else may escape `parse_generate_request` — the
fuzz tests hold this module to that.

    POST /v1/generate  {"user_id": str, "prompt": str|null, "prompt_b64": str|null,
                        "max_new_bytes": int, "temperature": float, "learn": bool = true}
    POST /v1/reset     {"user_id": str}
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask for. Defaults keep a CPU replica responsive."""

    max_body_bytes: int = 1 << 20
    max_user_id_chars: int = 128
    max_prompt_bytes: int = 8192
    max_new_bytes: int = 1024
    max_temperature: float = 10.0
    default_max_new_bytes: int = 64
    default_temperature: float = 0.8


class RequestError(ValueError):
    """A client mistake: `status` is the HTTP status (4xx) to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class GenerateRequest:
    user_id: str
    prompt: bytes
    max_new_bytes: int
    temperature: float
    learn: bool = True


_GENERATE_FIELDS = {"user_id", "prompt", "prompt_b64", "max_new_bytes", "temperature", "learn"}


def parse_json_object(body: bytes, limits: ServingLimits, allowed: set[str]) -> dict[str, Any]:
    """The request body as a JSON object with only `allowed` keys."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}", 413)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(f"request body is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise RequestError(f"request body must be a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown[:5]}; allowed fields are {sorted(allowed)}")
    return document


def validate_user_id(user_id: Any, limits: ServingLimits = ServingLimits()) -> str:
    if user_id is None:
        raise RequestError("user_id is required")
    if not isinstance(user_id, str):
        raise RequestError(f"user_id must be a string, got {type(user_id).__name__}")
    if not user_id or len(user_id) > limits.max_user_id_chars:
        raise RequestError(f"user_id must be 1 to {limits.max_user_id_chars} characters, got {len(user_id)}")
    if not user_id.isprintable():
        raise RequestError("user_id must not contain control or other non-printable characters")
    try:
        user_id.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("user_id is not valid Unicode (it contains a lone surrogate)") from None
    return user_id


def _prompt_bytes(document: dict[str, Any], limits: ServingLimits) -> bytes:
    text, b64 = document.get("prompt"), document.get("prompt_b64")
    if (text is None) == (b64 is None):
        raise RequestError("give exactly one of prompt (UTF-8 text) or prompt_b64 (base64 bytes)")
    if text is not None:
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("prompt is not valid UTF-8 text (it contains a lone surrogate); "
                               "send arbitrary bytes as prompt_b64") from None
    else:
        if not isinstance(b64, str):
            raise RequestError(f"prompt_b64 must be a base64 string, got {type(b64).__name__}")
        if len(b64) > 4 * (limits.max_prompt_bytes // 3 + 1):
            raise RequestError(f"prompt_b64 decodes to more than {limits.max_prompt_bytes} bytes")
        try:
            data = base64.b64decode(b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise RequestError("prompt_b64 is not valid base64 (standard alphabet, with padding)") from None
    if not data:
        raise RequestError("prompt is empty; the model needs at least one byte to read")
    if len(data) > limits.max_prompt_bytes:
        raise RequestError(f"prompt is {len(data)} bytes; the limit is {limits.max_prompt_bytes}")
    return data


def _int_field(document: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = document.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _float_field(document: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = document.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise RequestError(f"{name} is too large; it must be in [{low}, {high}]") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def parse_generate_request(body: bytes, limits: ServingLimits = ServingLimits()) -> GenerateRequest:
    """The validated request, or RequestError saying what is wrong."""
    document = parse_json_object(body, limits, _GENERATE_FIELDS)
    user_id = validate_user_id(document.get("user_id"), limits)
    prompt = _prompt_bytes(document, limits)
    max_new_bytes = _int_field(document, "max_new_bytes", limits.default_max_new_bytes, 0, limits.max_new_bytes)
    temperature = _float_field(document, "temperature", limits.default_temperature, 0.0, limits.max_temperature)
    learn = document.get("learn", True)
    if learn is None:
        learn = True
    if not isinstance(learn, bool):
        raise RequestError(f"learn must be true or false, got {type(learn).__name__}")
    return GenerateRequest(user_id, prompt, max_new_bytes, temperature, learn)


def parse_reset_request(body: bytes, limits: ServingLimits = ServingLimits()) -> str:
    """The user id to reset, or RequestError."""
    return validate_user_id(parse_json_object(body, limits, {"user_id"}).get("user_id"), limits)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: unknown metrics are null."""
    return float(value) if math.isfinite(value) else None


def generate_response(response: bytes, model_version: str, metrics: dict[str, float], event_id: str
                      ) -> dict[str, Any]:
    """The JSON body of a successful /v1/generate."""
    return {
        "text": response.decode("utf-8", errors="replace"),
        "response_b64": base64.b64encode(response).decode("ascii"),
        "model_version": model_version,
        "event_id": event_id,
        "metrics": {
            "active_params": int(metrics["active_params"]),
            "latency_ms": finite_or_none(metrics["latency_ms"]),
            "complexity": finite_or_none(metrics["complexity"]),
            "memory_writes": int(metrics["memory_writes"]),
            "batch_size": int(metrics.get("batch_size", 1)),  # users decoded together with this one
        },
    }
