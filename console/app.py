"""The console's aiohttp application: security headers, errors in the caller's terms, who is
asking (console/auth.py), then the admin API (console/api.py) and the pages (console/pages.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jinja2
from aiohttp import web

from ca.authority import Authority
from ca import metrics
from ca.errors import CAError, ConflictError, ForbiddenError, NotFoundError, UnauthorizedError, UnknownDeviceError
from enroll.config import EnrollConfig
from enroll.metrics import instrument
from enroll.middleware import HTTP_STATUS, body_deadline, route_of

from . import actions, api, auth, evidence_routes, operator_pages, operators_api, pages, sync
from .config import ConsoleConfig
from .state import AUTHORITY, CONSOLE_CONFIG, ENROLL_CONFIG, TEMPLATES

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# No inline script or style anywhere: everything the pages use comes from /static.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: under it a browser sends "Origin: null" with a form POST, which the CSRF check refuses
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=31536000",
}
MAX_BODY = 2 * 1024 * 1024   # a CSV import of a few thousand devices


def status_of(exc: CAError) -> int:
    """As the EST edge maps codes (enroll/middleware.py), but for logged-in operators: an unknown
    device or serial is 404 here (a stranger's unknown device id is a failed login there)."""
    if isinstance(exc, (NotFoundError, UnknownDeviceError)):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, ForbiddenError):
        return 403
    return HTTP_STATUS.get(exc.code, 500)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


@web.middleware
async def headers(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except CAError as exc:
        status = status_of(exc)
        metrics.refused(route_of(request), exc.code)
        log.info("console refused %s %s from %s: %s %s", request.method, request.path, request.remote,
                 exc.code, exc)
        if is_api(request):
            headers = {"WWW-Authenticate": 'Bearer realm="iomt-ca admin API"'} if status == 401 else {}
            if exc.retry_after is not None:
                headers["Retry-After"] = str(exc.retry_after)
            return web.json_response({"code": exc.code, "message": exc.message, "retry_after": exc.retry_after},
                                     status=status, headers=headers)
        if isinstance(exc, UnauthorizedError) and request.method == "GET" and request.path != "/login":
            raise web.HTTPSeeOther("/login")
        return pages.error_page(request, status, exc.message)
    except web.HTTPException as exc:
        if is_api(request) and exc.status >= 400:
            kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}   # 405's Allow
            return web.json_response({"code": "bad_request" if exc.status < 500 else "internal",
                                      "message": (exc.text or exc.reason).strip(), "retry_after": None},
                                     status=exc.status, headers=kept)
        raise
    except ConnectionResetError:   # the client left while its request was read (fuzz/wire.py saw it)
        log.info("client %s closed the connection during %s %s", request.remote, request.method, request.path)
        return web.Response(status=400, text="connection closed by the client\n", content_type="text/plain")
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        if is_api(request):
            return web.json_response({"code": "internal", "message": "internal error; see the server log",
                                      "retry_after": None}, status=500)
        return web.Response(status=500, text="internal error; see the server log\n", content_type="text/plain")


@web.middleware
async def authenticate(request: web.Request, handler):
    if not request.path.startswith("/static/"):
        await auth.resolve(request)
    return await handler(request)


def create_console_app(authority: Authority, config: ConsoleConfig, enroll_config: EnrollConfig) -> web.Application:
    # [enroll.connections] holds here too: the listener's timeouts and counts (enroll/server.py), the body deadline
    app = web.Application(middlewares=[instrument("console", edge="console", source=auth.source), headers, errors,
                                       body_deadline(enroll_config.connections.body_timeout), authenticate],
                          client_max_size=MAX_BODY)
    app[AUTHORITY] = authority
    app[CONSOLE_CONFIG] = config
    app[ENROLL_CONFIG] = enroll_config
    authority.operators.session_idle = config.session_idle
    authority.operators.session_max = config.session_max
    app[TEMPLATES] = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                                        undefined=jinja2.StrictUndefined)
    app[TEMPLATES].filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True)
    api.add_routes(app)
    operators_api.add_routes(app)
    sync.add_routes(app)
    evidence_routes.add_routes(app)
    pages.add_routes(app)
    actions.add_routes(app)
    operator_pages.add_routes(app)
    app.router.add_static("/static/", HERE / "static", show_index=False)
    return app
