"""Operator accounts through the admin API (ca/operators.py does the work and the audit):
`/api/v1/operators...` for admins (role `admin`, action `operator.manage`), and
`POST /api/v1/me/password` for any operator's own password.

A password the API makes (`"generate": true`, the default when none is given) is in that one
answer and nowhere else; a given password must meet the same rules as at the CLI. API token
secrets likewise appear once, in the answer that creates them; lists show ids and labels.
"""
from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from ca import operators, views
from ca.errors import BadRequestError
from ca.operators import DEFAULT_TOKEN_LIFETIME
from ca.timefmt import parse_duration

from . import auth
from .api import _json_body, _operator
from .state import AUTHORITY

ADD_FIELDS = ("name", "role", "password")
PATCH_FIELDS = ("role", "disabled")
TOKEN_FIELDS = ("label", "expires")


def _fields(body: dict, allowed: tuple[str, ...]) -> dict:
    unknown = set(body) - set(allowed)
    if unknown:
        raise BadRequestError(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(allowed)}")
    return body


def _string(body: dict, name: str, *, required: bool = False) -> str | None:
    if name not in body and not required:   # absent; an explicit null is no string
        return None
    value = body.get(name)
    if not isinstance(value, str):
        raise BadRequestError(f"field {name!r} must be a string" + (" and is required" if required else ""))
    return value


def _lifetime(text: str | None) -> timedelta:
    if text is None:
        return DEFAULT_TOKEN_LIFETIME
    try:
        return parse_duration(text)
    except BadRequestError:
        raise BadRequestError("field 'expires' must be a duration such as 30d or 90d, at most 365d") from None


def _name(request: web.Request) -> str:
    return operators.check_name(request.match_info["name"])


async def list_operators(request: web.Request) -> web.Response:
    _operator(request, "operator.manage")
    return web.json_response({"operators": [views.operator_json(o) for o in
                                            await request.app[AUTHORITY].operators.list()]})


async def add_operator(request: web.Request) -> web.Response:
    op = _operator(request, "operator.manage")
    body = _fields(await _json_body(request), ADD_FIELDS)
    name, role = _string(body, "name", required=True), _string(body, "role", required=True)
    given = _string(body, "password")
    password = given if given is not None else operators.generate_password()
    added = await request.app[AUTHORITY].operators.add(name, role, password, actor=op.actor)
    answer = {"operator": views.operator_json(added)}
    if given is None:
        answer["password"] = password   # shown once
    return web.json_response(answer, status=201)


async def get_operator(request: web.Request) -> web.Response:
    _operator(request, "operator.manage")
    ops = request.app[AUTHORITY].operators
    name = _name(request)
    account, tokens = await ops.get(name), await ops.api_tokens(name)
    now = request.app[AUTHORITY].now()
    return web.json_response({"operator": views.operator_json(account),
                              "tokens": [views.api_token_json(t, now) for t in tokens]})


async def edit_operator(request: web.Request) -> web.Response:
    """`{"role": ROLE}` and/or `{"disabled": true|false}`; the last enabled admin keeps both (409)."""
    op = _operator(request, "operator.manage")
    body = _fields(await _json_body(request), PATCH_FIELDS)
    if not body:
        raise BadRequestError(f"give at least one field to change: {', '.join(PATCH_FIELDS)}")
    role = _string(body, "role")
    disabled = body.get("disabled")
    if "disabled" in body and not isinstance(disabled, bool):
        raise BadRequestError("field 'disabled' must be true or false")
    ops, name = request.app[AUTHORITY].operators, _name(request)
    account = await ops.get(name)
    if role is not None:
        account = await ops.set_role(name, role, actor=op.actor)
    if disabled is True:
        account = await ops.disable(name, actor=op.actor)
    elif disabled is False:
        account = await ops.enable(name, actor=op.actor)
    return web.json_response({"operator": views.operator_json(account)})


async def set_password(request: web.Request) -> web.Response:
    """An admin sets another account's password (given, or generated and answered once)."""
    op = _operator(request, "operator.manage")
    body = _fields(await _json_body(request), ("password",))
    given = _string(body, "password")
    password = given if given is not None else operators.generate_password()
    await request.app[AUTHORITY].operators.set_password(_name(request), password, actor=op.actor)
    return web.json_response({"sessions_ended": True, **({"password": password} if given is None else {})})


async def new_token(request: web.Request) -> web.Response:
    op = _operator(request, "operator.manage")
    body = _fields(await _json_body(request), TOKEN_FIELDS)
    label, lifetime = _string(body, "label"), _lifetime(_string(body, "expires"))
    ops, name = request.app[AUTHORITY].operators, _name(request)
    made = await ops.new_api_token(name, lifetime=lifetime, actor=op.actor, label=label)
    return web.json_response({"id": made.id, "operator": name, "label": operators.check_label(label),
                              "token": made.secret, "expires_at": views.ts(made.expires_at)}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    op = _operator(request, "operator.manage")
    token_id = operators.parse_token_id(request.match_info["token_id"])
    await request.app[AUTHORITY].operators.revoke_api_token(_name(request), token_id, actor=op.actor)
    return web.json_response({"revoked": token_id})


async def own_password(request: web.Request) -> web.Response:
    """`{"current", "new"}`: any operator's own password; every session of the account ends
    (API tokens stay: revoke them apart)."""
    op = _operator(request, "read")
    body = _fields(await _json_body(request), ("current", "new"))
    current, new = _string(body, "current", required=True), _string(body, "new", required=True)
    await request.app[AUTHORITY].operators.change_own_password(op, current, new, source=auth.source(request))
    return web.json_response({"sessions_ended": True})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/operators", list_operators)
    app.router.add_post("/api/v1/operators", add_operator)
    app.router.add_get("/api/v1/operators/{name}", get_operator)
    app.router.add_patch("/api/v1/operators/{name}", edit_operator)
    app.router.add_post("/api/v1/operators/{name}/password", set_password)
    app.router.add_post("/api/v1/operators/{name}/tokens", new_token)
    app.router.add_delete("/api/v1/operators/{name}/tokens/{token_id}", revoke_token)
    app.router.add_post("/api/v1/me/password", own_password)
