"""The one issuance path end to end over a real SQLite store: tokens, refusals, revocation."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ca.authority import Authority, OperatorAuth, TokenAuth
from ca.errors import (NotAcceptedError, KeyPolicyError, PolicyViolationError, ProofOfPossessionError, RevokedError,
                       TokenExpiredError, TokenUsedError, UnauthorizedError, UnknownDeviceError)
from ca.model import CertStatus, RevocationReason
from ca.registry import new_device
from tests.conftest import T0, make_csr


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    yield a
    await a.close()


async def register(authority, device_id="pump-1", **kw):
    kw.setdefault("model", "infusion-pump")
    kw.setdefault("owner", "ICU")
    return await authority.registry.add(new_device(device_id, **kw), actor="test")


async def counts(authority):
    async with authority.store.read() as tx:
        certs = await tx.list_certificates()
        audit = await tx.audit_rows()
    return len(certs), [r.action for r in audit]


async def test_enroll_with_token_once(authority):
    token = await register(authority)
    issued = await authority.enroll("pump-1", make_csr()[0], TokenAuth(token.secret))
    record = await authority.certificate(issued.serial)
    assert record.device_id == "pump-1" and record.status is CertStatus.GOOD
    assert record.der == issued.certificate.public_bytes(serialization.Encoding.DER)
    assert issued.chain[0] == authority.issuer.certificate
    with pytest.raises(TokenUsedError):
        await authority.enroll("pump-1", make_csr()[0], TokenAuth(token.secret))


@pytest.mark.parametrize("case", ["wrong", "expired", "other-device", "unknown-device", "decommissioned",
                                  "weak-key", "bad-signature", "foreign-san"])
async def test_refusals_write_only_an_audit_entry(authority, clock, case):
    token = await register(authority)
    other = await register(authority, "pump-2")
    csr = make_csr()[0]
    secret, device_id = token.secret, "pump-1"
    expected = {"wrong": NotAcceptedError, "expired": TokenExpiredError, "other-device": NotAcceptedError,
                "unknown-device": NotAcceptedError, "decommissioned": NotAcceptedError,   # its tokens burned
                "weak-key": KeyPolicyError, "bad-signature": ProofOfPossessionError,
                "foreign-san": PolicyViolationError}[case]
    if case == "wrong":
        secret = secret[:-2] + ("AA" if not secret.endswith("AA") else "BB")
    elif case == "expired":
        clock.advance(days=8)
    elif case == "other-device":
        secret = other.secret
    elif case == "unknown-device":
        device_id = "ghost-1"
    elif case == "decommissioned":
        await authority.decommission("pump-1", actor="test")
    elif case == "weak-key":
        csr = make_csr(rsa.generate_private_key(65537, 1024))[0]
    elif case == "bad-signature":
        der = bytearray(csr.public_bytes(serialization.Encoding.DER))
        der[-3] ^= 0x01  # a bit inside the signature's last integer
        csr = x509.load_der_x509_csr(bytes(der))
    elif case == "foreign-san":
        csr = make_csr(sans=[x509.DNSName("pump-2")])[0]
    before_certs, before_audit = await counts(authority)
    with pytest.raises(expected) as err:
        await authority.enroll(device_id, csr, TokenAuth(secret))
    assert err.value.message  # a readable reason
    after_certs, after_audit = await counts(authority)
    assert after_certs == before_certs
    if expected is NotAcceptedError:
        # anonymous: one answer for an unknown id and a wrong token, counted, not audited one by one
        assert err.value.message == NotAcceptedError.GENERIC and err.value.code == "unauthorized"
        assert after_audit == before_audit
        async with authority.store.read() as tx:
            assert await tx.count_failures("source", "unknown", T0 - timedelta(hours=1)) == 1
    else:
        assert after_audit == before_audit + ["enroll_refused"]
    # a refused attempt must not burn a good token
    if case in ("weak-key", "bad-signature", "foreign-san", "wrong", "other-device"):
        issued = await authority.enroll("pump-1", make_csr()[0], TokenAuth(token.secret))
        assert issued.device_id == "pump-1"


async def test_fresh_token_burns_the_old_one(authority):
    first = await register(authority)
    second = await authority.registry.new_token("pump-1", actor="test")
    with pytest.raises(UnauthorizedError):
        await authority.enroll("pump-1", make_csr()[0], TokenAuth(first.secret))
    assert (await authority.enroll("pump-1", make_csr()[0], TokenAuth(second.secret))).device_id == "pump-1"


async def test_tokens_are_stored_hashed(authority, ca_home):
    token = await register(authority)
    raw = (ca_home / "iomtca.db").read_bytes()
    wal = ca_home / "iomtca.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert token.secret.encode() not in raw
    assert len(token.secret) >= 22  # >= 128 bits in URL-safe base64


async def test_model_lifetime_override(ca_home, clock):
    cfg = ca_home / "config.toml"
    cfg.write_text(cfg.read_text().replace("[storage]", '[ca.models."ventilator"]\nlifetime = "12h"\n\n[storage]'))
    async with await Authority.open(ca_home, clock=clock) as a:
        await register(a, "vent-1", model="ventilator")
        cert = (await a.enroll("vent-1", make_csr()[0], OperatorAuth("t"))).certificate
        assert cert.not_valid_after_utc - clock() == timedelta(hours=12)


async def test_revoke_hold_release(authority, clock):
    await register(authority)
    issued = await authority.enroll("pump-1", make_csr()[0], OperatorAuth("eng"))
    held = await authority.hold(issued.serial, actor="eng")
    assert held.status is CertStatus.HOLD and held.reason is RevocationReason.certificateHold
    with pytest.raises(PolicyViolationError):
        await authority.hold(issued.serial, actor="eng")
    released = await authority.release(issued.serial, actor="eng")
    assert released.status is CertStatus.GOOD and released.reason is None
    with pytest.raises(PolicyViolationError):
        await authority.release(issued.serial, actor="eng")
    revoked = await authority.revoke(issued.serial, RevocationReason.keyCompromise, actor="eng")
    assert revoked.status is CertStatus.REVOKED and revoked.reason is RevocationReason.keyCompromise
    with pytest.raises(PolicyViolationError):
        await authority.release(issued.serial, actor="eng")
    with pytest.raises(PolicyViolationError):
        await authority.revoke(issued.serial, RevocationReason.superseded, actor="eng")


async def test_decommission_revokes_everything_and_burns_tokens(authority):
    await register(authority)
    serials = [(await authority.enroll("pump-1", make_csr()[0], OperatorAuth("e"))).serial for _ in range(2)]
    token = await authority.registry.new_token("pump-1", actor="e")
    revoked = await authority.decommission("pump-1", actor="e")
    assert sorted(revoked) == sorted(serials)
    for serial in serials:
        rec = await authority.certificate(serial)
        assert rec.status is CertStatus.REVOKED and rec.reason is RevocationReason.cessationOfOperation
    # its token is burned: to a token login it is as if it never matched (nothing told to strangers)
    with pytest.raises(NotAcceptedError):
        await authority.enroll("pump-1", make_csr()[0], TokenAuth(token.secret))
    with pytest.raises(RevokedError):   # an operator hears it plainly
        await authority.enroll("pump-1", make_csr()[0], OperatorAuth("e"))
    with pytest.raises(PolicyViolationError):
        await authority.registry.new_token("pump-1", actor="e")


async def test_concurrent_enrollments_queue_instead_of_failing(authority):
    tokens = [await register(authority, f"mon-{i:02d}", model="monitor") for i in range(24)]
    results = await asyncio.gather(*(authority.enroll(t.device_id, make_csr()[0], TokenAuth(t.secret))
                                     for t in tokens))
    assert len({r.serial for r in results}) == 24
    assert len(await authority.certificates()) >= 24


async def test_serial_collision_draws_again(ca_home, clock):
    drawn = iter([0xABCDEF0123456789AB, 0xABCDEF0123456789AB, 0x1234567890ABCDEF12])
    async with await Authority.open(ca_home, clock=clock, serial_source=lambda: next(drawn)) as a:
        await register(a)
        await register(a, "pump-2")
        first = await a.enroll("pump-1", make_csr()[0], OperatorAuth("e"))
        second = await a.enroll("pump-2", make_csr()[0], OperatorAuth("e"))
    assert first.serial == 0xABCDEF0123456789AB
    assert second.serial == 0x1234567890ABCDEF12
