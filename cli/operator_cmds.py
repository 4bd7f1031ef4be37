"""`iomtca operator ...`: the operator accounts of the web console and the admin API (ca/operators.py).

A password never comes from the command line (where `ps` and shell history would show it): it is
asked twice at the terminal, read as one line from stdin (`--password-stdin`), or generated and
printed once (`--generate`). Every action is audited as the local CLI operator (`operator:USER`).
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import datetime

from ca.authority import Authority
from ca.credentials import actor, operator
from ca.errors import BadRequestError
from ca import views
from ca.operators import (DEFAULT_TOKEN_LIFETIME, LABEL_MAX, ROLES, ApiToken, Operator, check_password,
                          generate_password, parse_token_id)
from ca.timefmt import format_duration, parse_duration, to_rfc3339

from .output import print_table



def add_parsers(sub, common) -> None:
    op = sub.add_parser("operator", help="operator accounts of the web console and the admin API")
    osub = op.add_subparsers(dest="operator_command", required=True, metavar="ACTION")

    p = osub.add_parser("add", parents=[common], help="add an operator account with a role")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", required=True, choices=ROLES,
                   help="auditor (read, export) < engineer (devices) < security (revoke, hold, approve) < admin")
    _password_options(p)
    p.set_defaults(func=add)

    p = osub.add_parser("list", parents=[common], help="list operator accounts (never their passwords)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_operators)

    p = osub.add_parser("disable", parents=[common], help="disable an account; its sessions and API tokens end")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=disable)

    p = osub.add_parser("enable", parents=[common],
                        help="enable a disabled account again, with its old password (its ended tokens stay ended)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=enable)

    p = osub.add_parser("role", parents=[common], help="give an account another role, from its next request on")
    p.add_argument("name", metavar="NAME")
    p.add_argument("role", metavar="ROLE", choices=ROLES, help=f"one of {', '.join(ROLES)}")
    p.set_defaults(func=set_role)

    p = osub.add_parser("passwd", parents=[common], help="set an operator's password; its sessions end")
    p.add_argument("name", metavar="NAME")
    _password_options(p)
    p.set_defaults(func=passwd)

    p = osub.add_parser("token", parents=[common], help="make an API token for an operator (shown once)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--expires", default=format_duration(DEFAULT_TOKEN_LIFETIME), metavar="DURATION",
                   help=f"lifetime, e.g. 30d (default {format_duration(DEFAULT_TOKEN_LIFETIME)}, at most 365d)")
    p.add_argument("--label", metavar="TEXT", help=f"what the token is for (up to {LABEL_MAX} printable characters)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=token)

    p = osub.add_parser("tokens", parents=[common], help="list an operator's API tokens (never their secrets)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_tokens)

    p = osub.add_parser("revoke-token", parents=[common], help="end one API token of an operator at once")
    p.add_argument("name", metavar="NAME")
    p.add_argument("token_id", metavar="ID", type=_token_id, help="the token's id, as `operator tokens` lists it")
    p.set_defaults(func=revoke_token)


def _password_options(p) -> None:
    how = p.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true",
                     help="read the password as one line from stdin (default: ask twice at the terminal)")
    how.add_argument("--generate", action="store_true", help="generate a password and print it once")


def _token_id(text: str) -> int:
    try:
        return parse_token_id(text)
    except BadRequestError:
        raise argparse.ArgumentTypeError(f"not a token id: {text[:40]!r} (use the ID `operator tokens` lists)") from None


def _actor() -> str:
    return actor(operator())


def _password(args) -> tuple[str, bool]:
    """(password, generated) from stdin, a generator or the terminal; checked before the CA opens."""
    if args.generate:
        return generate_password(), True
    if args.password_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    elif not sys.stdin.isatty():
        raise BadRequestError("no terminal to ask for the password: use --password-stdin or --generate")
    else:
        password = getpass.getpass(f"password for operator {args.name}: ")
        check_password(password)
        if getpass.getpass("the same password again: ") != password:
            raise BadRequestError("the two passwords differ; nothing changed")
    check_password(password)
    return password, False


def _print_generated(name: str, password: str) -> None:
    print(f"generated password for operator {name} (shown once):")
    print(password)


async def add(args) -> int:
    password, generated = _password(args)
    async with await Authority.open(args.dir) as authority:
        added = await authority.operators.add(args.name, args.role, password, actor=_actor())
    print(f"added operator {added.name} with role {added.role}")
    if generated:
        _print_generated(added.name, password)
    return 0


def _row(o: Operator) -> dict:
    return views.operator_json(o)


async def list_operators(args) -> int:
    async with await Authority.open(args.dir) as authority:
        rows = [_row(o) for o in await authority.operators.list()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table([{**r, "disabled": "yes" if r["disabled"] else "no"} for r in rows],
                    ["name", "role", "disabled", "created_at", "password_changed_at"])
    return 0


async def disable(args) -> int:
    async with await Authority.open(args.dir) as authority:
        disabled = await authority.operators.disable(args.name, actor=_actor())
    print(f"disabled operator {disabled.name}; its sessions and API tokens ended")
    return 0


async def enable(args) -> int:
    async with await Authority.open(args.dir) as authority:
        enabled = await authority.operators.enable(args.name, actor=_actor())
    print(f"enabled operator {enabled.name}; it logs in with its old password")
    return 0


async def set_role(args) -> int:
    async with await Authority.open(args.dir) as authority:
        changed = await authority.operators.set_role(args.name, args.role, actor=_actor())
    print(f"operator {changed.name} has role {changed.role}")
    return 0


async def passwd(args) -> int:
    password, generated = _password(args)
    async with await Authority.open(args.dir) as authority:
        await authority.operators.set_password(args.name, password, actor=_actor())
    print(f"changed the password of operator {args.name}; its sessions ended")
    if generated:
        _print_generated(args.name, password)
    return 0


async def token(args) -> int:
    lifetime = parse_duration(args.expires)
    async with await Authority.open(args.dir) as authority:
        secret, expires, token_id = await authority.operators.new_api_token(
            args.name, lifetime=lifetime, actor=_actor(), label=args.label)
    label = args.label or None
    if args.json:
        print(json.dumps({"operator": args.name, "id": token_id, "token": secret, "label": label,
                          "expires_at": to_rfc3339(expires)}))
    else:
        labelled = f" {label!r}" if label else ""
        print(f"API token {token_id}{labelled} of operator {args.name} (shown once, expires {to_rfc3339(expires)}):")
        print(secret)
    return 0


def _token_row(t: ApiToken, now: datetime) -> dict:
    return {k: v for k, v in views.api_token_json(t, now).items() if k != "operator"}


async def list_tokens(args) -> int:
    async with await Authority.open(args.dir) as authority:
        now = authority.now()
        rows = [_token_row(t, now) for t in await authority.operators.api_tokens(args.name)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table([{**r, "expired": "yes" if r["expired"] else "no"} for r in rows],
                    ["id", "label", "created_at", "created_by", "expires_at", "expired"])
    return 0


async def revoke_token(args) -> int:
    async with await Authority.open(args.dir) as authority:
        await authority.operators.revoke_api_token(args.name, args.token_id, actor=_actor())
    print(f"revoked API token {args.token_id} of operator {args.name}")
    return 0
