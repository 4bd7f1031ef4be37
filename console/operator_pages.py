"""The console's pages of operator accounts: the list and one account with its role, its
enabling, a new password and its API tokens (admin only), and every operator's own account,
where it changes its own password.

As in console/actions.py: a change is a POST carrying the session's CSRF token (checked by
console/auth.py before the handler runs), one that cannot be taken back goes through a
confirmation page first (console/templates/confirm.html), and the role is checked on the server
in every handler (`operator.manage`, console/api.py `_operator`), whatever the page showed. The
calls are those of `ca/operators.py`, with the logged-in operator as the audit actor. A password
or API token is generated here and shown once, on the page that made it; the store keeps only
its hash or digest.
"""
from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from ca import views
from ca.errors import BadRequestError, ConflictError, NotAcceptedError, NotFoundError, RateLimitedError
from ca.operators import ROLES, ApiToken, Operator, generate_password, parse_token_id

from . import auth
from .api import _operator
from .auth import read_form
from .pages import render
from .state import AUTHORITY, TEMPLATES

MANAGE = "operator.manage"
LIFETIMES = {"30d": timedelta(days=30), "90d": timedelta(days=90), "365d": timedelta(days=365)}
DEFAULT_LIFETIME = "90d"


async def _form(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in (await read_form(request)).items() if isinstance(v, str)}


def _confirmed(form: dict[str, str], what: str) -> None:
    if form.get("confirm") != "yes":
        raise BadRequestError(f"tick the confirmation box to {what}")


def _token_id(request: web.Request) -> int:
    text = request.match_info["token_id"]
    try:
        return parse_token_id(text)
    except BadRequestError:   # a page address that names no token: not found
        raise NotFoundError(f"no API token {text[:40]!r}") from None


def _ended(request: web.Request, template: str, *, status: int = 200, **context) -> web.Response:
    """A page for an operator whose own sessions just ended (this one too): no menu, no CSRF
    token, and the session cookie cleared, so the next click goes to the login form."""
    body = request.app[TEMPLATES].get_template(template).render(operator=None, csrf="", may=lambda _: False,
                                                                 **context)
    response = web.Response(text=body, content_type="text/html", status=status)
    auth.clear_cookie(response, auth.SESSION_COOKIE)
    return response


# -- the list ---------------------------------------------------------------------------------

def _list(request: web.Request, accounts: list[Operator], *, status: int = 200, error: str | None = None,
          values: dict | None = None) -> web.Response:
    return render(request, "operators.html", status=status, accounts=[views.operator_json(a) for a in accounts],
                  roles=ROLES, error=error, values=values or {})


async def operators_page(request: web.Request) -> web.Response:
    _operator(request, MANAGE)
    return _list(request, await request.app[AUTHORITY].operators.list())


async def add_operator(request: web.Request) -> web.Response:
    op = _operator(request, MANAGE)
    form = await _form(request)
    values = {"name": form.get("name", "").strip(), "role": form.get("role", "")}
    operators = request.app[AUTHORITY].operators
    password = generate_password()
    try:
        account = await operators.add(values["name"], values["role"], password, actor=op.actor)
    except (BadRequestError, ConflictError) as exc:   # the form again, with the reason
        return _list(request, await operators.list(), status=409 if isinstance(exc, ConflictError) else 400,
                     error=exc.message, values=values)
    return render(request, "operator_secret.html", title=f"Operator {account.name} added", name=account.name,
                  kind="password", secret=password, expires_at=None,
                  note=f"Give it to {account.name} ({account.role}) by a safe way; they log in with it and can "
                       "change it on their account page.")


# -- one account ------------------------------------------------------------------------------

async def operator_page(request: web.Request) -> web.Response:
    _operator(request, MANAGE)
    authority = request.app[AUTHORITY]
    account = await authority.operators.get(request.match_info["name"])
    now = authority.now()
    tokens = [views.api_token_json(t, now) for t in await authority.operators.api_tokens(account.name)]
    return render(request, "operator.html", account=views.operator_json(account), roles=ROLES, tokens=tokens,
                  lifetimes=list(LIFETIMES), default_lifetime=DEFAULT_LIFETIME)


async def set_role(request: web.Request) -> web.Response:
    op = _operator(request, MANAGE)
    name = request.match_info["name"]
    role = (await _form(request)).get("role", "")
    account = await request.app[AUTHORITY].operators.set_role(name, role, actor=op.actor)
    # an admin who gave itself a lesser role may no longer see the account page
    raise web.HTTPSeeOther("/account" if account.name == op.name and account.role != "admin"
                           else f"/operators/{account.name}")


async def disable_form(request: web.Request) -> web.Response:
    _operator(request, MANAGE)
    account = await request.app[AUTHORITY].operators.get(request.match_info["name"])
    return render(request, "confirm.html", title=f"Disable operator {account.name}",
                  action=f"/operators/{account.name}/disable",
                  warning="Its sessions and API tokens end at once and it can no longer log in. It can be "
                          "enabled again later (with its old password, but not its old API tokens).",
                  reasons=None, button="Disable")


async def disable(request: web.Request) -> web.Response:
    op = _operator(request, MANAGE)
    name = request.match_info["name"]
    _confirmed(await _form(request), "disable the operator")
    account = await request.app[AUTHORITY].operators.disable(name, actor=op.actor)
    raise web.HTTPSeeOther(f"/operators/{account.name}")


