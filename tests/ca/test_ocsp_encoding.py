"""`build_response` encodes the OCSP response itself; cryptography's OCSPResponseBuilder is the judge.

For the same inputs both must produce the same ResponseData bytes and the same response around
them (signatures differ: ECDSA is randomised), for every status and reason, every CertID hash,
with and without a nonce, and for every responder key type. openssl's and pkilint's judgements of
served responses are in tests/interop.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from ca import ocsp as ocsp_mod
from ca.model import CertStatus, RevocationReason
from ca.signer import KeySigner, generate_key
from tests.conftest import T0

NOW = T0.replace(microsecond=0)


def make_cert(subject: str, key, issuer_key, issuer: str, *, ocsp_signing: bool = False) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30)))
    if ocsp_signing:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


ISSUER_KEY = generate_key("ec-p256")
ISSUER = make_cert("Issuing CA", ISSUER_KEY, ISSUER_KEY, "Issuing CA")


def responder(key_type: str) -> tuple[x509.Certificate, KeySigner]:
    key = generate_key(key_type)
    return make_cert("OCSP responder", key, ISSUER_KEY, "Issuing CA", ocsp_signing=True), KeySigner(key)


def reference(*, serial, answer, issuer_cert, responder_cert, responder_signer, this_update, next_update,
              hash_algorithm=None, nonce=None) -> bytes:
    """What ca/ocsp.py did before it encoded responses itself: cryptography's builder."""
    algorithm = hash_algorithm or hashes.SHA1()
    name_hash, key_hash = ocsp_mod.issuer_hashes(issuer_cert, algorithm)
    if answer.status is None:
        status, revoked_at, reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
    elif answer.status is CertStatus.GOOD:
        status, revoked_at, reason = ocsp.OCSPCertStatus.GOOD, None, None
    else:
        status, revoked_at = ocsp.OCSPCertStatus.REVOKED, answer.revoked_at
        r = answer.reason or RevocationReason.unspecified
        reason = None if r is RevocationReason.unspecified else r.flag
    builder = (ocsp.OCSPResponseBuilder()
               .add_response_by_hash(name_hash, key_hash, serial, algorithm, status, this_update, next_update,
                                     revoked_at, reason)
               .responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
               .certificates([responder_cert]))
    if nonce is not None and len(nonce) <= ocsp_mod.NONCE_ECHO_MAX:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.sign(responder_signer.private_key, responder_signer.hash_algorithm).public_bytes(
        serialization.Encoding.DER)


def compare(**kw) -> ocsp.OCSPResponse:
    ours = ocsp.load_der_ocsp_response(ocsp_mod.build_response(**kw))
    theirs = ocsp.load_der_ocsp_response(reference(**kw))
    # the builder stamps producedAt with the wall clock; ours is this_update: compare with it set alike
    tbs = theirs.tbs_response_bytes
    stamp = theirs.produced_at_utc.strftime("%Y%m%d%H%M%SZ").encode()
    assert tbs.count(stamp) >= 1
    expected = tbs.replace(b"\x18\x0f" + stamp, b"\x18\x0f" + kw["this_update"].strftime("%Y%m%d%H%M%SZ").encode(), 1)
    assert ours.tbs_response_bytes == expected
    assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
    assert [c.public_bytes(serialization.Encoding.DER) for c in ours.certificates] == \
        [c.public_bytes(serialization.Encoding.DER) for c in theirs.certificates]
    assert ours.produced_at_utc == kw["this_update"]
    _verify(ours, kw["responder_cert"].public_key())
    return ours


def _verify(resp: ocsp.OCSPResponse, key) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(resp.signature, resp.tbs_response_bytes)
    else:
        key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), resp.signature_hash_algorithm)


ANSWERS = [ocsp_mod.OCSPAnswer(CertStatus.GOOD), ocsp_mod.OCSPAnswer(None),
           *(ocsp_mod.OCSPAnswer(CertStatus.REVOKED, NOW - timedelta(hours=3), reason) for reason in RevocationReason),
           ocsp_mod.OCSPAnswer(CertStatus.REVOKED, NOW - timedelta(minutes=1), None),
           ocsp_mod.OCSPAnswer(CertStatus.HOLD, NOW - timedelta(minutes=5), RevocationReason.certificateHold)]


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "ed25519", "rsa-2048"])
def test_every_responder_key_type_matches_the_builder(key_type):
    cert, signer = responder(key_type)
    compare(serial=0x1234, answer=ANSWERS[0], issuer_cert=ISSUER, responder_cert=cert, responder_signer=signer,
            this_update=NOW, next_update=NOW + timedelta(hours=4))


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: f"{a.status}-{a.reason}")
def test_every_status_and_reason_matches_the_builder(answer):
    cert, signer = responder("ec-p256")
    resp = compare(serial=0x5EED, answer=answer, issuer_cert=ISSUER, responder_cert=cert, responder_signer=signer,
                   this_update=NOW, next_update=NOW + timedelta(hours=4))
    if answer.status is CertStatus.GOOD:
        assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    elif answer.status is None:
        assert resp.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    else:
        assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert resp.revocation_time_utc == answer.revoked_at


@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA224(), hashes.SHA256(), hashes.SHA384(),
                                       hashes.SHA512()], ids=lambda a: a.name)
@pytest.mark.parametrize("nonce", [None, b"\x01", b"n" * 16, b"n" * 32, b"n" * 33], ids=repr)
def test_every_certid_hash_and_nonce_matches_the_builder(algorithm, nonce):
    cert, signer = responder("ec-p256")
    resp = compare(serial=7, answer=ANSWERS[0], issuer_cert=ISSUER, responder_cert=cert, responder_signer=signer,
                   this_update=NOW, next_update=NOW + timedelta(hours=4), hash_algorithm=algorithm, nonce=nonce)
    assert resp.hash_algorithm.name == algorithm.name
    echoed = [e.value.nonce for e in resp.extensions if isinstance(e.value, x509.OCSPNonce)]
    assert echoed == ([nonce] if nonce is not None and len(nonce) <= 32 else [])


RESPONDER = responder("ec-p256")


@settings(max_examples=60, deadline=None)
@given(serial=st.integers(min_value=1, max_value=2 ** 159 - 1),
       this_update=st.datetimes(min_value=datetime(1951, 1, 1), max_value=datetime(9998, 1, 1),
                                timezones=st.just(timezone.utc)),
       validity=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=365)))
def test_any_serial_and_time_matches_the_builder(serial, this_update, validity):
    this_update = this_update.replace(microsecond=0)
    compare(serial=serial, answer=ANSWERS[0], issuer_cert=ISSUER, responder_cert=RESPONDER[0],
            responder_signer=RESPONDER[1], this_update=this_update, next_update=this_update + validity)


def test_sub_second_times_are_truncated_as_the_builder_does():
    cert, signer = responder("ec-p256")
    at = NOW + timedelta(microseconds=987654)
    compare(serial=9, answer=ocsp_mod.OCSPAnswer(CertStatus.REVOKED, at, RevocationReason.keyCompromise),
            issuer_cert=ISSUER, responder_cert=cert, responder_signer=signer, this_update=NOW,
            next_update=at + timedelta(hours=1))
