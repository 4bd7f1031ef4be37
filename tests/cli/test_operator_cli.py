"""`iomtca operator ...` as an admin runs it: the real console script in a subprocess, against a CA
directory made by `iomtca init`; what it wrote is then checked through ca/operators.py."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from datetime import timedelta

import pytest

from ca.authority import Authority
from ca.credentials import operator
from ca.errors import NotAcceptedError
from ca.timefmt import from_rfc3339
from tests.cli.test_cli import IOMTCA, one_line_error, run

PASSWORD = "correct horse battery"
NEW_PASSWORD = "another long passphrase"
SOURCE = "192.0.2.10"


def with_stdin(home, stdin: str, *args, ok=True):
    """`iomtca ARGS --dir HOME` with `stdin` as its standard input (test_cli.run gives none)."""
    env = {k: v for k, v in os.environ.items() if k not in ("IOMTCA_PASSPHRASE", "IOMTCA_HOME")}
    proc = subprocess.run([IOMTCA, *args, "--dir", str(home)], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 or not ok, proc.stderr
    return proc


def add(home, name, role, *extra, password=PASSWORD, ok=True):
    return with_stdin(home, password + "\n", "operator", "add", name, "--role", role, *extra, ok=ok)


def listed(home) -> dict[str, dict]:
    return {o["name"]: o for o in json.loads(run("operator", "list", "--json", home=home).stdout)}


async def login(home, name, password):
    async with await Authority.open(home) as authority:
        return await authority.operators.login(name, password, source=SOURCE)


async def test_add_from_stdin_list_and_audit(ca_home):
    out = add(ca_home, "alice", "security", "--password-stdin")
    assert "added operator alice with role security" in out.stdout and PASSWORD not in out.stdout + out.stderr
    alice = listed(ca_home)["alice"]
    assert set(alice) == {"name", "role", "disabled", "created_at", "password_changed_at"}   # no hash
    assert (alice["role"], alice["disabled"], alice["password_changed_at"]) == ("security", False, None)
    assert (await login(ca_home, "alice", PASSWORD)).role == "security"
    table = run("operator", "list", home=ca_home).stdout
    assert table.splitlines()[0].split() == ["NAME", "ROLE", "DISABLED", "CREATED_AT", "PASSWORD_CHANGED_AT"]
    conn = sqlite3.connect(ca_home / "iomtca.db")
    [(stored,)] = conn.execute("SELECT password_hash FROM operators WHERE name = 'alice'").fetchall()
    [(who, detail)] = conn.execute("SELECT actor, detail FROM audit_log WHERE action = 'operator_added'").fetchall()
    conn.close()
    assert stored.startswith("scrypt$32768$8$1$") and PASSWORD not in stored
    assert who == f"operator:{operator().name}" and json.loads(detail) == {"operator": "alice", "role": "security"}


def test_refusals_are_one_line(ca_home):
    one_line_error(add(ca_home, "bob", "admin", "--password-stdin", password="short", ok=False), "at least 12")
    one_line_error(with_stdin(ca_home, "", "operator", "add", "bob", "--role", "admin", ok=False),
                   "use --password-stdin or --generate")   # no terminal: not read from a pipe unasked
    add(ca_home, "bob", "admin", "--password-stdin")
    one_line_error(add(ca_home, "bob", "admin", "--password-stdin", ok=False), "already exists")
    one_line_error(add(ca_home, "Bob!", "admin", "--password-stdin", ok=False), "invalid operator name")
    one_line_error(run("operator", "disable", "ghost", home=ca_home, ok=False), "no operator 'ghost'")
    one_line_error(run("operator", "token", "bob", "--expires", "400d", home=ca_home, ok=False), "at most 365 days")


def test_a_password_is_never_a_command_line_argument(ca_home):
    """What `ps` shows is argv: there is no option that would put a password there."""
    proc = run("operator", "add", "carol", "--role", "admin", "--password", PASSWORD, home=ca_home, ok=False)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    proc = run("operator", "passwd", "carol", PASSWORD, home=ca_home, ok=False)
    assert proc.returncode == 2
    assert "carol" not in listed(ca_home)
    for action in ("add", "passwd"):
        usage = run("operator", action, "--help").stdout
        assert "--password-stdin" in usage and "--password " not in usage and "PASSWORD" not in usage


async def test_generate_prints_a_password_once_that_logs_in(ca_home):
    out = run("operator", "add", "dave", "--role", "engineer", "--generate", home=ca_home).stdout.splitlines()
    assert out[1] == "generated password for operator dave (shown once):"
    generated = out[2]
    assert len(generated) == 20 and generated.isalnum()
    assert (await login(ca_home, "dave", generated)).name == "dave"
    again = run("operator", "passwd", "dave", "--generate", home=ca_home).stdout.splitlines()[-1]
    assert again != generated and (await login(ca_home, "dave", again)).name == "dave"


async def test_passwd_disable_and_token(ca_home):
    add(ca_home, "erin", "auditor", "--password-stdin")
    with_stdin(ca_home, NEW_PASSWORD + "\n", "operator", "passwd", "erin", "--password-stdin")
    assert listed(ca_home)["erin"]["password_changed_at"] is not None
    with pytest.raises(NotAcceptedError):
        await login(ca_home, "erin", PASSWORD)
    assert (await login(ca_home, "erin", NEW_PASSWORD)).name == "erin"

    made = json.loads(run("operator", "token", "erin", "--expires", "30d", "--json", home=ca_home).stdout)
    assert set(made) == {"operator", "token", "expires_at"} and made["token"].startswith("iomtop_")
    async with await Authority.open(ca_home) as authority:
        assert (await authority.operators.bearer(made["token"], source=SOURCE)).name == "erin"
        created = (await authority.operators.get("erin")).created_at
    assert timedelta(days=29) < from_rfc3339(made["expires_at"]) - created <= timedelta(days=30, minutes=5)
    plain = run("operator", "token", "erin", home=ca_home).stdout.splitlines()
    assert "shown once" in plain[0] and plain[1].startswith("iomtop_")

    assert "disabled operator erin" in run("operator", "disable", "erin", home=ca_home).stdout
    assert listed(ca_home)["erin"]["disabled"] is True
    async with await Authority.open(ca_home) as authority:
        with pytest.raises(NotAcceptedError):
            await authority.operators.bearer(made["token"], source=SOURCE)
    one_line_error(run("operator", "token", "erin", home=ca_home, ok=False), "disabled")
    conn = sqlite3.connect(ca_home / "iomtca.db")
    actions = [r[0] for r in conn.execute("SELECT action FROM audit_log WHERE action LIKE 'operator_%' ORDER BY id")]
    conn.close()
    assert actions == ["operator_added", "operator_password_changed", "operator_login", "operator_token_created",
                       "operator_token_created", "operator_disabled"]
