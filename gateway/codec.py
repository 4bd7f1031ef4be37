"""JSON payloads of the MQTT contract: requests in, `ok` / `queued` / `error` answers out. Pure."""
from __future__ import annotations

import json
from dataclasses import dataclass

from common.errors import BadRequestError, CAError
from common.jsonobj import load_object

from .topics import OPS

MAX_PAYLOAD = 64 * 1024
ERROR_CODES = ("bad_request", "unauthorized", "unknown_device", "revoked", "posture_noncompliant",
               "policy_violation", "rate_limited", "unavailable")


@dataclass(frozen=True)
class Request:
    device_id: str
    op: str
    id: str
    fields: dict


READ_ID_LIMIT = 1024 * 1024
# fields each operation needs besides `id` (MQTT contract, requests table)
REQUIRED = {"simpleenroll": ("csr", "token"), "simplereenroll": ("cms",), "posture": ("cms",)}


def read_id(payload: bytes) -> str | None:
    """The request id, if one can be read at all (to answer a bad request on the right id)."""
    if len(payload) > READ_ID_LIMIT:
        return None
    try:
        value = json.loads(payload).get("id")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, str) and 1 <= len(value) <= 64 else None


def parse_request(device_id: str, op: str, payload: bytes) -> Request:
    body = load_object(payload, what="payload", limit=MAX_PAYLOAD)
    req_id = body.get("id")
    if not isinstance(req_id, str) or not 1 <= len(req_id) <= 64:
        raise BadRequestError("field 'id' must be a string of 1 to 64 characters")
    required = REQUIRED.get(op, ())
    if op not in OPS:
        raise BadRequestError(f"unknown operation {op!r}")
    for name in required:
        if not isinstance(body.get(name), str) or not body[name]:
            raise BadRequestError(f"field {name!r} is missing or not a string")
    return Request(device_id, op, req_id, body)


def ok(req_id: str, **fields) -> dict:
    return {"id": req_id, "status": "ok", **fields}


def queued(req_id: str) -> dict:
    return {"id": req_id, "status": "queued"}


def error(req_id: str | None, code: str, message: str) -> dict:
    code = code if code in ERROR_CODES else ("unavailable" if code == "internal" else "policy_violation")
    return {"id": req_id, "status": "error", "error": {"code": code, "message": message}}


def error_from(req_id: str | None, exc: CAError) -> dict:
    return error(req_id, exc.code, exc.message)


def encode(answer: dict) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode()
