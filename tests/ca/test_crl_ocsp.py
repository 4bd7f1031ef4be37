"""CRL and OCSP builders, read back with cryptography (the openssl judgement is in tests/interop)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from ca.authority import Authority, OperatorAuth
from ca.crl import build_crl
from ca.keystore import load_cert
from ca.model import Revocation, RevocationReason
from ca.registry import new_device
from ca.signer import KeySigner, generate_key
from tests.conftest import T0, make_csr


@pytest.fixture
async def authority(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as a:
        await a.registry.add(new_device("pump-1", model="m", owner="o"), actor="t")
        yield a


def test_crl_entries_and_extensions(ca_home):
    issuer = load_cert(ca_home / "issuing.pem")
    entries = [Revocation(0x10 + i, reason, T0 - timedelta(minutes=i))
               for i, reason in enumerate(RevocationReason) if reason is not RevocationReason.removeFromCRL]
    # an unrelated key cannot make a CRL that verifies against the issuer
    signer = KeySigner(generate_key("ec-p256"))
    der = build_crl(issuer_cert=issuer, signer=signer, entries=entries, number=7,
                    this_update=T0, next_update=T0 + timedelta(hours=24))
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(signer.private_key.public_key())
    assert not crl.is_signature_valid(issuer.public_key())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert crl.next_update_utc == T0 + timedelta(hours=24)
    got = {r.serial_number: r for r in crl}
    assert set(got) == {e.serial for e in entries}
    for e in entries:
        r = got[e.serial]
        assert r.revocation_date_utc == e.revoked_at
        if e.reason is RevocationReason.unspecified:
            assert len(r.extensions) == 0  # RFC 5280 5.3.1: omit "unspecified"
        else:
            assert r.extensions.get_extension_for_class(x509.CRLReason).value.reason == e.reason.flag
    assert crl.public_bytes(serialization.Encoding.DER) == der


def test_empty_crl_omits_revoked_list(ca_home):
    signer = KeySigner(generate_key("ed25519"))
    der = build_crl(issuer_cert=load_cert(ca_home / "issuing.pem"), signer=signer, entries=[], number=1,
                    this_update=T0, next_update=T0 + timedelta(hours=1))
    crl = x509.load_der_x509_crl(der)
    assert len(crl) == 0 and crl.is_signature_valid(signer.private_key.public_key())


async def test_crl_number_monotonic_and_expired_entries_dropped(authority, clock):
    issued = await authority.enroll("pump-1", make_csr()[0], OperatorAuth("t"))
    await authority.revoke(issued.serial, RevocationReason.keyCompromise, actor="t")
    first = x509.load_der_x509_crl(await authority.crl())
    second = x509.load_der_x509_crl(await authority.crl())
    n1 = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    n2 = second.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert n2 > n1
    assert first.get_revoked_certificate_by_serial_number(issued.serial) is not None
    assert first.is_signature_valid(authority.issuer.certificate.public_key())
    clock.advance(hours=73)  # past the device certificate's notAfter
    later = x509.load_der_x509_crl(await authority.crl())
    assert later.get_revoked_certificate_by_serial_number(issued.serial) is None


def _request(cert, issuer, nonce=None, algorithm=None):
    b = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    if nonce:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


async def test_ocsp_good_revoked_nonce_and_delegation(authority, clock):
    issued = await authority.enroll("pump-1", make_csr()[0], OperatorAuth("t"))
    issuer = authority.issuer.certificate
    resp = ocsp.load_der_ocsp_response(await authority.ocsp(_request(issued.certificate, issuer, b"n" * 16)))
    assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"n" * 16
    responder = resp.certificates[0]
    assert responder.issuer == issuer.subject
    assert x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in responder.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    responder.public_key().verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
    await authority.revoke(issued.serial, RevocationReason.keyCompromise, actor="t")
    resp = ocsp.load_der_ocsp_response(
        await authority.ocsp(_request(issued.certificate, issuer, algorithm=hashes.SHA256())))
    assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.key_compromise
    assert resp.hash_algorithm.name == "sha256"


async def test_ocsp_errors(authority):
    malformed = ocsp.load_der_ocsp_response(await authority.ocsp(b"\x30\x03garbage"))
    assert malformed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    issued = await authority.enroll("pump-1", make_csr()[0], OperatorAuth("t"))
    foreign = ocsp.load_der_ocsp_response(await authority.ocsp(_request(issued.certificate, issued.certificate)))
    assert foreign.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    too_long = ocsp.load_der_ocsp_response(
        await authority.ocsp(_request(issued.certificate, authority.issuer.certificate, b"x" * 129)))
    assert too_long.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


async def test_ocsp_responder_rotates_at_two_thirds(authority, clock, ca_home):
    first = (await authority.responder()).certificate
    clock.advance(days=4)  # 7-day responder, 2/3 is about 4.7 days
    assert (await authority.responder()).certificate == first
    clock.advance(days=1)
    second = (await authority.responder()).certificate
    assert second.serial_number != first.serial_number
    assert (await authority.certificate(second.serial_number)).profile == "ocsp"  # on file first
    assert x509.load_pem_x509_certificate((ca_home / "ocsp.pem").read_bytes()) == second
    assert (ca_home / "private" / "ocsp-signer.pem").stat().st_mode & 0o777 == 0o600


ROTATE = """
import asyncio, sys, time
from datetime import datetime
from ca.authority import Authority
due = datetime.fromisoformat(sys.argv[2])
async def main():
    async with await Authority.open(sys.argv[1], clock=lambda: due) as a:
        time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all processes ask at the same moment
        print((await a.responder()).certificate.serial_number)
