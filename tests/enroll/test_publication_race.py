"""The publisher's caches against status changes that land while an answer is being made.

Forced interleavings, not timing: the real Authority's status read (`ocsp_answer`) or CRL fetch
(`current_crl`) is wrapped so that a revocation commits, and the follower applies it, exactly
between the store read and the moment the publisher keeps the result.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as x509_ocsp

from ca.authority import Authority, TokenAuth
from ca.model import RevocationReason
from ca.registry import new_device
from enroll import publication
from enroll.publication import Publisher
from tests.conftest import make_csr

REVOKED = x509_ocsp.OCSPCertStatus.REVOKED
GOOD = x509_ocsp.OCSPCertStatus.GOOD


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    yield a
    await a.close()


@pytest.fixture
async def publisher(authority):
    p = Publisher(authority, cache_size=100, poll=timedelta(seconds=3600))   # no follower task: we drive it
    await p.start()
    return p


async def issue(authority, device_id: str) -> x509.Certificate:
    token = await authority.registry.add(new_device(device_id, model="infusion-pump", owner="ICU"), actor="test")
    issued = await authority.enroll(device_id, make_csr()[0], TokenAuth(token.secret))
    return issued.certificate


def status(der: bytes) -> x509_ocsp.OCSPCertStatus:
    resp = x509_ocsp.load_der_ocsp_response(der)
    assert resp.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp.certificate_status


def ocsp_request(authority, cert: x509.Certificate) -> bytes:
    req = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, authority.issuer.certificate, hashes.SHA1()).build()
    return req.public_bytes(serialization.Encoding.DER)


class Counter:
    """Wraps one coroutine method of the real authority (instance attribute), counting calls and
    running `between` (once, when armed) after the real call returned and before its caller goes on."""

    def __init__(self, monkeypatch, authority, name: str) -> None:
        self.calls, self.between = 0, None
        real = getattr(authority, name)

        async def wrapped(*args, **kwargs):
            self.calls += 1
            result = await real(*args, **kwargs)
            between, self.between = self.between, None
            if between is not None:
                await between()
            return result

        monkeypatch.setattr(authority, name, wrapped)


@pytest.mark.parametrize("via", ["cached", "answer"])
async def test_revocation_applied_while_signing_never_leaves_good_cached(authority, publisher, monkeypatch, via):
    cert = await issue(authority, "pump-1")
    serial = cert.serial_number
    reads = Counter(monkeypatch, authority, "ocsp_answer")   # the status read inside ocsp_response
    request = ocsp_request(authority, cert)

    async def revoke_and_apply():
        # the status "good" has been read, the response is not signed or cached yet: the
        # revocation commits and the follower applies it (pops nothing, advances its change id)
        await authority.revoke(serial, RevocationReason.keyCompromise, actor="test")
        await publisher.refresh_once()

    reads.between = revoke_and_apply
    first = await (publisher.cached(serial) if via == "cached" else publisher.ocsp(request))
    assert reads.calls == 2, "the answer overtaken by the revocation must be signed again"
    assert status(first) is REVOKED
    # what is kept: the cached-hit path (catch_up finds nothing new) and the fast path of answer()
    assert status(await publisher.cached(serial)) is REVOKED
    assert status(await publisher.ocsp(request)) is REVOKED
    assert status(await publisher.ocsp(request)) is REVOKED   # now by the request bytes, no parsing
    assert reads.calls == 2


async def test_revocation_applied_after_the_insert_pops_the_entry(authority, publisher, monkeypatch):
    """The other order: the status read misses the revocation, the answer is cached, and the
    follower applies the change only afterwards; its pop must then remove what was cached."""
    serial = (await issue(authority, "pump-1")).serial_number
    reads = Counter(monkeypatch, authority, "ocsp_answer")

    async def revoke_only():
        await authority.revoke(serial, RevocationReason.keyCompromise, actor="test")

    reads.between = revoke_only
    assert status(await publisher.cached(serial)) is GOOD   # read before the revocation committed
    await publisher.refresh_once()
    assert status(await publisher.cached(serial)) is REVOKED
    assert reads.calls == 2


async def test_a_cached_hit_is_not_signed_again(authority, publisher, monkeypatch):
    cert = await issue(authority, "pump-1")
    serial = cert.serial_number
    signings = Counter(monkeypatch, authority, "ocsp_signed")
    store_reads = Counter(monkeypatch, authority, "last_status_change")
    request = ocsp_request(authority, cert)
    first = await publisher.cached(serial)
    assert status(first) is GOOD and signings.calls == 1 and store_reads.calls == 0   # a miss: no catch-up read
    for _ in range(3):
        assert await publisher.cached(serial) == first
    assert store_reads.calls == 3   # a cached hit: the one catch-up read it always had
    der, published = await publisher.answer(request)   # CertID SHA-1: the same entry
    assert der == first and published is not None and published.der == first
    for _ in range(3):
        der, published = await publisher.answer(request)   # the fast path: request bytes -> entry
        assert der == first and published.der == first
    assert signings.calls == 1 and store_reads.calls == 4


async def test_overtaken_every_time_answers_without_caching(authority, publisher, monkeypatch):
    """A change (of another certificate) applied during every signing: the answer is given after
    SIGN_ATTEMPTS signings, from the latest read, and not cached; the next lookup signs and caches."""
    serial = (await issue(authority, "pump-1")).serial_number
    others = [(await issue(authority, f"pump-{i}")).serial_number for i in range(2, 2 + publication.SIGN_ATTEMPTS)]
    signings = Counter(monkeypatch, authority, "ocsp_answer")
    before = publisher.last_change

    async def churn():
        await authority.revoke(others.pop(), RevocationReason.superseded, actor="test")
        await publisher.refresh_once()
        if others:
            signings.between = churn

    signings.between = churn
    assert status(await publisher.cached(serial)) is GOOD
    assert signings.calls == publication.SIGN_ATTEMPTS and not others
    assert publisher.last_change == before + publication.SIGN_ATTEMPTS
    assert status(await publisher.cached(serial)) is GOOD
    assert signings.calls == publication.SIGN_ATTEMPTS + 1   # was not cached: signed once more, now kept
    await publisher.cached(serial)
    assert signings.calls == publication.SIGN_ATTEMPTS + 1


def crl_lists(der: bytes, serial: int) -> bool:
    return x509.load_der_x509_crl(der).get_revoked_certificate_by_serial_number(serial) is not None


async def test_crl_fetched_before_a_change_is_replaced_once_it_is_applied(authority, monkeypatch):
    """A CRL fetch in flight when a change is applied: the follower's forced re-signing waits for
    the CRL lock and replaces it, so the old CRL is never what crl() keeps serving."""
    serial = (await issue(authority, "pump-1")).serial_number
    publisher = Publisher(authority, cache_size=100, poll=timedelta(seconds=3600))
    fetches = Counter(monkeypatch, authority, "current_crl")
    follower: list[asyncio.Task] = []
    resigning = asyncio.Event()
    real_crl = publisher.crl

    async def crl(force: bool = False):
        if force:
            resigning.set()   # the follower has applied the change and now asks for the CRL lock
        return await real_crl(force)

    monkeypatch.setattr(publisher, "crl", crl)

    async def revoke_and_follow():
        await authority.revoke(serial, RevocationReason.keyCompromise, actor="test")
        follower.append(asyncio.create_task(publisher.refresh_once()))
        await asyncio.wait_for(resigning.wait(), 30)   # it waits for the lock this fetch holds
        assert publisher.last_change == await authority.last_status_change()

    fetches.between = revoke_and_follow
    await publisher.start()   # its CRL was fetched before the revocation
    await follower[0]
    assert crl_lists((await publisher.crl()).der, serial)
    assert fetches.calls == 2


async def test_crl_re_signing_that_failed_is_retried(authority, publisher, monkeypatch):
    """A change applied whose CRL re-signing failed: the old CRL must not be kept until it goes
    stale; the next crl() (or the next poll) fetches one that covers the change."""
    serial = (await issue(authority, "pump-1")).serial_number
    fetches = Counter(monkeypatch, authority, "current_crl")
    old = (await publisher.crl()).der
    assert not crl_lists(old, serial) and fetches.calls == 0
    await authority.revoke(serial, RevocationReason.keyCompromise, actor="test")

    async def fail():
        raise OSError("disk full")

    fetches.between = fail
    with pytest.raises(OSError):
        await publisher.refresh_once()   # the follower would log this and poll again
    assert publisher.last_change == await authority.last_status_change()
    assert status(await publisher.cached(serial)) is REVOKED   # OCSP is right already
    assert crl_lists((await publisher.crl()).der, serial)
    assert fetches.calls == 2


async def test_crl_re_signing_that_failed_is_retried_by_the_next_poll(authority, publisher, monkeypatch):
    serial = (await issue(authority, "pump-1")).serial_number
    fetches = Counter(monkeypatch, authority, "current_crl")
    await authority.revoke(serial, RevocationReason.keyCompromise, actor="test")

    async def fail():
        raise OSError("disk full")

    fetches.between = fail
    with pytest.raises(OSError):
        await publisher.refresh_once()
    await publisher.refresh_once()   # no new change: re-signs only because the CRL is behind
    assert fetches.calls == 2
    assert crl_lists(publisher._crl.der, serial)


async def issued_with_seen(authority, publisher, device_id: str, **kw):
    token = await authority.registry.add(new_device(device_id, model="infusion-pump", owner="ICU"), actor="test")
    seen = publisher.last_change   # what the RA batch handler reads before the issuance
    return await authority.enroll(device_id, make_csr()[0], TokenAuth(token.secret), **kw), seen


async def test_a_new_certificate_is_answered_good_without_a_status_read_and_cached(authority, publisher, monkeypatch):
    reads = Counter(monkeypatch, authority, "ocsp_answer")
    signings = Counter(monkeypatch, authority, "ocsp_signed")
    issued, seen = await issued_with_seen(authority, publisher, "pump-1")
    der = await publisher.issued(issued, seen)
    assert status(der) is GOOD and reads.calls == 0 and signings.calls == 1
    resp = x509_ocsp.load_der_ocsp_response(der)
    assert resp.serial_number == issued.serial
    assert await publisher.cached(issued.serial) == der and signings.calls == 1   # kept: not signed again


async def test_a_change_applied_since_the_issuance_began_keeps_the_answer_out_of_the_cache(authority, publisher):
    issued, seen = await issued_with_seen(authority, publisher, "pump-1")
    # the new certificate is revoked and the follower applies it before its OCSP answer is made
    await authority.revoke(issued.serial, RevocationReason.keyCompromise, actor="test")
    await publisher.refresh_once()
    assert status(await publisher.issued(issued, seen)) is GOOD   # true when issued, handed out with it
    assert status(await publisher.cached(issued.serial)) is REVOKED   # but never cached as good


async def test_a_repeated_request_gets_the_status_it_has_now(authority, publisher):
    issued, _ = await issued_with_seen(authority, publisher, "pump-1", request_id="r1")
    await authority.revoke(issued.serial, RevocationReason.keyCompromise, actor="test")
    await publisher.refresh_once()
    # the device repeats its request id (its token is spent): the same certificate, revoked by now
    seen = publisher.last_change
    again = await authority.enroll("pump-1", make_csr()[0], TokenAuth("spent"), request_id="r1")
    assert again.serial == issued.serial and not again.new
    assert status(await publisher.issued(again, seen)) is REVOKED


def _request_for(authority, serial: int) -> bytes:
    from ca.ocsp import issuer_hashes
    name_hash, key_hash = issuer_hashes(authority.issuer.certificate, hashes.SHA1())
    return x509_ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)


async def test_serials_never_issued_are_signed_within_a_limit_per_source_and_never_cached(authority, monkeypatch):
    limit = publication.UNKNOWN_PER_MINUTE
    cert = await issue(authority, "pump-1")
    publisher = Publisher(authority, cache_size=3, poll=timedelta(seconds=3600))
    await publisher.start()
    real = await publisher.answer(ocsp_request(authority, cert), "198.51.100.1")
    signings = Counter(monkeypatch, authority, "ocsp_signed")
    for n in range(limit):
        der, published = await publisher.answer(_request_for(authority, 0x7000 + n), "198.51.100.1")
        assert published is None and status(der) is x509_ocsp.OCSPCertStatus.UNKNOWN
    assert signings.calls == limit
    over = x509_ocsp.load_der_ocsp_response((await publisher.answer(_request_for(authority, 0x6FFF), "198.51.100.1"))[0])
    assert over.response_status is x509_ocsp.OCSPResponseStatus.UNAUTHORIZED and signings.calls == limit   # unsigned
    other = (await publisher.answer(_request_for(authority, 0x6FFF), "203.0.113.2"))[0]
    assert status(other) is x509_ocsp.OCSPCertStatus.UNKNOWN   # another source has its own allowance
    # the flood pushed nothing out: the real answer is served from the cache, not signed again
    again = await publisher.answer(ocsp_request(authority, cert), "198.51.100.1")
    assert again[0] == real[0] and signings.calls == limit + 1
