"""The console's pages: server-rendered HTML (console/templates), working without JavaScript.
A page shows only the actions the operator's role allows; the server checks the role again on
every request (console/api.py's `_operator`, the same rule table)."""
from __future__ import annotations

from collections import Counter
from datetime import timedelta

from aiohttp import web

from ca import operators, views
from ca.audit import verify_chain
from ca.errors import UnauthorizedError
from common.ids import check_id

from . import api, auth
from .state import AUTHORITY, OPERATOR, SESSION, TEMPLATES


def render(request: web.Request, template: str, *, status: int = 200, **context) -> web.Response:
    op = request.get(OPERATOR)
    secret = request.get(SESSION)
    context.update(operator=op, csrf=auth.csrf_token(secret) if secret else "",
                   may=(lambda action: op is not None and operators.allowed(op.role, action)))
    body = request.app[TEMPLATES].get_template(template).render(**context)
    return web.Response(text=body, content_type="text/html", status=status)


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    return render(request, "error.html", status=status, status_code=status, message=message)


async def login_form(request: web.Request) -> web.Response:
    if request.get(OPERATOR) is not None:
        raise web.HTTPSeeOther("/")
    response = web.Response(content_type="text/html")
    nonce = auth.login_nonce(request, response)
    response.text = request.app[TEMPLATES].get_template("login.html").render(
        nonce=nonce, error=None, name="", operator=None, csrf="", may=lambda _: False)
    return response


async def login(request: web.Request) -> web.Response:
    form = await auth.read_form(request)
    auth.check_login_nonce(request, form.get("nonce"))
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    operators_ = request.app[AUTHORITY].operators
    try:
        op = await operators_.login(name, password, source=auth.source(request))
    except UnauthorizedError as exc:
        response = web.Response(content_type="text/html", status=401)
        nonce = auth.login_nonce(request, response)
        response.text = request.app[TEMPLATES].get_template("login.html").render(
            nonce=nonce, error=exc.message, name=name, operator=None, csrf="", may=lambda _: False)
        return response
    secret = await operators_.open_session(op, source=auth.source(request))
    response = web.HTTPSeeOther("/")
    auth.set_cookie(response, auth.SESSION_COOKIE, secret)
    auth.clear_cookie(response, auth.LOGIN_COOKIE)
    raise response


async def logout(request: web.Request) -> web.Response:
    secret = request.get(SESSION)
    if secret:   # its CSRF token was checked by auth.resolve
        await request.app[AUTHORITY].operators.close_session(secret)
    response = web.HTTPSeeOther("/login")
    auth.clear_cookie(response, auth.SESSION_COOKIE)
    raise response


async def overview(request: web.Request) -> web.Response:
    api._operator(request, "read")
    authority = request.app[AUTHORITY]
    devices = await authority.devices()
    certs = await authority.certificates()
    now = authority.now()
    current = {}
    for c in certs:
        if c.device_id and c.status.value == "good" and c.not_after > now:
            current[c.device_id] = max(current.get(c.device_id, c.not_after), c.not_after)
    soon = {label: sorted(d for d, t in current.items() if t <= now + delta)
            for label, delta in (("24 h", timedelta(hours=24)), ("7 d", timedelta(days=7)))}
    waiting = [r for r in await authority.pending_approvals() if not r.approved]
    return render(request, "overview.html",
                  device_status=sorted(Counter(d.status.value for d in devices).items()),
                  cert_status=sorted(Counter(c.status.value for c in certs if c.device_id).items()),
                  expiring=soon, waiting=len(waiting), clones=[d.id for d in devices if d.clone_suspected_at],
                  total=len(devices))


async def devices_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    rows, total = await api.device_rows(request)
    return render(request, "devices.html", rows=rows, total=total, query=request.query,
                  filters=api.DEVICE_FILTERS)


async def device_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    authority = request.app[AUTHORITY]
    device = await authority.registry.get(check_id(request.match_info["device_id"]))
    certs = await authority.certificates(device.id)
    current = max((c.not_after for c in certs if c.status.value == "good"), default=None)
    async with authority.store.read() as tx:
        entries = [views.audit_json(r) for r in await tx.audit_rows() if r.device_id == device.id]
    return render(request, "device.html", device=views.device_json(device, current),
                  certs=[views.cert_json(c) for c in certs], entries=list(reversed(entries[-50:])))


async def approvals_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    waiting = await request.app[AUTHORITY].pending_approvals()
    return render(request, "approvals.html", waiting=waiting, ts=views.ts)


async def audit_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    async with request.app[AUTHORITY].store.read() as tx:
        rows = await tx.audit_rows()
    problems = verify_chain(rows)
    return render(request, "audit.html", entries=[views.audit_json(r) for r in reversed(rows[-200:])],
                  intact=not problems, problems=problems[:10], head=rows[-1].hash if rows else None,
                  count=len(rows))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", overview)
    app.router.add_get("/devices", devices_page)
    app.router.add_get("/devices/{device_id}", device_page)
    app.router.add_get("/approvals", approvals_page)
    app.router.add_get("/audit", audit_page)
