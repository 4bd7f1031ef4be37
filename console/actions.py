"""The console's forms that change something: onboarding (one device, or a CSV with a preview),
editing, new tokens, decommissioning, revoking, holding and releasing certificates, approving
and rejecting waiting enrollments.

Every change is two steps: a GET that shows what will happen (a form, or a confirmation page with
the reason to give), and a POST that does it, carrying the session's CSRF token (checked by
console/auth.py before the handler runs). The role is checked on both steps (console/api.py
`_operator`), whatever the page showed. A one-time token is shown once, on the page that made
it, with its QR code (segno, an SVG data URI: the CSP allows images from data:, no script).
"""
from __future__ import annotations

import segno
from aiohttp import web

from ca import views
from ca.assets import read_asset_csv
from ca.errors import BadRequestError
from ca.model import RevocationReason, Token, parse_serial, serial_hex
from ca.registry import EDITABLE, new_device
from ca.timefmt import to_rfc3339
from common.ids import check_id

from .api import _operator
from .auth import read_form
from .pages import render
from .state import AUTHORITY

DEVICE_FIELDS = ("device_id", "model", "owner", "location", "criticality", "firmware", "manufacturer",
                 "serial_number", "udi", "asset_tag")
CERT_ACTIONS = {"revoke": "cert.revoke", "hold": "cert.hold", "release": "cert.release"}
REASONS = [r.name for r in RevocationReason if r not in (RevocationReason.removeFromCRL,
                                                         RevocationReason.certificateHold)]
MAX_CSV = 2 * 1024 * 1024


async def _form(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in (await read_form(request)).items() if isinstance(v, str)}


def _token_view(tok: Token) -> dict:
    return {"device_id": tok.device_id, "secret": tok.secret, "expires_at": to_rfc3339(tok.expires_at),
            "qr": segno.make(tok.secret, error="m").svg_data_uri(scale=4, border=2)}


# -- onboarding ---------------------------------------------------------------------------------

async def onboard_form(request: web.Request) -> web.Response:
    _operator(request, "device.write")
    return render(request, "onboard.html", values={}, error=None, fields=DEVICE_FIELDS)


