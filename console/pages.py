"""The console's pages: server-rendered HTML (console/templates), working without JavaScript.
A page shows only the actions the operator's role allows; the server checks the role again on
every request (console/api.py's `_operator`, the same rule table)."""
from __future__ import annotations

import csv
import io
import urllib.parse
from collections import Counter
from datetime import timedelta

from aiohttp import web

from ca import operators, views
from ca.errors import UnauthorizedError
from ca.timefmt import from_rfc3339
from common.ids import check_id

from . import api, auth, charts
from .state import AUTHORITY, OPERATOR, SESSION, TEMPLATES


ABSENCE_ACTIONS = frozenset({"device_absent_flagged", "certificate_held_absent", "device_returned"})
OVERVIEW_ACTIONS = ABSENCE_ACTIONS | {"certificate_issued", "certificate_renewed", "posture_refused"}


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
    async with authority.store.read() as tx:
        rows = await tx.audit_rows(actions=OVERVIEW_ACTIONS)
    since = now - timedelta(days=7)
    # device certificates only: service certificates (server, OCSP, evidence) are audited as issued too
    issued = {a: [t for r in rows if r.action == a and r.device_id and (t := from_rfc3339(r.at)) >= since]
              for a in ("certificate_issued", "certificate_renewed")}
    holds = sorted({c.device_id for c in certs if c.device_id and c.status.value == "hold" and c.not_after > now})
    away: dict[str, bool] = {}   # each device's latest word on attendance, in the log's order
    for r in rows:
        if r.device_id and r.action in ABSENCE_ACTIONS:
            away[r.device_id] = r.action != "device_returned"
    flagged = sorted(d for d, is_away in away.items() if is_away)
    refusals = [views.audit_json(r) for r in rows if r.action == "posture_refused" and from_rfc3339(r.at) >= since]
    return render(request, "overview.html", holds=holds, flagged=flagged, refusals=refusals[-20:],
                  refusal_count=len(refusals),
                  expiry_chart=charts.expiry_chart(current.values(), now),
                  activity_chart=charts.activity_chart(issued["certificate_issued"], issued["certificate_renewed"], now),
                  device_status=sorted(Counter(d.status.value for d in devices).items()),
                  cert_status=sorted(Counter(c.status.value for c in certs if c.device_id).items()),
                  expiring=soon, waiting=len(waiting), clones=[d.id for d in devices if d.clone_suspected_at],
                  total=len(devices))


PAGE_SIZE = 50
CSV_FIELDS = ("device_id", "model", "owner", "location", "criticality", "status", "manufacturer", "serial_number",
              "udi_di", "udi_pi", "asset_tag", "firmware", "cert_not_after", "last_proven_contact",
              "reported_firmware", "reported_online_at")


def _query_without(query, *names: str) -> str:
    return urllib.parse.urlencode([(k, v) for k, v in query.items() if k not in names and v])


async def devices_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    query = request.query.copy()
    query.setdefault("limit", str(PAGE_SIZE))
    rows, total = await api.device_rows(request.clone(rel_url=request.rel_url.with_query(query)))
    offset, limit = int(query.get("offset", "0") or 0), int(query["limit"] or PAGE_SIZE)
    base = _query_without(query, "offset")
    pages = {"previous": f"?{base}&offset={max(offset - limit, 0)}" if offset > 0 else None,
             "next": f"?{base}&offset={offset + limit}" if offset + limit < total else None,
             "first": offset + 1 if rows else 0, "last": offset + len(rows)}
    return render(request, "devices.html", rows=rows, total=total, query=request.query, filters=api.DEVICE_FILTERS,
                  pages=pages, csv_query=_query_without(query, "offset", "limit"))


async def devices_csv(request: web.Request) -> web.Response:
    """The devices of the current filter as CSV (all of them, not one page)."""
    api._operator(request, "export")
    rows, _ = await api.device_rows(request, paged=False)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:   # a cell a spreadsheet would run as a formula is quoted
        writer.writerow({k: ("'" + v if isinstance(v, str) and v[:1] in "=+-@" else v) for k, v in row.items()})
    return web.Response(text=out.getvalue(), content_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="devices.csv"'})


async def device_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    authority = request.app[AUTHORITY]
    device = await authority.registry.get(check_id(request.match_info["device_id"]))
    certs = await authority.certificates(device.id)
    current = max((c.not_after for c in certs if c.status.value == "good"), default=None)
    async with authority.store.read() as tx:
        entries = [views.audit_json(r) for r in await tx.audit_rows(device_id=device.id)]
    shown = [views.cert_json(c) for c in certs]
    return render(request, "device.html", device=views.device_json(device, current), certs=shown,
                  timeline=charts.certificate_timeline(shown, authority.now()), entries=list(reversed(entries[-50:])))


async def approvals_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    waiting = await request.app[AUTHORITY].pending_approvals()
    return render(request, "approvals.html", waiting=waiting, ts=views.ts)


async def audit_page(request: web.Request) -> web.Response:
    api._operator(request, "read")
    rows, matched, chain, actions = await api.audit_page(request, 200, form=True)
    older = None
    if rows and len(rows) == api._int(request, "limit", 200, api.MAX_PAGE):   # a full page: there may be more
        kept = {k: v for k, v in request.query.items() if k in ("device", "actor", "action", "limit") and v}
        older = "/audit?" + urllib.parse.urlencode({**kept, "before": rows[-1].id})
    return render(request, "audit.html", entries=[views.audit_json(r) for r in rows], intact=chain.intact,
                  problems=chain.problems, head=chain.head, count=chain.entries, full_at=views.ts(chain.full_at),
                  matched=matched, shown=len(rows), older=older, query=request.query, actions=actions)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", overview)
    app.router.add_get("/devices", devices_page)
    app.router.add_get("/devices.csv", devices_csv)
    app.router.add_get("/devices/{device_id}", device_page)
    app.router.add_get("/approvals", approvals_page)
    app.router.add_get("/audit", audit_page)
