"""`iomtca operator ...`: the operator accounts of the web console and the admin API (ca/operators.py).

A password never comes from the command line (where `ps` and shell history would show it): it is
asked twice at the terminal, read as one line from stdin (`--password-stdin`), or generated and
printed once (`--generate`). Every action is audited as the local CLI operator (`operator:USER`).
"""
from __future__ import annotations

import getpass
import json
import secrets
import string
import sys

from ca.authority import Authority
from ca.credentials import actor, operator
from ca.errors import BadRequestError
from ca.operators import DEFAULT_TOKEN_LIFETIME, ROLES, Operator, check_password
from ca.timefmt import format_duration, parse_duration, to_rfc3339

from .output import print_table

GENERATED_LENGTH = 20
_ALPHABET = string.ascii_letters + string.digits


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

    p = osub.add_parser("passwd", parents=[common], help="set an operator's password; its sessions end")
    p.add_argument("name", metavar="NAME")
    _password_options(p)
    p.set_defaults(func=passwd)

    p = osub.add_parser("token", parents=[common], help="make an API token for an operator (shown once)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--expires", default=format_duration(DEFAULT_TOKEN_LIFETIME), metavar="DURATION",
                   help=f"lifetime, e.g. 30d (default {format_duration(DEFAULT_TOKEN_LIFETIME)}, at most 365d)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=token)


def _password_options(p) -> None:
    how = p.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true",
                     help="read the password as one line from stdin (default: ask twice at the terminal)")
    how.add_argument("--generate", action="store_true", help="generate a password and print it once")


def _actor() -> str:
    return actor(operator())


def _password(args) -> tuple[str, bool]:
    """(password, generated) from stdin, a generator or the terminal; checked before the CA opens."""
    if args.generate:
        return "".join(secrets.choice(_ALPHABET) for _ in range(GENERATED_LENGTH)), True
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
    return {"name": o.name, "role": o.role, "disabled": o.disabled, "created_at": to_rfc3339(o.created_at),
            "password_changed_at": to_rfc3339(o.password_changed_at) if o.password_changed_at else None}


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
        secret, expires = await authority.operators.new_api_token(args.name, lifetime=lifetime, actor=_actor())
    if args.json:
        print(json.dumps({"operator": args.name, "token": secret, "expires_at": to_rfc3339(expires)}))
    else:
        print(f"API token of operator {args.name} (shown once, expires {to_rfc3339(expires)}):")
        print(secret)
    return 0
