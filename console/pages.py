"""The console's pages: server-rendered HTML (console/templates), working without JavaScript.
A page shows only the actions the operator's role allows; the server checks the role again on
every request (console/api.py's `_operator`, the same rule table)."""
from __future__ import annotations

import csv
import io
import urllib.parse
from datetime import timedelta

from aiohttp import web

from ca import operators, views
from ca.errors import UnauthorizedError
from ca.timefmt import from_rfc3339
from common.ids import check_id

from . import api, auth, charts
from .state import AUTHORITY, OPERATOR, SESSION, TEMPLATES


ABSENCE_ACTIONS = frozenset({"device_absent_flagged", "certificate_held_absent", "device_returned"})


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
    """Counts, expiries and what needs attention, each counted by the store through an index
    (store/sqlite_reports.py): current (unexpired) certificates, not every one ever issued; the
    last 7 days of the audit log, per hour; the attendance entries, which are few."""
    api._operator(request, "read")
    authority = request.app[AUTHORITY]
    now = authority.now()
    since = now - timedelta(days=7)
    async with authority.store.read() as tx:
        device_status = await tx.device_status_counts()
        cert_status = await tx.current_status_counts(now)
        days, soon = await tx.expiry_summary(now, [now + timedelta(hours=24), now + timedelta(days=7)])
        holds = await tx.devices_on_hold(now)
        clones = await tx.clone_suspects()
        first = await tx.audit_first_id_at(since)
        hourly = await tx.audit_hourly(("certificate_issued", "certificate_renewed"), first)
        refusals = await tx.audit_rows(actions=("posture_refused",), after_id=first - 1)
        attendance = await tx.audit_rows(actions=ABSENCE_ACTIONS)
    waiting = [r for r in await authority.pending_approvals() if not r.approved]
    # device certificates only: service certificates (server, OCSP, evidence) are audited as issued too
    per_hour = {a: {from_rfc3339(f"{hour}:00:00Z"): n for (action, hour), n in hourly.items() if action == a}
                for a in ("certificate_issued", "certificate_renewed")}
    away: dict[str, bool] = {}   # each device's latest word on attendance, in the log's order
    for r in attendance:
        if r.device_id:
            away[r.device_id] = r.action != "device_returned"
    flagged = sorted(d for d, is_away in away.items() if is_away)
    refusals = [views.audit_json(r) for r in refusals if from_rfc3339(r.at) >= since]
    return render(request, "overview.html", holds=holds, flagged=flagged, refusals=refusals[-20:],
                  refusal_count=len(refusals),
                  expiry_chart=charts.expiry_chart({from_rfc3339(f"{d}T00:00:00Z"): n for d, n in days.items()}, now),
                  activity_chart=charts.activity_chart(per_hour["certificate_issued"],
                                                       per_hour["certificate_renewed"], now),
                  device_status=sorted(device_status.items()), cert_status=sorted(cert_status.items()),
                  expiring=dict(zip(("24 h", "7 d"), soon)), waiting=len(waiting), clones=clones,
                  total=sum(device_status.values()))


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
                  complete=chain.complete,
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
