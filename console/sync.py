"""What a hospital's asset management system (CMMS) needs to stay in step with the registry:
a bulk upsert of devices (JSON or CSV) with one result per row, and a feed of changes since a
cursor (the audit log's entry ids, so the feed and the audit trail cannot disagree).

The request's shape is checked whole (a JSON list of objects of strings; a CSV with its header
row): a malformed request is a 400 and nothing is applied. Then upsert: a row naming an unregistered device registers it (its one-time token is in that row's
result, once); a row naming a registered device changes the editable fields whose value differs
(audited as `device_edited`, field by field); a row that changes nothing is `unchanged`. Rows
are independent: a bad row is reported and the others still apply, each in its own transaction.
"""
from __future__ import annotations

import csv
import io
import json

from aiohttp import web

from ca import views
from ca.assets import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, read_asset_csv
from ca.errors import BadRequestError, CAError
from ca.registry import EDITABLE, new_device
from ca.timefmt import to_rfc3339
from common.ids import check_id

from .api import MAX_PAGE, _int, _operator
from .state import AUTHORITY

MAX_ROWS = 5000
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# the audit actions a CMMS cares about: the registry and each device's certificates
FEED_ACTIONS = frozenset({"device_registered", "device_edited", "device_decommissioned", "device_absent_flagged",
                          "device_returned", "firmware_changed", "clone_suspected", "token_created",
                          "certificate_issued", "certificate_renewed", "certificate_revoked", "certificate_held_absent",
                          "certificate_released", "enroll_approved"})


def _rows_from_json(body: bytes) -> list[tuple[int, dict]]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("the body is not JSON") from None
    rows = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not 0 < len(rows) <= MAX_ROWS:
        raise BadRequestError(f"field 'devices' must be a list of 1 to {MAX_ROWS} objects")
    for i, row in enumerate(rows):   # the request's shape is checked whole; each row's content, row by row
        if not isinstance(row, dict) or not all(isinstance(v, str) for v in row.values()):
            raise BadRequestError(f"devices[{i}] must be an object of string fields; nothing was applied")
    return list(enumerate(rows))


async def _upsert_row(authority, row: object, existing: dict, actor: str) -> dict:
    if not isinstance(row, dict) or not all(isinstance(v, str) for v in row.values()):
        raise BadRequestError("a row must be an object of string fields")
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise BadRequestError(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(COLUMNS)}")
    values = {k: v.strip() for k, v in row.items()}
    device_id = check_id(values.pop("device_id", ""))
    current = existing.get(device_id)
    if current is None:   # registered with the registration rules (ca/registry.py new_device)
        missing = [f for f in ("model", "owner") if not values.get(f)]
        if missing:
            raise BadRequestError(f"device {device_id} is not registered; registering it needs {' and '.join(missing)}")
        token = await authority.registry.add(new_device(device_id, **values), actor=actor)
        return {"device_id": device_id, "status": "created", "token": token.secret,
                "token_expires_at": to_rfc3339(token.expires_at)}
    shown = views.editable_values(current)   # edited with the edit rules (Authority.edit_device)
    changes = {k: v for k, v in values.items() if k in EDITABLE and v != shown.get(k)}
    if not changes:
        return {"device_id": device_id, "status": "unchanged"}
    await authority.edit_device(device_id, changes, actor=actor)
    return {"device_id": device_id, "status": "updated", "changed": sorted(changes)}


async def bulk_upsert(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    body = await request.read()
    if request.content_type == "application/json":
        rows = _rows_from_json(body)
        by_line = False
    elif request.content_type == "text/csv":
        try:
            text = body.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadRequestError("the CSV is not UTF-8 text") from None
        parsed = read_asset_csv(text)
        if parsed.errors and not parsed.devices and parsed.errors[0].startswith("line 1"):
            raise BadRequestError(parsed.errors[0])
        reader = csv.DictReader(io.StringIO(text))
        reader.fieldnames = [h.strip() for h in (reader.fieldnames or [])]
        rows = [(reader.line_num, {k: (v or "") for k, v in r.items() if k in COLUMNS}) for r in reader]
        by_line = True
        if not 0 < len(rows) <= MAX_ROWS:
            raise BadRequestError(f"the CSV must have 1 to {MAX_ROWS} device rows")
    else:
        raise BadRequestError(f"Content-Type must be application/json or text/csv, not {request.content_type}")
    authority = request.app[AUTHORITY]
    existing = {d.id: d for d in await authority.devices()}
    results, seen = [], set()
    for where, row in rows:
        label = {"line": where} if by_line else {"index": where}
        try:
            if isinstance(row, dict) and row.get("device_id", "").strip() in seen:
                raise BadRequestError(f"device {row['device_id'].strip()} appears twice in this request")
            result = await _upsert_row(authority, row, existing, op.actor)
            seen.add(result["device_id"])
        except CAError as exc:
            result = {"status": "error", "code": exc.code, "message": exc.message}
        results.append({**label, **result})
    counts = {s: sum(r["status"] == s for r in results) for s in ("created", "updated", "unchanged", "error")}
    return web.json_response({"results": results, "counts": counts})


async def changes(request: web.Request) -> web.Response:
    _operator(request, "read")
    after = _int(request, "after", 0, 10**12)
    limit = _int(request, "limit", 100, MAX_PAGE) or 1
    async with request.app[AUTHORITY].store.read() as tx:
        rows = await tx.audit_rows(actions=FEED_ACTIONS, after_id=after)
    picked = rows[:limit]
    cursor = picked[-1].id if picked else after
    return web.json_response({"changes": [views.audit_json(r) for r in picked], "next": cursor,
                              "more": len(rows) > limit})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/bulk/devices", bulk_upsert)
    app.router.add_get("/api/v1/changes", changes)
