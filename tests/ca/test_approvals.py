"""Approval bound to a key (ca/approvals.py) over a real store: fingerprints and key types, the
waiting requests and their bound, approval by fingerprint, its single use, the migration of the
per-device rows; and a stateful property test of the whole approval state machine."""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from ca import approvals
from ca.approvals import MAX_WAITING_KEYS, fingerprint, key_type, parse_fingerprint
from ca.authority import Authority, OperatorAuth, TokenAuth
from ca.config import ApprovalPolicy
from ca.errors import (BadRequestError, CAError, KeyPolicyError, NotFoundError, PendingApprovalError,
                       ProofOfPossessionError, RevokedError, TokenUsedError)
from ca.registry import new_device
from ca.store.sqlite import MIGRATIONS, SQLiteStore
from ca.store.sqlite_schema import _statements
from tests.conftest import FakeClock, make_csr

HIGH = ApprovalPolicy(frozenset({"high"}))


def spki_sha256(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    a.config = replace(a.config, approval=HIGH)
    yield a
    await a.close()


async def register(authority, device_id: str, criticality: str = "high") -> str:
    token = await authority.registry.add(new_device(device_id, model="ventilator", owner="icu",
                                                    criticality=criticality), actor="test")
    return token.secret


async def ask(authority, device_id, secret, key, source="10.0.0.5"):
    return await authority.enroll(device_id, make_csr(key)[0], TokenAuth(secret, source=source))


async def waits(authority, device_id, secret, key, source="10.0.0.5") -> None:
    with pytest.raises(PendingApprovalError) as info:
        await ask(authority, device_id, secret, key, source)
    assert info.value.retry_after == approvals.RETRY_AFTER


async def audit(authority, action: str, device_id: str) -> list:
    async with authority.store.read() as tx:
        rows = await tx.audit_rows()
    return [(r.actor, json.loads(r.detail)) for r in rows if r.action == action and r.device_id == device_id]


def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


# -- fingerprints and key types -------------------------------------------------------------

@pytest.mark.parametrize("make, expected", [
    (lambda: ec.generate_private_key(ec.SECP256R1()), "EC P-256"),
    (lambda: ec.generate_private_key(ec.SECP384R1()), "EC P-384"),
    (lambda: rsa.generate_private_key(65537, 2048), "RSA 2048"),
    (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
])
def test_fingerprint_is_sha256_of_the_spki_and_the_type_reads_as_engineers_say_it(make, expected):
    public = make().public_key()
    assert fingerprint(public) == spki_sha256(public)
    assert key_type(public) == expected


def test_fingerprint_input_in_any_case_with_or_without_colons():
    fp = spki_sha256(ec_key().public_key())
    spaced = ":".join(fp[i:i + 2] for i in range(0, 64, 2))
    for text in (fp, fp.upper(), spaced, spaced.upper(), f"  {spaced}\n"):
        assert parse_fingerprint(text) == fp
    for bad in ("", fp[:-1], fp + "0", "g" * 64, f"SHA256:{fp}", fp[:32] + " " + fp[32:]):
        with pytest.raises(BadRequestError, match="64 hex digits"):
            parse_fingerprint(bad)


# -- the core over a real store ---------------------------------------------------------------

async def test_waiting_key_is_recorded_once_with_its_type_source_and_times(authority, clock):
    secret = await register(authority, "vent-1")
    key = ec_key()
    await waits(authority, "vent-1", secret, key, source="10.0.0.5")
    clock.advance(minutes=1)
    await waits(authority, "vent-1", secret, key, source="10.0.0.9")   # the same key again
    [row] = await authority.pending_approvals("vent-1")
    assert (row.fingerprint, row.key_type, row.source) == (fingerprint(key.public_key()), "EC P-256", "10.0.0.9")
    assert row.last_seen_at == clock.now and row.requested_at == clock.now - timedelta(minutes=1)
    assert not row.approved
    [(_, detail)] = await audit(authority, "enroll_pending_approval", "vent-1")   # no audit of the retry
    assert detail == {"fingerprint": row.fingerprint, "key_type": "EC P-256", "source": "10.0.0.5"}
    async with authority.store.read() as tx:
        assert await tx.list_certificates("vent-1") == []


async def test_only_the_approved_key_gets_its_certificate_and_then_the_approval_is_gone(authority):
    secret = await register(authority, "vent-1")
    real, impostor = ec_key(), ec_key()
    await waits(authority, "vent-1", secret, real)
    await waits(authority, "vent-1", secret, impostor, source="203.0.113.7")
    approved = await authority.approve("vent-1", fingerprint(real.public_key()).upper(), actor="operator:t")
    assert approved.approved and approved.approved_by == "operator:t"
    await waits(authority, "vent-1", secret, impostor, source="203.0.113.7")
    issued = await ask(authority, "vent-1", secret, real)
    assert fingerprint(issued.certificate.public_key()) == approved.fingerprint
    assert await authority.pending_approvals("vent-1") == []
    [(actor, detail)] = await audit(authority, "enroll_approved", "vent-1")
    assert detail["fingerprint"] == approved.fingerprint and actor == "operator:t"
    # used once: a fresh token and the very same key wait again
    token = await authority.registry.new_token("vent-1", actor="test")
    await waits(authority, "vent-1", token.secret, real)


async def test_approve_without_fingerprint_needs_exactly_one_waiting_key(authority):
    secret = await register(authority, "vent-1")
    with pytest.raises(NotFoundError, match="no enrollment of device vent-1 waits"):
        await authority.approve("vent-1", actor="operator:t")
    first, second = ec_key(), ec_key()
    await waits(authority, "vent-1", secret, first)
    await waits(authority, "vent-1", secret, second)
    with pytest.raises(BadRequestError, match="2 keys wait") as info:
        await authority.approve("vent-1", actor="operator:t")
    assert fingerprint(first.public_key()) in info.value.message
    assert fingerprint(second.public_key()) in info.value.message
    await authority.reject_approval("vent-1", fingerprint(second.public_key()), actor="operator:t")
    approved = await authority.approve("vent-1", actor="operator:t")
    assert approved.fingerprint == fingerprint(first.public_key())
    with pytest.raises(BadRequestError, match="already approved"):
        await authority.approve("vent-1", approved.fingerprint, actor="operator:t")


async def test_a_fingerprint_of_no_waiting_key_approves_nothing(authority):
    secret = await register(authority, "vent-1")
    key = ec_key()
    await waits(authority, "vent-1", secret, key)
    with pytest.raises(NotFoundError, match="with key"):
        await authority.approve("vent-1", fingerprint(ec_key().public_key()), actor="operator:t")
    with pytest.raises(BadRequestError, match="64 hex digits"):
        await authority.approve("vent-1", "not-a-fingerprint", actor="operator:t")
    await register(authority, "vent-2")   # another device's waiting key does not count either
    with pytest.raises(NotFoundError):
        await authority.approve("vent-2", fingerprint(key.public_key()), actor="operator:t")
    assert not (await authority.pending_approvals("vent-1"))[0].approved
    assert await audit(authority, "enroll_approved", "vent-1") == []


async def test_at_most_five_keys_wait_and_a_further_one_is_neither_kept_nor_audited(authority):
    secret = await register(authority, "vent-1")
    keys = [ec_key() for _ in range(MAX_WAITING_KEYS + 2)]
    for key in keys:
        await waits(authority, "vent-1", secret, key)
    kept = {r.fingerprint for r in await authority.pending_approvals("vent-1")}
    assert kept == {fingerprint(k.public_key()) for k in keys[:MAX_WAITING_KEYS]}   # the first ones stay
    assert len(await audit(authority, "enroll_pending_approval", "vent-1")) == MAX_WAITING_KEYS
    with pytest.raises(NotFoundError):   # not kept: it cannot be approved either
        await authority.approve("vent-1", fingerprint(keys[-1].public_key()), actor="operator:t")
    dropped = await authority.reject_approval("vent-1", actor="operator:t")
    assert len(dropped) == MAX_WAITING_KEYS and await authority.pending_approvals("vent-1") == []
    await waits(authority, "vent-1", secret, keys[-1])
    assert [r.fingerprint for r in await authority.pending_approvals()] == [fingerprint(keys[-1].public_key())]


async def test_a_key_the_ca_would_refuse_is_refused_at_once_not_put_before_an_engineer(authority):
    secret = await register(authority, "vent-1")
    with pytest.raises(KeyPolicyError):
        await ask(authority, "vent-1", secret, rsa.generate_private_key(65537, 1024))
    assert await authority.pending_approvals() == []


async def test_devices_outside_the_approval_classes_and_operators_do_not_wait(authority):
    secret = await register(authority, "pump-1", criticality="low")
    assert (await ask(authority, "pump-1", secret, ec_key())).device_id == "pump-1"
    await register(authority, "vent-1")
    issued = await authority.enroll("vent-1", make_csr()[0], OperatorAuth("t"))
    assert issued.device_id == "vent-1" and await authority.pending_approvals() == []


async def test_no_source_is_kept_as_none_and_decommission_drops_the_requests(authority):
    secret = await register(authority, "vent-1")
    await waits(authority, "vent-1", secret, ec_key(), source=None)
    [row] = await authority.pending_approvals()
    assert row.source is None and "from -" in row.describe()
    await authority.decommission("vent-1", actor="operator:t")
    assert await authority.pending_approvals() == []
    with pytest.raises(RevokedError):
        await authority.approve("vent-1", actor="operator:t")


async def test_serverkeygen_binds_the_approval_to_the_clients_request_key(authority):
    """The key issued is made anew on every serverkeygen attempt: the approval names the (proven)
    key of the client's own request CSR instead."""
    secret = await register(authority, "vent-1")
    request_csr, client_key = make_csr()

    async def keygen():
        return await authority.enroll("vent-1", make_csr()[0], TokenAuth(secret), approval_csr=request_csr)
    for _ in range(2):
        with pytest.raises(PendingApprovalError):
            await keygen()
    [row] = await authority.pending_approvals("vent-1")
    assert row.fingerprint == fingerprint(client_key.public_key())
    await authority.approve("vent-1", actor="operator:t")
    issued = await keygen()
    assert fingerprint(issued.certificate.public_key()) != row.fingerprint   # the server's key, issued
    forged = make_csr(ec_key())[0]   # a request CSR not signed by the key it carries
    forged = x509.load_der_x509_csr(forged.public_bytes(serialization.Encoding.DER)[:-4] + b"\x00" * 4)
    with pytest.raises(ProofOfPossessionError):
        await authority.enroll("vent-1", make_csr()[0], TokenAuth(secret), approval_csr=forged)


async def test_migration_drops_the_per_device_approvals(tmp_path):
    number = next(i for i, m in enumerate(MIGRATIONS, 1) if "CREATE TABLE approval_requests" in m)
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:number - 1]:
        for statement in _statements(script):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {number - 1}")
    for device in ("waiting", "approved"):
        conn.execute("INSERT INTO devices (id, model, owner, criticality, created_at) "
                     "VALUES (?, 'm', 'o', 'high', '2026-11-22T12:00:00Z')", (device,))
    conn.execute("INSERT INTO approvals (device_id, requested_at) VALUES ('waiting', '2026-11-22T12:00:00Z')")
    conn.execute("INSERT INTO approvals VALUES ('approved', '2026-11-22T12:00:00Z', '2026-11-22T12:01:00Z', 'op')")
    conn.close()
    store = await SQLiteStore.open(path)
    try:
        async with store.read() as tx:
            assert await tx.pending_approvals() == []   # neither a keyless wait nor "any key" survives
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "approvals" not in tables and "approval_requests" in tables
    with pytest.raises(sqlite3.IntegrityError):   # the schema holds fingerprints as we write them
        conn.execute("INSERT INTO approval_requests (device_id, fingerprint, key_type, requested_at, last_seen_at) "
                     "VALUES ('waiting', 'AB', 'EC P-256', 'x', 'x')")


# -- the approval state machine -----------------------------------------------------------------

KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(MAX_WAITING_KEYS + 1)] + [
    ed25519.Ed25519PrivateKey.generate()]
