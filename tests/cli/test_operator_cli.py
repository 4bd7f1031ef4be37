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
from ca.timefmt import from_rfc3339, utc_now
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
    assert set(made) == {"operator", "id", "token", "label", "expires_at"} and made["token"].startswith("iomtop_")
    assert made["label"] is None
    assert [t["id"] for t in json.loads(run("operator", "tokens", "erin", "--json", home=ca_home).stdout)] == [made["id"]]
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


def audited(home, like: str) -> list[tuple[str, dict]]:
    conn = sqlite3.connect(home / "iomtca.db")
    rows = conn.execute("SELECT action, detail FROM audit_log WHERE action LIKE ? ORDER BY id", (like,)).fetchall()
    conn.close()
    return [(action, json.loads(detail) if detail else None) for action, detail in rows]


async def test_enable_lets_a_disabled_account_log_in_again(ca_home):
    add(ca_home, "admin1", "admin", "--password-stdin")
    add(ca_home, "frank", "engineer", "--password-stdin")
    made = json.loads(run("operator", "token", "frank", "--json", home=ca_home).stdout)["token"]
    run("operator", "disable", "frank", home=ca_home)
    with pytest.raises(NotAcceptedError):
        await login(ca_home, "frank", PASSWORD)

    out = run("operator", "enable", "frank", home=ca_home)
    assert "enabled operator frank" in out.stdout
    assert listed(ca_home)["frank"]["disabled"] is False
    assert (await login(ca_home, "frank", PASSWORD)).role == "engineer"   # the old password
    async with await Authority.open(ca_home) as authority:
        with pytest.raises(NotAcceptedError):   # ended with the disabling, and stays ended
            await authority.operators.bearer(made, source=SOURCE)
    run("operator", "enable", "frank", home=ca_home)   # already enabled: no error, no second audit row
    assert audited(ca_home, "operator_enabled") == [("operator_enabled", {"operator": "frank"})]
    one_line_error(run("operator", "enable", "ghost", home=ca_home, ok=False), "no operator 'ghost'")


