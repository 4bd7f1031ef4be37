"""Operator accounts (ca/operators.py): roles, scrypt passwords, one answer for every refused login,
throttling shared with device-token logins, sessions and API tokens in the store (digests only),
and the audit rows that name operator and role."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import sqlite3
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from ca import failures, operators
from ca.audit import verify_chain
from ca.authority import Authority, TokenAuth
from ca.credentials import OperatorAuth, actor
from ca.errors import (BadRequestError, CAError, ConflictError, ForbiddenError, NotAcceptedError, NotFoundError,
                       PolicyViolationError, RateLimitedError, UnauthorizedError)
from ca.operators import ACTIONS, ROLES, Operators, allowed, hash_password, require, verify_password
from ca.registry import new_device
from ca.store.sqlite import SQLiteStore
from tests.conftest import FakeClock, make_csr

A, B = "198.51.100.7", "203.0.113.9"
PASSWORD = "correct horse battery"
OTHER_PASSWORD = "staple of a different kind"
ADMIN = "operator:root"

# who may do what, written out by hand: the table of docs/OPERATORS.md
EXPECTED = {
    "read": {"auditor", "engineer", "security", "admin"},
    "export": {"auditor", "engineer", "security", "admin"},
    "device.write": {"engineer", "security", "admin"},
    "cert.revoke": {"security", "admin"},
    "cert.hold": {"security", "admin"},
    "cert.release": {"security", "admin"},
    "approval.decide": {"security", "admin"},
    "operator.manage": {"admin"},
}


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    yield a
    await a.close()


@pytest.fixture
def kdf_calls(monkeypatch):
    """Every scrypt run, with the thread it ran on."""
    calls = []
    real = operators._kdf

    def counting(*args):
        calls.append(threading.get_ident())
        return real(*args)
    monkeypatch.setattr(operators, "_kdf", counting)
    return calls


async def audit(authority, action: str | None = None) -> list:
    async with authority.store.read() as tx:
        return [r for r in await tx.audit_rows() if action is None or r.action == action]


# -- roles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", sorted(EXPECTED))
@pytest.mark.parametrize("role", ROLES)
def test_every_role_may_do_exactly_what_the_table_says(role, action):
    assert allowed(role, action) is (role in EXPECTED[action])


def test_the_table_names_every_action_and_roles_are_cumulative():
    assert set(ACTIONS) == set(EXPECTED)
    for lower, higher in zip(ROLES, ROLES[1:]):
        assert {a for a in ACTIONS if allowed(lower, a)} < {a for a in ACTIONS if allowed(higher, a)}


def test_an_unknown_action_or_role_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown action"):
        allowed("admin", "cert.delete")
    with pytest.raises(ValueError, match="unknown role"):
        allowed("root", "read")


def test_require_names_the_role_needed():
    op = operators.Operator("eve", "engineer", False, None, None)
    require(op, "device.write")
    with pytest.raises(ForbiddenError, match="cert.revoke needs the security role") as refused:
        require(op, "cert.revoke")
    assert refused.value.code == "forbidden"
    with pytest.raises(ForbiddenError, match="disabled"):
        require(operators.Operator("eve", "admin", True, None, None), "read")


def test_actor_names_operator_and_role_and_the_cli_operator_as_before():
    assert actor(OperatorAuth("root")) == "operator:root"
    assert actor(OperatorAuth("alice", "security"), "pump-1") == "operator:alice:security"
    assert operators.Operator("alice", "security", False, None, None).actor == "operator:alice:security"


# -- passwords --------------------------------------------------------------------------------

def test_the_stored_string_describes_its_parameters_and_holds_no_password():
    stored = hash_password(PASSWORD)
    scheme, n, r, p, salt, key = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2 ** 15), "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(key)) == 32
    assert PASSWORD not in stored and base64.b64encode(PASSWORD.encode()).decode() not in stored
    assert hash_password(PASSWORD) != stored   # a fresh salt each time
    assert verify_password(PASSWORD, stored) and not verify_password(PASSWORD + "!", stored)


def test_verification_uses_the_stored_parameters_and_a_constant_time_comparison(monkeypatch):
    monkeypatch.setattr(operators, "SCRYPT_N", 2 ** 10)
    cheap = hash_password(PASSWORD)
    monkeypatch.undo()
    assert cheap.startswith("scrypt$1024$") and verify_password(PASSWORD, cheap)   # parameters may change
    compared = []
    real = operators.hmac.compare_digest
    monkeypatch.setattr(operators.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert not verify_password("not the password", cheap)
    assert len(compared) == 1 and compared[0][1] == base64.b64decode(cheap.split("$")[5])
    assert not verify_password(PASSWORD, "scrypt$1$1$1$AA==$AA==")   # unreadable: refused, no exception
    assert not verify_password(PASSWORD, "plain:" + PASSWORD)


@pytest.mark.parametrize("password, fragment", [
    ("x" * 11, "at least 12"), ("x" * 1025, "at most 1024"), ("line one\nline two", "control characters")])
def test_a_password_must_be_acceptable(password, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        hash_password(password)


def test_twelve_characters_are_enough():
    assert verify_password("x" * 12, hash_password("x" * 12))


# -- accounts ---------------------------------------------------------------------------------

async def test_names_roles_and_duplicates(authority, clock):
    added = await authority.operators.add("alice", "security", PASSWORD, actor=ADMIN)
    assert (added.name, added.role, added.disabled, added.created_at, added.password_changed_at) == (
        "alice", "security", False, clock.now, None)
    for name in ("Alice", "al ice", "", "a" * 65, "-alice", "al:ice"):
        with pytest.raises(BadRequestError, match="invalid operator name"):
            await authority.operators.add(name, "security", PASSWORD, actor=ADMIN)
    with pytest.raises(BadRequestError, match="not one of auditor, engineer, security, admin"):
        await authority.operators.add("bob", "root", PASSWORD, actor=ADMIN)
    with pytest.raises(ConflictError, match="already exists"):
        await authority.operators.add("alice", "admin", PASSWORD, actor=ADMIN)
    with pytest.raises(NotFoundError):
        await authority.operators.get("ghost")
    assert [o.name for o in await authority.operators.list()] == ["alice"]
    assert (await authority.operators.get("alice")) == added
    assert [json.loads(r.detail) for r in await audit(authority, "operator_added")] == [
        {"operator": "alice", "role": "security"}]


async def test_the_store_refuses_a_role_outside_the_table(authority):
    conn = sqlite3.connect(authority.config.database)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("INSERT INTO operators (name, role, password_hash, created_at, created_by) "
                     "VALUES ('mallory', 'root', 'scrypt$x', '2026-01-01T00:00:00Z', 'x')")
    conn.close()


# -- logins: one answer, throttled ---------------------------------------------------------------

async def test_unknown_wrong_and_disabled_are_one_answer_each_costing_one_scrypt(authority, kdf_calls):
    await authority.operators.add("alice", "engineer", PASSWORD, actor=ADMIN)
    await authority.operators.add("dave", "engineer", PASSWORD, actor=ADMIN)
    await authority.operators.disable("dave", actor=ADMIN)
    kdf_calls.clear()
    answers = []
    for name, password in (("ghost", PASSWORD), ("alice", "wrong password!"), ("dave", PASSWORD), ("Bad Name", PASSWORD)):
        with pytest.raises(NotAcceptedError) as refused:
            await authority.operators.login(name, password, source=A)
        answers.append(refused.value)
        assert len(kdf_calls) == len(answers), f"{name}: one scrypt per attempt, the unknown name too"
    assert {(e.code, e.message) for e in answers} == {("unauthorized", "operator name or password not accepted")}
    assert len({e.why for e in answers}) == 4   # the server itself still knows which
    assert threading.get_ident() not in kdf_calls   # scrypt ran in worker threads, not on the event loop
    assert await audit(authority, "operator_login") == []   # failures are counted, not audited one by one
    op = await authority.operators.login("alice", PASSWORD, source=A)
    assert op.name == "alice" and len(kdf_calls) == 5
    [row] = await audit(authority, "operator_login")
    assert row.actor == "operator:alice:engineer" and json.loads(row.detail) == {"source": A}


async def test_after_the_limit_even_the_right_password_waits_from_that_source_only(authority, clock):
    await authority.operators.add("alice", "admin", PASSWORD, actor=ADMIN)
    for n in range(failures.DEVICE_SOURCE_LIMIT):
        with pytest.raises(NotAcceptedError):
            await authority.operators.login("alice", f"guess number {n}", source=A)
    with pytest.raises(RateLimitedError) as locked:
        await authority.operators.login("alice", PASSWORD, source=A)
    assert 0 < locked.value.retry_after <= 2 * failures.WINDOW.total_seconds()
    assert (await authority.operators.login("alice", PASSWORD, source=B)).name == "alice"
    clock.advance(seconds=2 * failures.WINDOW.total_seconds())   # the current and the previous window count
    assert (await authority.operators.login("alice", PASSWORD, source=A)).name == "alice"
    # aggregated per source and window, with the account named
    await authority.audit_anonymous_failures()
    [row] = await audit(authority, "anonymous_failures")
    assert row.actor == f"source:{A}" and json.loads(row.detail)["devices"] == ["operator:alice"]


async def test_the_per_source_count_is_shared_with_device_token_logins(authority):
    authority.failure_limits = failures.Limits(source=3)   # read on every attempt, as the server sets it
    await authority.operators.add("alice", "admin", PASSWORD, actor=ADMIN)
    await authority.registry.add(new_device("pump-1", model="m", owner="o"), actor=ADMIN)
    for _ in range(2):
        with pytest.raises(NotAcceptedError):
            await authority.enroll("pump-1", make_csr()[0], TokenAuth("wrong", source=A))
    with pytest.raises(NotAcceptedError):
        await authority.operators.login("bob", PASSWORD, source=A)
    with pytest.raises(RateLimitedError, match="from address"):
        await authority.operators.login("alice", PASSWORD, source=A)
    assert (await authority.operators.login("alice", PASSWORD, source=B)).name == "alice"


# -- sessions ---------------------------------------------------------------------------------

async def _logged_in(authority, name="alice", role="security", source=A):
    await authority.operators.add(name, role, PASSWORD, actor=ADMIN)
    op = await authority.operators.login(name, PASSWORD, source=source)
    return op, await authority.operators.open_session(op, source=source)


async def _last_seen(authority, secret):
    async with authority.store.read() as tx:
        return (await tx.operator_session(operators.digest(secret))).last_seen_at


async def test_a_session_ends_after_idle_time_and_use_keeps_it(authority, clock):
    op, secret = await _logged_in(authority)
    clock.advance(minutes=14)
    assert await authority.operators.session(secret) == op
    clock.advance(minutes=14)
    assert await authority.operators.session(secret) == op   # 28 min in all, but used 14 min ago
    clock.advance(minutes=15)
    with pytest.raises(UnauthorizedError, match="session expired or unknown; log in again"):
        await authority.operators.session(secret)
    with pytest.raises(UnauthorizedError, match="session expired or unknown"):
        await authority.operators.session("not-a-session")


async def test_last_seen_is_written_only_when_a_minute_old(authority, clock):
    _, secret = await _logged_in(authority)
    opened = clock.now
    clock.advance(seconds=30)
    await authority.operators.session(secret)
    assert await _last_seen(authority, secret) == opened
    clock.advance(seconds=31)
    await authority.operators.session(secret)
    assert await _last_seen(authority, secret) == clock.now


async def test_a_session_ends_after_its_maximum_however_used(authority, clock):
    authority.operators.session_max = timedelta(hours=2)   # the console sets these from [console]
    _, secret = await _logged_in(authority)
    for _ in range(11):
        clock.advance(minutes=10)
        await authority.operators.session(secret)
    clock.advance(minutes=10)
    with pytest.raises(UnauthorizedError):
        await authority.operators.session(secret)


async def test_logout_ends_the_session_and_is_audited(authority):
    _, secret = await _logged_in(authority)
    _, other = await _logged_in(authority, "bob", "auditor")
    await authority.operators.close_session(secret)
    with pytest.raises(UnauthorizedError):
        await authority.operators.session(secret)
    assert (await authority.operators.session(other)).name == "bob"   # only that one
    await authority.operators.close_session(secret)   # again: nothing, no second audit row
    assert [r.actor for r in await audit(authority, "operator_logout")] == ["operator:alice:security"]


async def test_disable_ends_sessions_and_tokens_and_refuses_new_ones(authority):
    op, secret = await _logged_in(authority)
    token, _, _ = await authority.operators.new_api_token("alice", lifetime=timedelta(days=1), actor=ADMIN)
    disabled = await authority.operators.disable("alice", actor=ADMIN)
    assert disabled.disabled and (await authority.operators.get("alice")).disabled
    with pytest.raises(UnauthorizedError):
        await authority.operators.session(secret)
    with pytest.raises(NotAcceptedError, match="API token not accepted"):
        await authority.operators.bearer(token, source=A)
    with pytest.raises(UnauthorizedError):
        await authority.operators.open_session(op, source=A)
    with pytest.raises(PolicyViolationError, match="disabled"):
        await authority.operators.new_api_token("alice", lifetime=timedelta(days=1), actor=ADMIN)
    async with authority.store.read() as tx:
        assert await tx.operator_session(operators.digest(secret)) is None
        assert await tx.operator_token(operators.digest(token)) is None
    await authority.operators.disable("alice", actor=ADMIN)   # again: no second audit row
    [row] = await audit(authority, "operator_disabled")
    assert json.loads(row.detail) == {"operator": "alice", "sessions_ended": 1, "tokens_ended": 1}


async def test_a_disabled_account_is_refused_even_where_its_rows_remain(authority):
    """Disable deletes sessions and tokens; each lookup checks the account too (belt and braces)."""
    _, secret = await _logged_in(authority)
    token, _, _ = await authority.operators.new_api_token("alice", lifetime=timedelta(days=1), actor=ADMIN)
    conn = sqlite3.connect(authority.config.database)
    conn.execute("UPDATE operators SET disabled_at = '2026-11-22T12:00:00Z' WHERE name = 'alice'")
    conn.commit()
    conn.close()
    with pytest.raises(UnauthorizedError):
        await authority.operators.session(secret)
    with pytest.raises(NotAcceptedError):
        await authority.operators.bearer(token, source=A)


async def test_a_password_change_ends_sessions_and_the_old_password(authority, clock):
    _, secret = await _logged_in(authority)
    token, _, _ = await authority.operators.new_api_token("alice", lifetime=timedelta(days=1), actor=ADMIN)
    clock.advance(minutes=1)
    await authority.operators.set_password("alice", OTHER_PASSWORD, actor="operator:alice:security")
    with pytest.raises(UnauthorizedError):
        await authority.operators.session(secret)
    with pytest.raises(NotAcceptedError):
        await authority.operators.login("alice", PASSWORD, source=A)
    assert (await authority.operators.login("alice", OTHER_PASSWORD, source=A)).password_changed_at == clock.now
    assert (await authority.operators.bearer(token, source=A)).name == "alice"   # API tokens stay
    with pytest.raises(BadRequestError, match="at least 12"):
        await authority.operators.set_password("alice", "short", actor=ADMIN)
    with pytest.raises(NotFoundError):
        await authority.operators.set_password("ghost", OTHER_PASSWORD, actor=ADMIN)
    [row] = await audit(authority, "operator_password_changed")
    assert json.loads(row.detail) == {"operator": "alice", "sessions_ended": 1}


# -- API tokens -------------------------------------------------------------------------------

async def test_an_api_token_lasts_its_lifetime(authority, clock):
    await authority.operators.add("ci", "auditor", PASSWORD, actor=ADMIN)
    token, expires, _ = await authority.operators.new_api_token("ci", lifetime=timedelta(days=90), actor=ADMIN)
    assert token.startswith("iomtop_") and len(token) > 40 and expires == clock.now + timedelta(days=90)
    assert (await authority.operators.bearer(token, source=A)).name == "ci"
    clock.advance(days=90)
    with pytest.raises(NotAcceptedError) as expired:
        await authority.operators.bearer(token, source=A)
    with pytest.raises(NotAcceptedError) as unknown:
        await authority.operators.bearer("iomtop_" + "A" * 43, source=A)
    assert expired.value.message == unknown.value.message == "API token not accepted"
    for lifetime in (timedelta(0), timedelta(days=366)):
        with pytest.raises(BadRequestError, match="at most 365 days"):
            await authority.operators.new_api_token("ci", lifetime=lifetime, actor=ADMIN)
    [row] = await audit(authority, "operator_token_created")
    assert row.actor == ADMIN and json.loads(row.detail) == {"operator": "ci", "token_id": 1, "label": None,
                                                             "expires_at": expires.isoformat()}
    assert token not in row.detail


async def test_token_guessing_is_throttled_per_source_and_a_valid_token_still_passes(authority):
    await authority.operators.add("ci", "auditor", PASSWORD, actor=ADMIN)
    token, _, _ = await authority.operators.new_api_token("ci", lifetime=timedelta(days=1), actor=ADMIN)
    for n in range(failures.DEVICE_SOURCE_LIMIT):
        with pytest.raises(NotAcceptedError):
            await authority.operators.bearer(f"iomtop_guess{n}", source=A)
    with pytest.raises(RateLimitedError):   # more guesses from A: refused without a lookup's answer
        await authority.operators.bearer("iomtop_guess-more", source=A)
    # 256 bits cannot be guessed: the integration holding the real token is not locked out by them
    assert (await authority.operators.bearer(token, source=A)).name == "ci"
    assert (await authority.operators.bearer(token, source=B)).name == "ci"


async def test_the_database_holds_digests_not_secrets_or_passwords(ca_home, clock):
    authority = await Authority.open(ca_home, clock=clock)
    op, session = await _logged_in(authority)
    token, _, _ = await authority.operators.new_api_token("alice", lifetime=timedelta(days=1), actor=ADMIN)
    database = authority.config.database
    await authority.close()
    conn = sqlite3.connect(database)
    assert conn.execute("SELECT digest FROM operator_sessions").fetchall() == [(hashlib.sha256(session.encode()).digest(),)]
    assert conn.execute("SELECT digest FROM operator_tokens").fetchall() == [(hashlib.sha256(token.encode()).digest(),)]
    conn.close()
    files = [p for p in database.parent.iterdir() if p.name.startswith(database.name)]
    content = b"".join(p.read_bytes() for p in files)
    assert b"operator_sessions" in content   # what we read is the database
    for secret in (PASSWORD, session, token, token.removeprefix("iomtop_")):
        assert secret.encode() not in content, f"{secret[:10]}... stored in the clear"


async def test_an_operator_credential_is_audited_with_its_role(authority):
    op, _ = await _logged_in(authority, "eve", "engineer")
    await authority.registry.add(new_device("pump-1", model="m", owner="o"), actor=op.actor)
    await authority.enroll("pump-1", make_csr()[0], op.auth())
    actors = {r.action: r.actor for r in await audit(authority)}
    assert actors["device_registered"] == actors["certificate_issued"] == "operator:eve:engineer"
    assert verify_chain(await audit(authority)) == []


# -- a stateful test: disabled operators and ended sessions never authenticate ---------------------

NAMES = ("alice", "bob")


class SessionMachine(RuleBasedStateMachine):
    """Logins, sessions, tokens, disable, password changes and time, against a model of what must
    still authenticate. Scrypt runs with cheap parameters here (a stored hash carries its own)."""

    sessions = Bundle("sessions")
    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.work = Path(tempfile.mkdtemp(prefix="operators-run-"))
        self.clock = FakeClock()
        self.store = self.run(SQLiteStore.open(self.work / "ca.db"))
        no_limit = failures.Limits(device_source=10 ** 6, source=10 ** 6)
        self.ops = Operators(self.store, self.clock, session_idle=timedelta(minutes=15),
                             session_max=timedelta(hours=2), limits=lambda: no_limit)
        self.disabled: set[str] = set()
        self.role = {name: "engineer" for name in NAMES}
        self.token_id: dict[str, int] = {}
        self.ended: set[str] = set()   # tokens revoked, or ended with their operator's disabling
        self.password = {name: PASSWORD for name in NAMES}
        self.live: dict[str, list] = {}      # session secret -> [operator, opened, last written]
        self.expires: dict[str, tuple[str, object]] = {}   # token -> (operator, expires_at)
        for name in NAMES:
            self.run(self.ops.add(name, "engineer", PASSWORD, actor=ADMIN))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def session_ok(self, secret: str) -> bool:
        if secret not in self.live:
            return False
        name, opened, seen = self.live[secret]
        now = self.clock.now
        return name not in self.disabled and now - seen < self.ops.session_idle and now - opened < self.ops.session_max

    def token_ok(self, token: str) -> bool:
        name, expires = self.expires[token]
        return name not in self.disabled and token not in self.ended and self.clock.now < expires

    @rule(target=sessions, name=st.sampled_from(NAMES), right=st.booleans())
    def login(self, name, right):
        password = self.password[name] if right else "a wrong password"
        try:
            op = self.run(self.ops.login(name, password, source=A))
            secret = self.run(self.ops.open_session(op, source=A))
        except CAError as exc:
            assert isinstance(exc, NotAcceptedError) and (not right or name in self.disabled)
            return "never-a-session"
        assert right and name not in self.disabled, "a wrong password or a disabled operator logged in"
        self.live[secret] = [name, self.clock.now, self.clock.now]
        return secret

    @rule(secret=sessions)
    def use_session(self, secret):
        expected = self.session_ok(secret)
        try:
            op = self.run(self.ops.session(secret))
        except UnauthorizedError:
            assert not expected, "a live session was refused"
            return
        assert expected, "an ended session authenticated"
        entry = self.live[secret]
        assert op.name == entry[0] and op.role == self.role[op.name], "a session kept an old role"
        if self.clock.now - entry[2] >= operators.TOUCH_AFTER:
            entry[2] = self.clock.now

    @rule(secret=sessions)
    def logout(self, secret):
        self.run(self.ops.close_session(secret))
        self.live.pop(secret, None)

    @rule(target=tokens, name=st.sampled_from(NAMES), hours=st.integers(1, 48))
    def new_token(self, name, hours):
        try:
            token, expires, token_id = self.run(self.ops.new_api_token(name, lifetime=timedelta(hours=hours),
                                                                       actor=ADMIN))
        except PolicyViolationError:
            assert name in self.disabled
            return "iomtop_never-a-token"
        self.expires[token] = (name, expires)
        self.token_id[token] = token_id
        assert token_id in {t.id for t in self.run(self.ops.api_tokens(name))}
        return token

    @rule(token=tokens)
    def use_token(self, token):
        expected = token in self.expires and self.token_ok(token)
        try:
            self.run(self.ops.bearer(token, source=A))
        except NotAcceptedError:
            assert not expected, "a live token was refused"
            return
        assert expected, "an expired or disabled operator's token authenticated"

    def last_admin(self, name: str) -> bool:
        return [n for n in NAMES if self.role[n] == "admin" and n not in self.disabled] == [name]

    @rule(name=st.sampled_from(NAMES))
    def disable(self, name):
        if name not in self.disabled and self.last_admin(name):
            with pytest.raises(ConflictError, match="last enabled admin"):
                self.run(self.ops.disable(name, actor=ADMIN))
            return
        self.run(self.ops.disable(name, actor=ADMIN))
        self.disabled.add(name)
        self.ended |= {t for t, (n, _) in self.expires.items() if n == name}
        self.live = {s: v for s, v in self.live.items() if v[0] != name}

    @rule(name=st.sampled_from(NAMES))
    def enable(self, name):
        self.run(self.ops.enable(name, actor=ADMIN))
        self.disabled.discard(name)

    @rule(name=st.sampled_from(NAMES), role=st.sampled_from(ROLES))
    def set_role(self, name, role):
        if role != "admin" and name not in self.disabled and self.last_admin(name):
            with pytest.raises(ConflictError, match="last enabled admin"):
                self.run(self.ops.set_role(name, role, actor=ADMIN))
            return
        assert self.run(self.ops.set_role(name, role, actor=ADMIN)).role == role
        self.role[name] = role

    @rule(token=tokens)
    def revoke_token(self, token):
        if token not in self.expires:
            return
        name, expires = self.expires[token]
        try:
            self.run(self.ops.revoke_api_token(name, self.token_id[token], actor=ADMIN))
        except NotFoundError:   # revoked or ended before, or pruned once expired
            assert token in self.ended or self.clock.now >= expires, "a live token could not be revoked"
            return
        assert token not in self.ended, "an ended token was found again"
        self.ended.add(token)

    @invariant()
    def an_admin_stays_if_there_was_one(self):
        stored = {o.name: o for o in self.run(self.ops.list())}
        assert {n: (o.role, o.disabled) for n, o in stored.items()} == {
            n: (self.role[n], n in self.disabled) for n in NAMES}

    @rule(name=st.sampled_from(NAMES))
    def change_password(self, name):
        self.password[name] = OTHER_PASSWORD if self.password[name] == PASSWORD else PASSWORD
        self.run(self.ops.set_password(name, self.password[name], actor=ADMIN))
        self.live = {s: v for s, v in self.live.items() if v[0] != name}

    @rule(minutes=st.integers(0, 40), seconds=st.integers(0, 59))
    def time_passes(self, minutes, seconds):
        self.clock.advance(minutes=minutes, seconds=seconds)

    @invariant()
    def nothing_ended_authenticates(self):
        """Sessions the model calls ended, and tokens of disabled operators or past their expiry,
        are refused (checking them writes nothing that could revive them)."""
        for secret in list(self.live):
            if not self.session_ok(secret):
                with pytest.raises(UnauthorizedError):
                    self.run(self.ops.session(secret))
        for token in self.expires:
            if not self.token_ok(token):
                with pytest.raises(NotAcceptedError):
                    self.run(self.ops.bearer(token, source=B))


def test_session_machine(monkeypatch):
    monkeypatch.setattr(operators, "SCRYPT_N", 2 ** 10)
    run_state_machine_as_test(SessionMachine, settings=settings(
        max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


async def test_a_login_rehashes_a_password_stored_with_older_parameters(authority, monkeypatch):
    monkeypatch.setattr(operators, "SCRYPT_N", 2 ** 12)   # the parameters of an older release
    await authority.operators.add("olga", "auditor", PASSWORD, actor=ADMIN)
    monkeypatch.undo()
    async with authority.store.read() as tx:
        old = await tx.operator_password_hash("olga")
    assert old.startswith("scrypt$4096$") and not operators.current_parameters(old)
    await authority.operators.login("olga", PASSWORD, source=A)
    async with authority.store.read() as tx:
        new = await tx.operator_password_hash("olga")
    assert new.startswith(f"scrypt${operators.SCRYPT_N}$") and operators.current_parameters(new)
    assert verify_password(PASSWORD, new) and not verify_password(OTHER_PASSWORD, new)
    await authority.operators.login("olga", PASSWORD, source=A)   # and logs in after
    async with authority.store.read() as tx:
        assert await tx.operator_password_hash("olga") == new      # no rehash of a current one
    async with authority.store.write() as tx:   # a rehash never overwrites a password changed meanwhile
        assert not await tx.replace_operator_password_hash("olga", old, hash_password(OTHER_PASSWORD))
