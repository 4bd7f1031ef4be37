"""The one map from CAError codes to HTTP answers, and the error middleware that applies it.

EST and the CRL/OCSP endpoints answer in plain text; the RA API (paths under /ra/) and the
device API (/iomt/) answer JSON `{"code": ..., "message": ...}` so callers can act on the code.
"""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from ca import metrics
from ca.errors import CAError

from .state import CONFIG

log = logging.getLogger(__name__)

HTTP_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "unknown_device": 401,       # an unknown Basic user is a failed login, as for any HTTP server
    "revoked": 403,
    "forbidden": 403,            # an operator whose role may not (console and admin API)
    "posture_noncompliant": 403,
    "policy_violation": 403,
    "rate_limited": 429,
    "unavailable": 503,
    "pending_approval": 202,     # RFC 7030 4.2.3: accepted, retry later
    "internal": 500,
}
REALM = 'Basic realm="iomt-ca EST", charset="UTF-8"'
JSON_PATHS = ("/ra/", "/iomt/")


def error_fields(exc: CAError) -> dict:
    """The JSON error body of the RA and device APIs (also each failed item of an RA batch)."""
    return {"code": exc.code, "message": exc.message, "retry_after": exc.retry_after}


def error_response(request: web.Request, exc: CAError) -> web.Response:
    status = HTTP_STATUS.get(exc.code, 500)
    # the core's code, for clients that act on it (the status alone conflates revoked and policy)
    headers = {"X-Error-Code": exc.code}
    if status == 401:
        headers["WWW-Authenticate"] = REALM
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if getattr(exc, "refused", None):   # whom the refusal is about, when not the request's subject
        headers["X-Refused"] = exc.refused
    if request.path.startswith(JSON_PATHS):
        body = json.dumps(error_fields(exc))
        return web.Response(status=status, text=body, content_type="application/json", headers=headers)
    return web.Response(status=status, text=exc.message + "\n", content_type="text/plain", headers=headers)


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except CAError as exc:
        log.info("refused %s %s from %s: %s %s", request.method, request.path, request.remote, exc.code, exc)
        metrics.refused(route_of(request), exc.code)
        return error_response(request, exc)
    except web.HTTPException as exc:
        if request.path.startswith(JSON_PATHS) and exc.status >= 400:
            # the RA API always answers JSON, whatever refused the request
            body = json.dumps({"code": "bad_request" if exc.status < 500 else "unavailable",
                               "message": (exc.text or exc.reason).strip(), "retry_after": None})
            return web.Response(status=exc.status, text=body, content_type="application/json")
        if exc.status == 413:  # aiohttp's body limit: say it in our words
            limit = request.app[CONFIG].max_body
            return web.Response(status=413, text=f"request body over the {limit}-byte limit\n",
                                content_type="text/plain")
        raise
    except ConnectionResetError:   # the client left while its request was read: nobody hears an answer
        log.info("client %s closed the connection during %s %s", request.remote, request.method, request.path)
        return web.Response(status=400, text="connection closed by the client\n", content_type="text/plain")
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.Response(status=500, text="internal error; see the server log\n", content_type="text/plain")


def route_of(request: web.Request) -> str:
    """The route's pattern (one label value per route, never the path itself)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class BodyTimeout(TimeoutError):
    """The request body did not arrive within `body_timeout` of its headers ([enroll.connections]).
    A TimeoutError: aiohttp's lingering read after the answer takes it as its own deadline and
    closes the connection, where any other exception would be logged as unhandled."""


def body_deadline(timeout: float):
    """Middleware (inside `errors`): a body still incomplete `timeout` seconds after the headers fails
    its reader with BodyTimeout, answered 408 with the connection closed. Handlers read as usual."""

    @web.middleware
    async def deadline(request: web.Request, handler):
        content = request.content
        if not request.body_exists or content.is_eof():
            return await handler(request)
        timer = asyncio.get_running_loop().call_later(
            timeout, lambda: content.is_eof() or content.set_exception(BodyTimeout()))
        content.on_eof(timer.cancel)
        try:
            return await handler(request)
        except BodyTimeout:
            log.info("request body from %s not complete within %.0f s: answered 408", request.remote, timeout)
            message = f"request body not received within {timeout:.0f} s"
            if request.path.startswith(JSON_PATHS):
                response = web.Response(status=408, content_type="application/json", text=json.dumps(
                    {"code": "bad_request", "message": message, "retry_after": None}))
            else:
                response = web.Response(status=408, text=message + "\n", content_type="text/plain")
            response.force_close()
            return response
        finally:
            timer.cancel()

    return deadline