CSRS = [make_csr(k)[0] for k in KEYS]
FPS = [fingerprint(k.public_key()) for k in KEYS]


class ApprovalMachine(RuleBasedStateMachine):
    """Devices ask with keys from a small pool (real device and impostors share tokens), engineers
    approve and reject by fingerprint or without one, tokens are renewed so a device can come back
    for a second first enrollment. A model says what should wait; the store must agree."""

    devices = Bundle("devices")

    def __init__(self, ca_template: Path) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.home = Path(tempfile.mkdtemp(prefix="approval-run-")) / "ca"
        shutil.copytree(ca_template, self.home)
        self.clock = FakeClock()
        self.authority = self.run(Authority.open(self.home, clock=self.clock))
        self.authority.config = replace(self.authority.config, approval=HIGH)
        self.tokens: dict[str, tuple[str, bool]] = {}    # device -> (its latest token, used)
        self.model: dict[str, dict[str, bool]] = {}      # device -> fingerprint -> approved
        self.approvals_granted: dict[str, int] = {}
        self.count = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.authority.close())
        self.loop.close()
        shutil.rmtree(self.home.parent, ignore_errors=True)

    @rule(target=devices)
    def add_device(self):
        self.count += 1
        device = f"vent-{self.count}"
        self.tokens[device] = (self.run(register(self.authority, device)), False)
        self.model[device], self.approvals_granted[device] = {}, 0
        return device

    @rule(device=devices, k=st.integers(0, len(KEYS) - 1), source=st.sampled_from(["10.0.0.5", "ra:gw", None]))
    def enroll(self, device, k, source):
        (secret, used), fp, waiting = self.tokens[device], FPS[k], self.model[device]
        try:
            issued = self.run(self.authority.enroll(device, CSRS[k], TokenAuth(secret, source=source)))
        except PendingApprovalError:
            assert not used and not waiting.get(fp), "an approved key was kept waiting"
            if fp not in waiting and len(waiting) < MAX_WAITING_KEYS:
                waiting[fp] = False
            return
        except TokenUsedError:
            assert used
            return
        assert not used and waiting.get(fp) is True, "a certificate for a key nobody approved"
        assert fingerprint(issued.certificate.public_key()) == fp
        self.tokens[device] = (secret, True)
        waiting.clear()   # used, with every other request of the device

    @rule(device=devices)
    def new_token(self, device):
        self.tokens[device] = (self.run(self.authority.registry.new_token(device, actor="test")).secret, False)
        # the keys that waited with the old token go with it; approved ones stay
        self.model[device] = {fp: ok for fp, ok in self.model[device].items() if ok}

    @rule(device=devices, k=st.none() | st.integers(0, len(KEYS) - 1), colons=st.booleans())
    def approve(self, device, k, colons):
        waiting = self.model[device]
        if k is None:
            open_keys = [f for f, ok in waiting.items() if not ok]
            expected = open_keys[0] if len(open_keys) == 1 else None
            text = None
        else:
            expected = FPS[k] if waiting.get(FPS[k]) is False else None
            text = ":".join(FPS[k][i:i + 2] for i in range(0, 64, 2)).upper() if colons else FPS[k]
        try:
            approved = self.run(self.authority.approve(device, text, actor="operator:t"))
        except CAError:
            assert expected is None, "a waiting key could not be approved"
            return
        assert approved.fingerprint == expected, "approved something else than asked"
        waiting[expected] = True
        self.approvals_granted[device] += 1

    @rule(device=devices, k=st.none() | st.integers(0, len(KEYS) - 1))
    def reject(self, device, k):
        waiting = self.model[device]
        gone = list(waiting) if k is None else [FPS[k]] if FPS[k] in waiting else []
        try:
            dropped = self.run(self.authority.reject_approval(device, None if k is None else FPS[k],
                                                              actor="operator:t"))
        except CAError:
            assert not gone
            return
        assert sorted(r.fingerprint for r in dropped) == sorted(gone)
        for fp in gone:
            del waiting[fp]

    @rule(minutes=st.integers(1, 120))
    def time_passes(self, minutes):
        self.clock.advance(minutes=minutes)

    @invariant()
    def the_store_holds_what_the_model_says(self):
        rows = self.run(self.authority.pending_approvals())
        seen = {}
        for r in rows:
            seen.setdefault(r.device_id, {})[r.fingerprint] = r.approved
        assert seen == {d: w for d, w in self.model.items() if w}
        assert all(len(w) <= MAX_WAITING_KEYS for w in seen.values())

    @invariant()
    def each_approval_yields_at_most_one_certificate(self):
        for device, granted in self.approvals_granted.items():
            certs = self.run(self.authority.certificates(device))
            assert len(certs) <= granted, f"{device}: {len(certs)} certificates from {granted} approvals"


def test_approval_machine(ca_template):
    run_state_machine_as_test(lambda: ApprovalMachine(ca_template), settings=settings(
        max_examples=40, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
