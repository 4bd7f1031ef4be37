"""The admin API under /api/v1: JSON for what the console shows and does, with the same roles
(ca/operators.py), described by console/openapi.json (served at /api/v1/openapi.json).

Every handler names the action it needs (`_operator(request, action)`) before it reads or
writes anything; the core call that follows is the same one the CLI makes, with the operator
as the audit actor (`operator:NAME:ROLE`).
"""
from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

from ca import operators, views
from ca.errors import BadRequestError, UnauthorizedError
from ca.model import RevocationReason, parse_serial, serial_hex
from ca.registry import EDITABLE, new_device
from ca.timefmt import parse_duration
from common.ids import check_id

from .state import AUTHORITY, OPERATOR

OPENAPI = Path(__file__).with_name("openapi.json")
MAX_PAGE = 500
CHAIN_WAIT = 0.5   # seconds a page waits for a full pass of the audit chain before showing its progress
DEVICE_FILTERS = ("status", "owner", "model", "location", "criticality")
REGISTER_FIELDS = ("device_id",) + EDITABLE


def _operator(request: web.Request, action: str) -> operators.Operator:
    op = request.get(OPERATOR)
    if op is None:
        raise UnauthorizedError("log in to the console, or send Authorization: Bearer with an operator API token")
    operators.require(op, action)
    return op