async def test_role_change_shows_in_list_and_applies_at_login(ca_home):
    add(ca_home, "admin1", "admin", "--password-stdin")
    add(ca_home, "gina", "auditor", "--password-stdin")
    assert "operator gina has role security" in run("operator", "role", "gina", "security", home=ca_home).stdout
    assert listed(ca_home)["gina"]["role"] == "security"
    assert (await login(ca_home, "gina", PASSWORD)).role == "security"
    assert audited(ca_home, "operator_role_changed") == [
        ("operator_role_changed", {"operator": "gina", "from": "auditor", "to": "security"})]

    proc = run("operator", "role", "gina", "root", home=ca_home, ok=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
    assert listed(ca_home)["gina"]["role"] == "security"
    one_line_error(run("operator", "role", "ghost", "admin", home=ca_home, ok=False), "no operator 'ghost'")


def test_the_last_enabled_admin_is_kept(ca_home):
    add(ca_home, "root", "admin", "--password-stdin")
    one_line_error(run("operator", "disable", "root", home=ca_home, ok=False), "last enabled admin")
    one_line_error(run("operator", "role", "root", "security", home=ca_home, ok=False), "last enabled admin")
    assert (listed(ca_home)["root"]["role"], listed(ca_home)["root"]["disabled"]) == ("admin", False)

    add(ca_home, "second", "admin", "--password-stdin")   # a disabled admin does not count
    run("operator", "disable", "second", home=ca_home)
    one_line_error(run("operator", "role", "root", "auditor", home=ca_home, ok=False), "last enabled admin")
    run("operator", "enable", "second", home=ca_home)      # an enabled one does
    run("operator", "role", "root", "auditor", home=ca_home)
    one_line_error(run("operator", "disable", "second", home=ca_home, ok=False), "last enabled admin")
    accounts = listed(ca_home)
    assert (accounts["root"]["role"], accounts["second"]["role"], accounts["second"]["disabled"]) == \
        ("auditor", "admin", False)
    assert [a for a, _ in audited(ca_home, "operator_%") if a != "operator_added"] == [
        "operator_disabled", "operator_enabled", "operator_role_changed"]


async def test_tokens_list_labels_never_secrets_and_revoke_one(ca_home):
    add(ca_home, "hank", "security", "--password-stdin")
    first = json.loads(run("operator", "token", "hank", "--label", "siem export", "--json", home=ca_home).stdout)
    assert first["label"] == "siem export" and first["operator"] == "hank"
    second = run("operator", "token", "hank", "--label", "backup job", home=ca_home).stdout.splitlines()
    assert "'backup job'" in second[0] and "shown once" in second[0]
    secrets_made = [first["token"], second[1]]

    tokens = json.loads(run("operator", "tokens", "hank", "--json", home=ca_home).stdout)
    assert [t["label"] for t in tokens] == ["siem export", "backup job"]
    assert set(tokens[0]) == {"id", "label", "created_at", "created_by", "expires_at", "expired"}
    assert tokens[0]["created_by"] == f"operator:{operator().name}"
    assert tokens[0]["expires_at"] == first["expires_at"] and tokens[0]["expired"] is False
    assert all(isinstance(t["id"], int) and t["id"] > 0 for t in tokens) and tokens[0]["id"] != tokens[1]["id"]
    table = run("operator", "tokens", "hank", home=ca_home)
    assert table.stdout.splitlines()[0].split() == ["ID", "LABEL", "CREATED_AT", "CREATED_BY", "EXPIRES_AT",
                                                    "EXPIRED"]
    assert "siem export" in table.stdout and "backup job" in table.stdout
    listing = json.dumps(tokens) + table.stdout + table.stderr
    assert "iomtop_" not in listing and not any(s in listing or s[7:] in listing for s in secrets_made)

    siem = tokens[0]["id"]
    out = run("operator", "revoke-token", "hank", str(siem), home=ca_home)
    assert f"revoked API token {siem} of operator hank" in out.stdout
    left = json.loads(run("operator", "tokens", "hank", "--json", home=ca_home).stdout)
    assert [t["label"] for t in left] == ["backup job"]
    async with await Authority.open(ca_home) as authority:
        with pytest.raises(NotAcceptedError):
            await authority.operators.bearer(first["token"], source=SOURCE)
        assert (await authority.operators.bearer(second[1], source=SOURCE)).name == "hank"   # the other stays
    assert audited(ca_home, "operator_token_revoked") == [
        ("operator_token_revoked", {"operator": "hank", "token_id": siem})]
    one_line_error(run("operator", "revoke-token", "hank", str(siem), home=ca_home, ok=False),
                   f"has no API token {siem}")   # gone already
    one_line_error(run("operator", "revoke-token", "ghost", "1", home=ca_home, ok=False), "no operator 'ghost'")
    one_line_error(run("operator", "tokens", "ghost", home=ca_home, ok=False), "no operator 'ghost'")


async def test_an_expired_token_is_listed_as_expired(ca_home):
    add(ca_home, "ivy", "auditor", "--password-stdin")
    assert run("operator", "tokens", "ivy", home=ca_home).stdout.strip() == "(none)"
    async with await Authority.open(ca_home, clock=lambda: utc_now() - timedelta(days=3)) as authority:
        await authority.operators.new_api_token("ivy", lifetime=timedelta(days=1), actor="test", label="old")
    [old] = json.loads(run("operator", "tokens", "ivy", "--json", home=ca_home).stdout)
    assert (old["label"], old["expired"]) == ("old", True)
    row = run("operator", "tokens", "ivy", home=ca_home).stdout.splitlines()[1].split()
    assert row[1] == "old" and row[-1] == "yes"


@pytest.mark.parametrize("token_id", ["x", "\u00b3", "\u0663", "-1", "0", "1.5", " 1", "", "9" * 30])
def test_revoke_token_refuses_an_id_that_is_no_positive_integer(ca_home, token_id):
    proc = run("operator", "revoke-token", "hank", token_id, home=ca_home, ok=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "argument ID: not a token id" in proc.stderr, proc.stderr


def test_a_bad_label_is_refused_in_one_line(ca_home):
    add(ca_home, "jack", "auditor", "--password-stdin")
    one_line_error(run("operator", "token", "jack", "--label", "x" * 65, home=ca_home, ok=False), "up to 64")
    one_line_error(run("operator", "token", "jack", "--label", "a\tb", home=ca_home, ok=False), "printable")
    assert run("operator", "tokens", "jack", home=ca_home).stdout.strip() == "(none)"
