"""The gateway registry in the core (`ca/gateways.py`) against the real SQLite store: one-time
tokens, enrollment, the per-call check, revocation that nothing undoes."""
from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ca import gateways
from ca.authority import Authority
from ca.errors import (BadRequestError, KeyPolicyError, NotAcceptedError, PolicyViolationError, RevokedError, TokenExpiredError, TokenUsedError,
                       UnauthorizedError)
from ca.model import CertStatus, GatewayStatus, RevocationReason
from tests.conftest import make_csr


async def test_register_enroll_check_revoke(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as authority:
        token = await gateways.register(authority, "gw-a", actor="operator:test")
        assert token.expires_at == clock.now + authority.config.token_ttl
        (row,) = await gateways.list_gateways(authority)
        assert row.status is GatewayStatus.REGISTERED and row.token_digest != token.secret.encode()
        issued = await gateways.enroll(authority, "gw-a", token.secret, make_csr()[0])
        assert issued.profile == "gateway" and issued.certificate.subject.rfc4514_string() == "CN=gw-a"
        assert (await gateways.active_gateway(authority, issued.serial)).name == "gw-a"
        (row,) = await gateways.list_gateways(authority)
        assert row.status is GatewayStatus.ACTIVE and row.serial == issued.serial and row.token_digest is not None   # kept, spent
        with pytest.raises(TokenUsedError):
            await gateways.enroll(authority, "gw-a", token.secret, make_csr()[0])
        revoked = await gateways.revoke(authority, "gw-a", actor="operator:test",
                                        reason=RevocationReason.keyCompromise)
        assert revoked == [issued.serial]
        record = await authority.certificate(issued.serial)
        assert record.status is CertStatus.REVOKED and record.reason is RevocationReason.keyCompromise
        with pytest.raises(RevokedError):
            await gateways.active_gateway(authority, issued.serial)
        with pytest.raises(PolicyViolationError, match="already revoked"):
            await gateways.revoke(authority, "gw-a", actor="operator:test")
        with pytest.raises(PolicyViolationError, match="certificateHold"):
            await gateways.revoke(authority, "gw-b", actor="t", reason=RevocationReason.certificateHold)
    # nothing takes a gateway out of revoked, not even SQL
    db = sqlite3.connect(ca_home / "iomtca.db")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="revoked gateway stays revoked"):
            db.execute("UPDATE gateways SET status = 'active' WHERE name = 'gw-a'")
    finally:
        db.close()


async def test_refusals_spend_nothing_and_say_little(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as authority:
        token = await gateways.register(authority, "gw-c", actor="operator:test")
        before = len(await authority.certificates())
        with pytest.raises(NotAcceptedError, match="not accepted") as wrong:
            await gateways.enroll(authority, "gw-c", "not-the-token", make_csr()[0])
        with pytest.raises(NotAcceptedError, match="not accepted") as unknown:
            await gateways.enroll(authority, "gw-nobody", token.secret, make_csr()[0])
        assert (type(wrong.value), wrong.value.message) == (type(unknown.value), unknown.value.message)
        weak = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))[0]
        with pytest.raises(KeyPolicyError):
            await gateways.enroll(authority, "gw-c", token.secret, weak)
        assert len(await authority.certificates()) == before
        assert (await gateways.list_gateways(authority))[0].status is GatewayStatus.REGISTERED
        clock.advance(seconds=authority.config.token_ttl.total_seconds() + 1)
        with pytest.raises(TokenExpiredError):
            await gateways.enroll(authority, "gw-c", token.secret, make_csr()[0])
        async with authority.store.read() as tx:
            refused = [r for r in await tx.audit_rows() if r.action == "gateway_enroll_refused"]
            guesses = await tx.count_failures("source", "unknown", clock() - timedelta(days=30))
        # the token's holder's refusals are audited one by one; the two guesses are counted instead
        assert len(refused) == 2 and all(r.actor == "gateway:gw-c" for r in refused)
        assert guesses == 2


async def test_an_enrolled_gateway_name_is_not_told_to_a_stranger(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as authority:
        token = await gateways.register(authority, "gw-e", actor="operator:test")
        await gateways.enroll(authority, "gw-e", token.secret, make_csr()[0])
        with pytest.raises(NotAcceptedError) as stranger:
            await gateways.enroll(authority, "gw-e", "a-guess", make_csr()[0])
        with pytest.raises(NotAcceptedError) as nobody:
            await gateways.enroll(authority, "gw-never", "a-guess", make_csr()[0])
        assert stranger.value.message == nobody.value.message
        with pytest.raises(TokenUsedError, match="already enrolled"):   # the token's holder is told
            await gateways.enroll(authority, "gw-e", token.secret, make_csr()[0])


async def test_one_token_one_certificate_under_concurrency(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as authority:
        token = await gateways.register(authority, "gw-d", actor="operator:test")
        results = await asyncio.gather(*(gateways.enroll(authority, "gw-d", token.secret, make_csr()[0])
                                         for _ in range(5)), return_exceptions=True)
        issued = [r for r in results if not isinstance(r, BaseException)]
        assert len(issued) == 1, results
        assert all(isinstance(r, TokenUsedError) for r in results if isinstance(r, BaseException)), results
        async with authority.store.read() as tx:
            assert [c.serial for c in await tx.gateway_certificates("gw-d")] == [issued[0].serial]


async def test_a_name_has_the_device_id_syntax(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as authority:
        for bad in ("", "a b", "x\nINJECTED", "-lead", "a" * 65):
            with pytest.raises(BadRequestError, match="invalid gateway name"):
                await gateways.register(authority, bad, actor="operator:test")
        assert await gateways.list_gateways(authority) == []