async def onboard(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    values = {k: v.strip() for k, v in (await _form(request)).items() if k in DEVICE_FIELDS}
    try:
        device = new_device(values.get("device_id", ""), **{k: v for k, v in values.items() if k != "device_id"})
        token = await request.app[AUTHORITY].registry.add(device, actor=op.actor)
    except BadRequestError as exc:
        return render(request, "onboard.html", status=400, values=values, error=exc.message, fields=DEVICE_FIELDS)
    return render(request, "token.html", tokens=[_token_view(token)], what="registered")


async def import_form(request: web.Request) -> web.Response:
    _operator(request, "device.write")
    return render(request, "import.html", preview=None, errors=[], csv_text="", ignored=[])


async def import_csv(request: web.Request) -> web.Response:
    """First POST: the preview (every row checked, errors by line, nothing written). Second POST
    (`confirm`): the same text again, imported all or nothing, the tokens shown once."""
    op = _operator(request, "device.write")
    form = await read_form(request)
    upload = form.get("file")
    # a chosen file is a FileField; an empty file input arrives as bytes without a name
    raw = upload.file.read(MAX_CSV + 1) if isinstance(upload, web.FileField) else b""
    if raw:
        if len(raw) > MAX_CSV:
            raise BadRequestError(f"the file is over {MAX_CSV} bytes")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadRequestError("the file is not UTF-8 text") from None
    else:
        text = str(form.get("csv_text", ""))
    assets = read_asset_csv(text)
    authority = request.app[AUTHORITY]
    existing = {d.id for d in await authority.devices()}
    errors = assets.errors + [f"device {d.id} is already registered" for d in assets.devices if d.id in existing]
    if errors or not form.get("confirm"):
        return render(request, "import.html", status=400 if errors else 200, errors=errors, csv_text=text,
                      preview=[views.device_json(d, None) for d in assets.devices], ignored=assets.ignored_columns)
    tokens = await authority.registry.add_many(assets.devices, actor=op.actor)
    return render(request, "token.html", tokens=[_token_view(t) for t in tokens], what="imported")


# -- one device ---------------------------------------------------------------------------------

def _device_id(request: web.Request) -> str:
    return check_id(request.match_info["device_id"])


async def edit_form(request: web.Request) -> web.Response:
    _operator(request, "device.write")
    device = await request.app[AUTHORITY].registry.get(_device_id(request))
    values = views.editable_values(device)
    return render(request, "edit.html", device_id=device.id, values=values, fields=EDITABLE, error=None)


async def edit(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    authority = request.app[AUTHORITY]
    device = await authority.registry.get(_device_id(request))
    form = await _form(request)
    current = views.editable_values(device)
    changes = {k: form[k].strip() for k in EDITABLE if k in form and form[k].strip() != (current.get(k) or "")}
    try:
        await authority.edit_device(device.id, changes, actor=op.actor)
    except BadRequestError as exc:
        return render(request, "edit.html", status=400, device_id=device.id, values={**current, **form},
                      fields=EDITABLE, error=exc.message)
    raise web.HTTPSeeOther(f"/devices/{device.id}")


async def new_token(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    token = await request.app[AUTHORITY].registry.new_token(_device_id(request), actor=op.actor)
    return render(request, "token.html", tokens=[_token_view(token)], what="issued a new token for")


async def decommission_form(request: web.Request) -> web.Response:
    _operator(request, "device.write")
    device = await request.app[AUTHORITY].registry.get(_device_id(request))
    return render(request, "confirm.html", title=f"Decommission {device.id}", action=f"/devices/{device.id}/decommission",
                  warning="Its live certificates are revoked (cessationOfOperation) and its tokens burned. "
                          "This cannot be undone.", reasons=None, button="Decommission")


async def decommission(request: web.Request) -> web.Response:
    op = _operator(request, "device.write")
    form = await _form(request)
    device_id = _device_id(request)
    if form.get("confirm") != "yes":
        raise BadRequestError("tick the confirmation box to decommission")
    await request.app[AUTHORITY].decommission(device_id, actor=op.actor)
    raise web.HTTPSeeOther(f"/devices/{device_id}")


# -- certificates and approvals -----------------------------------------------------------------

def _cert_action(request: web.Request) -> tuple[str, int]:
    action = request.match_info["action"]
    if action not in CERT_ACTIONS:
        raise web.HTTPNotFound(text="no such action\n")
    return action, parse_serial(request.match_info["serial"])


async def cert_action_form(request: web.Request) -> web.Response:
    action, serial = _cert_action(request)
    _operator(request, CERT_ACTIONS[action])
    record = await request.app[AUTHORITY].certificate(serial)
    warning = {"revoke": "Revocation is final: the certificate can never be used again.",
               "hold": "The certificate is suspended until someone with the security role releases it.",
               "release": "The hold is lifted and the certificate is good again."}[action]
    return render(request, "confirm.html", title=f"{action.capitalize()} certificate {serial_hex(serial)}"
                  f" of {record.device_id or '-'}", action=f"/certificates/{serial_hex(serial)}/{action}",
                  warning=warning, reasons=REASONS if action == "revoke" else None, button=action.capitalize())


async def cert_action(request: web.Request) -> web.Response:
    action, serial = _cert_action(request)
    op = _operator(request, CERT_ACTIONS[action])
    form = await _form(request)
    if form.get("confirm") != "yes":
        raise BadRequestError(f"tick the confirmation box to {action}")
    authority = request.app[AUTHORITY]
    if action == "revoke":
        record = await authority.revoke(serial, RevocationReason.parse(form.get("reason", "unspecified")),
                                        actor=op.actor)
    elif action == "hold":
        record = await authority.hold(serial, actor=op.actor)
    else:
        record = await authority.release(serial, actor=op.actor)
    raise web.HTTPSeeOther(f"/devices/{record.device_id}" if record.device_id else "/")


async def decide(request: web.Request) -> web.Response:
    op = _operator(request, "approval.decide")
    device_id = _device_id(request)
    fingerprint = (await _form(request)).get("fingerprint", "")
    authority = request.app[AUTHORITY]
    if request.match_info["decision"] == "approve":
        await authority.approve(device_id, fingerprint, actor=op.actor)
    else:
        await authority.reject_approval(device_id, fingerprint, actor=op.actor)
    raise web.HTTPSeeOther("/approvals")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/onboard", onboard_form)
    app.router.add_post("/onboard", onboard)
    app.router.add_get("/import", import_form)
    app.router.add_post("/import", import_csv)
    app.router.add_get("/devices/{device_id}/edit", edit_form)
    app.router.add_post("/devices/{device_id}/edit", edit)
    app.router.add_post("/devices/{device_id}/token", new_token)
    app.router.add_get("/devices/{device_id}/decommission", decommission_form)
    app.router.add_post("/devices/{device_id}/decommission", decommission)
    app.router.add_get("/certificates/{serial}/{action}", cert_action_form)
    app.router.add_post("/certificates/{serial}/{action}", cert_action)
    app.router.add_post("/approvals/{device_id}/{decision:approve|reject}", decide)