async def enable(request: web.Request) -> web.Response:
    op = _operator(request, MANAGE)
    account = await request.app[AUTHORITY].operators.enable(request.match_info["name"], actor=op.actor)
    raise web.HTTPSeeOther(f"/operators/{account.name}")


async def password_form(request: web.Request) -> web.Response:
    _operator(request, MANAGE)
    account = await request.app[AUTHORITY].operators.get(request.match_info["name"])
    return render(request, "confirm.html", title=f"Set a new password for {account.name}",
                  action=f"/operators/{account.name}/password",
                  warning="A new password is generated and shown once. The old one stops working and every "
                          "session of the account ends (its API tokens stay).", reasons=None,
                  button="Set a new password")


async def set_password(request: web.Request) -> web.Response:
    op = _operator(request, MANAGE)
    name = request.match_info["name"]
    _confirmed(await _form(request), "set a new password")
    password = generate_password()
    await request.app[AUTHORITY].operators.set_password(name, password, actor=op.actor)
    context = dict(title=f"New password of {name}", name=name, kind="password", secret=password, expires_at=None)
    if name == op.name:   # its own sessions ended with the change, this one too
        return _ended(request, "operator_secret.html", **context,
                      note="This was your own account: your session ended. Log in again with the new password.")
    return render(request, "operator_secret.html", **context,
                  note=f"The sessions of {name} ended; give them the new password by a safe way.")


async def new_api_token(request: web.Request) -> web.Response:
    op = _operator(request, MANAGE)
    name = request.match_info["name"]
    form = await _form(request)
    lifetime = form.get("lifetime", DEFAULT_LIFETIME)
    if lifetime not in LIFETIMES:
        raise BadRequestError(f"lifetime {lifetime[:20]!r} is not one of {', '.join(LIFETIMES)}")
    secret, expires, _ = await request.app[AUTHORITY].operators.new_api_token(
        name, lifetime=LIFETIMES[lifetime], actor=op.actor, label=form.get("label", "").strip() or None)
    return render(request, "operator_secret.html", title=f"New API token of {name}", name=name, kind="API token",
                  secret=secret, expires_at=views.ts(expires),
                  note="Send it as Authorization: Bearer; it acts with the role the account has at the time.")


async def _existing_token(request: web.Request) -> tuple[str, ApiToken]:
    name, token_id = request.match_info["name"], _token_id(request)
    for tok in await request.app[AUTHORITY].operators.api_tokens(name):
        if tok.id == token_id:
            return name, tok
    raise NotFoundError(f"operator {name} has no API token {token_id}")


async def revoke_token_form(request: web.Request) -> web.Response:
    _operator(request, MANAGE)
    name, tok = await _existing_token(request)
    shown = f" ({tok.label})" if tok.label else ""
    return render(request, "confirm.html", title=f"Revoke API token {tok.id}{shown} of {name}",
                  action=f"/operators/{name}/tokens/{tok.id}/revoke",
                  warning="The token stops working at once; a client that uses it needs a new one.",
                  reasons=None, button="Revoke")


async def revoke_token(request: web.Request) -> web.Response:
    op = _operator(request, MANAGE)
    name, token_id = request.match_info["name"], _token_id(request)
    _confirmed(await _form(request), "revoke the API token")
    await request.app[AUTHORITY].operators.revoke_api_token(name, token_id, actor=op.actor)
    raise web.HTTPSeeOther(f"/operators/{name}")


# -- one's own account ------------------------------------------------------------------------

async def account_page(request: web.Request) -> web.Response:
    op = _operator(request, "read")   # every role
    account = await request.app[AUTHORITY].operators.get(op.name)
    return render(request, "account.html", account=views.operator_json(account), error=None)


async def change_password(request: web.Request) -> web.Response:
    op = _operator(request, "read")
    form = await _form(request)
    current, new, again = form.get("current", ""), form.get("new", ""), form.get("again", "")
    operators = request.app[AUTHORITY].operators
    headers = {}
    if new != again:
        status, error = 400, "the new password and its repetition differ; nothing was changed"
    else:
        try:
            await operators.change_own_password(op, current, new, source=auth.source(request))
        except NotAcceptedError:   # counted as a failed login; 400, not 401: the session itself is good
            status, error = 400, "the current password is not right; nothing was changed"
        except BadRequestError as exc:
            status, error = 400, f"{exc.message}; nothing was changed"
        except RateLimitedError as exc:
            status, error = 429, exc.message
            if exc.retry_after is not None:
                headers["Retry-After"] = str(exc.retry_after)
        else:
            return _ended(request, "account_done.html", name=op.name)
    response = render(request, "account.html", status=status, account=views.operator_json(await operators.get(op.name)),
                      error=error)
    response.headers.update(headers)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/operators", operators_page)
    app.router.add_post("/operators", add_operator)
    app.router.add_get("/operators/{name}", operator_page)
    app.router.add_post("/operators/{name}/role", set_role)
    app.router.add_get("/operators/{name}/disable", disable_form)
    app.router.add_post("/operators/{name}/disable", disable)
    app.router.add_post("/operators/{name}/enable", enable)
    app.router.add_get("/operators/{name}/password", password_form)
    app.router.add_post("/operators/{name}/password", set_password)
    app.router.add_post("/operators/{name}/tokens", new_api_token)
    app.router.add_get("/operators/{name}/tokens/{token_id}/revoke", revoke_token_form)
    app.router.add_post("/operators/{name}/tokens/{token_id}/revoke", revoke_token)
    app.router.add_get("/account", account_page)
    app.router.add_post("/account", change_password)
