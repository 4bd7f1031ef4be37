"""Who is asking, on the console's listener: an operator's session cookie (the console) or API
token (`Authorization: Bearer`, integrations), resolved by `ca/operators.py`; and the CSRF check
every state-changing request made with a cookie must pass.

- The session cookie is `__Host-iomt_session`: Secure, HttpOnly, SameSite=Strict, Path=/, no
  Domain (the `__Host-` prefix makes a browser refuse it otherwise). Its value is the session
  secret; the store keeps only its digest, and ends it after inactivity (ca/operators.py).
- CSRF: a form or a script posting with the cookie must carry the session's CSRF token (a
  digest of the session secret, so it needs no storage and dies with the session) in the field
  `csrf` or the header `X-CSRF-Token`; and a request whose Origin header names another origin is
  refused whatever it carries. The login form, before there is a session, uses a double-submit
  cookie (`__Host-iomt_login`).
- A bearer token needs no CSRF token: a browser never sends it by itself.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from aiohttp import web

from ca.errors import BadRequestError, UnauthorizedError
from enroll.identity import client_source

from .state import AUTHORITY, ENROLL_CONFIG, OPERATOR, SESSION

SESSION_COOKIE = "__Host-iomt_session"
LOGIN_COOKIE = "__Host-iomt_login"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def read_form(request: web.Request):
    """The posted form (urlencoded or multipart), or BadRequestError: aiohttp's parser raises
    UnicodeDecodeError and ValueError on bytes a browser never sends (found by fuzz/wire.py)."""
    try:
        return await request.post()
    except (UnicodeDecodeError, ValueError, AssertionError) as exc:
        raise BadRequestError(f"the form could not be read ({type(exc).__name__})") from None


def source(request: web.Request) -> str:
    """The caller's address for the login throttle: the peer, or behind `[enroll] trusted_proxies`
    the forwarded client (as on the EST listener)."""
    return client_source(request, request.app[ENROLL_CONFIG])


def csrf_token(session_secret: str) -> str:
    digest = hashlib.sha256(b"iomt-ca console csrf\0" + session_secret.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def set_cookie(response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(name, value, secure=True, httponly=True, samesite="Strict", path="/")


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path="/", secure=True, httponly=True, samesite="Strict")


def login_nonce(request: web.Request, response: web.StreamResponse) -> str:
    """The double-submit value of the login form: the cookie's, or a new one set on `response`."""
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not nonce or len(nonce) > 64:
        nonce = secrets.token_urlsafe(24)
        set_cookie(response, LOGIN_COOKIE, nonce)
    return nonce


def check_login_nonce(request: web.Request, submitted: str | None) -> None:
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not submitted or not hmac.compare_digest(cookie.encode(), submitted.encode()):
        raise BadRequestError("the login form expired; load it again")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or origin == "null" and request.method in SAFE_METHODS:
        return True
    return origin == f"{request.scheme}://{request.host}"


async def resolve(request: web.Request) -> None:
    """Put the authenticated operator (or nobody) on the request; refuse a bad token or session
    outright, and an unsafe cookie request without its CSRF token."""
    operators = request.app[AUTHORITY].operators
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise UnauthorizedError("use Authorization: Bearer with an operator API token (iomtca operator token)")
        request[OPERATOR] = await operators.bearer(value.strip(), source=source(request))
        return
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return
    try:
        request[OPERATOR] = await operators.session(secret)
    except UnauthorizedError:
        return   # an ended session: the caller is nobody (a page sends them to the login form)
    request[SESSION] = secret
    if request.method not in SAFE_METHODS:
        await check_csrf(request, secret)


async def check_csrf(request: web.Request, secret: str) -> None:
    if not _same_origin(request):
        raise BadRequestError("cross-origin request refused")
    submitted = request.headers.get(CSRF_HEADER)
    if submitted is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        submitted = (await read_form(request)).get("csrf")
    expected = csrf_token(secret)
    if not isinstance(submitted, str) or not hmac.compare_digest(submitted.encode(), expected.encode()):
        raise BadRequestError("missing or wrong CSRF token; reload the page and try again")