def _int(request: web.Request, name: str, default: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= high:   # "³".isdigit() is True
        raise BadRequestError(f"query parameter {name!r} must be a whole number from 0 to {high}")
    return int(text)


async def _json_body(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise BadRequestError(f"Content-Type must be application/json, not {request.content_type or 'missing'}")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    return body


def _duration(query, name: str):
    text = query.get(name)
    if not text:
        return None
    try:
        return parse_duration(text, cap=True)   # "within a thousand years" is as good as "within ever"
    except BadRequestError:
        raise BadRequestError(f"query parameter {name!r} must be a duration such as 24h or 7d") from None


async def device_rows(request: web.Request, *, paged: bool = True) -> tuple[list[dict], int]:
    """The devices a filter selects, as JSON rows with their current certificate's expiry, and how
    many match: exact `status`, `owner`, `model`, `location`, `criticality`; `q` (a substring of id,
    model, owner, location, asset tag or serial number, any case); `expiring=7d` (the current
    certificate ends within that); `absent=3d` (no proven contact for that long, or never). Read
    by the store a page at a time (store/sqlite_reports.py), not by reading every device."""
    authority = request.app[AUTHORITY]
    now = authority.now()
    expiring, absent = _duration(request.query, "expiring"), _duration(request.query, "absent")
    offset, limit = _int(request, "offset", 0, 10**9), _int(request, "limit", 100, MAX_PAGE)
    async with authority.store.read() as tx:
        page, total = await tx.device_page(
            fields={name: request.query[name] for name in DEVICE_FILTERS if request.query.get(name)},
            q=(request.query.get("q") or "").strip() or None,
            expiring_until=None if expiring is None else now + expiring,
            absent_before=None if absent is None else now - absent,
            now=now, offset=offset if paged else 0, limit=limit if paged else None)
    return [views.device_json(d, expires) for d, expires in page], total


async def me(request: web.Request) -> web.Response:
    op = _operator(request, "read")
    return web.json_response({"name": op.name, "role": op.role,
                              "may": sorted(a for a in operators.ACTIONS if operators.allowed(op.role, a))})


async def list_devices(request: web.Request) -> web.Response:
    _operator(request, "read")
    rows, total = await device_rows(request)
    return web.json_response({"devices": rows, "total": total})


async def get_device(request: web.Request) -> web.Response:
    _operator(request, "read")
    authority = request.app[AUTHORITY]
    device = await authority.registry.get(check_id(request.match_info["device_id"]))
    certs = await authority.certificates(device.id)
    current = max((c.not_after for c in certs if c.status.value == "good"), default=None)
    return web.json_response({"device": views.device_json(device, current),
                              "certificates": [views.cert_json(c) for c in certs]})


def _token_json(tok) -> dict:
    return {"device_id": tok.device_id, "token": tok.secret, "expires_at": views.ts(tok.expires_at)}


def _string_fields(body: dict, allowed: tuple[str, ...]) -> dict[str, str]:
    unknown = set(body) - set(allowed)
    if unknown:
        raise BadRequestError(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(allowed)}")
    if not all(isinstance(v, str) for v in body.values()):
        raise BadRequestError("every field must be a string")
    return {k: v.strip() for k, v in body.items()}


async def register_device(request: web.Request) -> web.Response:
    """One device, as `iomtca device add`: its one-time token in the answer, once."""
    op = _operator(request, "device.write")
    values = _string_fields(await _json_body(request), REGISTER_FIELDS)
    missing = [f for f in ("device_id", "model", "owner") if not values.get(f)]
    if missing:
        raise BadRequestError(f"field(s) {', '.join(missing)} required")
    device_id = values.pop("device_id")
    token = await request.app[AUTHORITY].registry.add(new_device(device_id, **values), actor=op.actor)
    return web.json_response(_token_json(token), status=201)


async def edit_device(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    wanted = _string_fields(await _json_body(request), EDITABLE)
    if not wanted:
        raise BadRequestError(f"give at least one field to change: {', '.join(EDITABLE)}")
    authority = request.app[AUTHORITY]
    device = await authority.registry.get(check_id(request.match_info["device_id"]))
    current = views.editable_values(device)
    changes = {k: v for k, v in wanted.items() if v != current.get(k)}
    if changes:   # a PATCH that changes nothing is answered with the device as it is (idempotent)
        device = await authority.edit_device(device.id, changes, actor=op.actor)
    return web.json_response({"device": views.device_json(device, None)})


async def new_token(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    token = await request.app[AUTHORITY].registry.new_token(check_id(request.match_info["device_id"]), actor=op.actor)
    return web.json_response(_token_json(token))


async def decommission(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    revoked = await request.app[AUTHORITY].decommission(check_id(request.match_info["device_id"]), actor=op.actor)
    return web.json_response({"revoked": [serial_hex(s) for s in revoked]})


async def reject(request: web.Request) -> web.Response:
    op = _operator(request, "approval.decide")
    body = await _json_body(request)
    fingerprint = body.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise BadRequestError("field 'fingerprint' must be a string (or absent: every waiting key)")
    dropped = await request.app[AUTHORITY].reject_approval(check_id(request.match_info["device_id"]), fingerprint,
                                                           actor=op.actor)
    return web.json_response({"rejected": [r.fingerprint for r in dropped]})


async def list_certificates(request: web.Request) -> web.Response:
    _operator(request, "read")
    device = request.query.get("device")
    records = await request.app[AUTHORITY].certificates(check_id(device) if device is not None else None)
    return web.json_response({"certificates": [views.cert_json(r) for r in records]})


async def revoke(request: web.Request) -> web.Response:
    op = _operator(request, "cert.revoke")
    body = await _json_body(request)
    reason_name = body.get("reason", "unspecified")
    if not isinstance(reason_name, str):
        raise BadRequestError("field 'reason' must be a revocation reason such as keyCompromise")
    reason = RevocationReason.parse(reason_name)
    if reason is RevocationReason.certificateHold:   # a hold is its own action (cert.hold) and route
        raise BadRequestError("certificateHold is a hold, not a revocation: POST .../hold")
    serial = parse_serial(request.match_info["serial"])
    record = await request.app[AUTHORITY].revoke(serial, reason, actor=op.actor)
    return web.json_response({"certificate": views.cert_json(record)})


async def hold(request: web.Request) -> web.Response:
    op = _operator(request, "cert.hold")
    record = await request.app[AUTHORITY].hold(parse_serial(request.match_info["serial"]), actor=op.actor)
    return web.json_response({"certificate": views.cert_json(record)})


async def release(request: web.Request) -> web.Response:
    op = _operator(request, "cert.release")
    record = await request.app[AUTHORITY].release(parse_serial(request.match_info["serial"]), actor=op.actor)
    return web.json_response({"certificate": views.cert_json(record)})


async def list_approvals(request: web.Request) -> web.Response:
    _operator(request, "read")
    waiting = await request.app[AUTHORITY].pending_approvals()
    return web.json_response({"approvals": [views.approval_json(r) for r in waiting]})


async def approve(request: web.Request) -> web.Response:
    op = _operator(request, "approval.decide")
    body = await _json_body(request)
    fingerprint = body.get("fingerprint")
    if not isinstance(fingerprint, str):
        raise BadRequestError("field 'fingerprint' (the key's SHA-256, as GET /api/v1/approvals lists it) is required")
    device_id = check_id(request.match_info["device_id"])
    approved = await request.app[AUTHORITY].approve(device_id, fingerprint, actor=op.actor)
    return web.json_response({"device_id": device_id, "fingerprint": approved.fingerprint,
                              "key_type": approved.key_type})


AUDIT_FILTERS = (("device", "device_id"), ("actor", "actor"), ("action", "action"))


def audit_filter(request: web.Request, *, form: bool = False) -> dict[str, str]:
    """The store's filter from `device`, `actor` and `action` (each an exact match when given; in
    the console's `form`, an empty field is no filter)."""
    if "device" in request.query and (request.query["device"] or not form):   # the API: no device has id ""
        check_id(request.query["device"])
    return {attr: request.query[k] for k, attr in AUDIT_FILTERS if request.query.get(k)}


async def audit_page(request: web.Request, default_limit: int, *, form: bool = False
                     ) -> tuple[list, int, object, list[str]]:
    """(entries newest first, how many match, the chain's status, the actions in the log) for the
    filters and `limit` / `before` (an entry id: the page of older entries) of `request`."""
    authority = request.app[AUTHORITY]
    wanted = audit_filter(request, form=form)
    limit = _int(request, "limit", default_limit, MAX_PAGE)
    before = _int(request, "before", 0, 2 ** 62) or None
    chain = await authority.audit_chain.status(wait=CHAIN_WAIT)
    async with authority.store.read() as tx:
        rows = await tx.audit_entries(**wanted, before_id=before, limit=limit) if limit else []
        total = await tx.audit_count(**wanted)
        actions = await tx.audit_actions()
    return rows, total, chain, actions


async def audit(request: web.Request) -> web.Response:
    _operator(request, "read")
    rows, total, chain, _ = await audit_page(request, 100)
    return web.json_response({"entries": [views.audit_json(r) for r in rows], "total": total,
                              "chain": chain.json()})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/me", me)
    app.router.add_get("/api/v1/devices", list_devices)
    app.router.add_post("/api/v1/devices", register_device)
    app.router.add_get("/api/v1/devices/{device_id}", get_device)
    app.router.add_patch("/api/v1/devices/{device_id}", edit_device)
    app.router.add_post("/api/v1/devices/{device_id}/token", new_token)
    app.router.add_post("/api/v1/devices/{device_id}/decommission", decommission)
    app.router.add_post("/api/v1/devices/{device_id}/approve", approve)
    app.router.add_post("/api/v1/devices/{device_id}/reject", reject)
    app.router.add_get("/api/v1/certificates", list_certificates)
    app.router.add_post("/api/v1/certificates/{serial}/revoke", revoke)
    app.router.add_post("/api/v1/certificates/{serial}/hold", hold)
    app.router.add_post("/api/v1/certificates/{serial}/release", release)
    app.router.add_get("/api/v1/approvals", list_approvals)
    app.router.add_get("/api/v1/audit", audit)