asyncio.run(main())
"""


def test_processes_that_find_the_responder_due_at_once_rotate_it_once(ca_home, clock):
    """Server workers and the CLI share one CA directory: the first rotates, the others load its work."""
    import sqlite3
    import subprocess
    import sys
    import time
    due, at = (clock() + timedelta(days=6)).isoformat(), str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", ROTATE, str(ca_home), due, at], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    serials = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(serials) == 1, serials
    rows = sqlite3.connect(ca_home / "iomtca.db").execute(
        "SELECT count(*) FROM certificates WHERE profile = 'ocsp'").fetchone()[0]
    assert rows == 2  # the one made at init, and one rotation


async def test_coroutines_that_find_the_responder_due_at_once_rotate_it_once(authority, clock):
    import asyncio
    await authority.responder()
    clock.advance(days=6)
    found = await asyncio.gather(*(authority.responder() for _ in range(5)))
    assert len({r.certificate.serial_number for r in found}) == 1
    assert len([c for c in await authority.certificates() if c.profile == "ocsp"]) == 2


async def test_processes_serving_one_ca_publish_one_crl_series(ca_home, clock):
    """Two Authorities over one CA directory, as two server workers: after a revocation either may
    sign first, the other publishes that same CRL, and the numbers a client sees never go down."""
    from ca.model import RevocationReason as R
    async with await Authority.open(ca_home, clock=clock) as a, await Authority.open(ca_home, clock=clock) as b:
        await a.registry.add(new_device("pump-1", model="m", owner="o"), actor="t")
        issued = await a.enroll("pump-1", make_csr()[0], OperatorAuth("t"))
        first_a, first_b = await a.current_crl(), await b.current_crl()
        assert first_a == first_b
        await b.revoke(issued.serial, R.keyCompromise, actor="t")
        after_a, after_b = await a.current_crl(), await b.current_crl()
        assert after_a == after_b  # b found a's CRL covers the revocation and did not sign its own
        crl = x509.load_der_x509_crl(after_b)
        assert crl.get_revoked_certificate_by_serial_number(issued.serial) is not None
        numbers = [x509.load_der_x509_crl(d).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
                   for d in (first_a, after_a)]
        assert numbers[1] > numbers[0]
        clock.advance(hours=13)  # past half of a 24 h CRL: a new one, again shared
        later_b, later_a = await b.current_crl(), await a.current_crl()
        assert later_a == later_b != after_a
        # an explicit signing (iomtca crl) beats a lower number signed in the meantime
        explicit = await a.crl()
        assert await b.current_crl() == explicit
