"""One JSON object from bytes off the wire (an MQTT payload, a posture document), size-bounded,
every failure a BadRequestError with a readable reason."""
from __future__ import annotations

import json

from .errors import BadRequestError


def load_object(data: bytes, *, what: str, limit: int, example: str = "") -> dict:
    if len(data) > limit:
        raise BadRequestError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequestError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"{what} must be a JSON object{' such as ' + example if example else ''}")
    return value
