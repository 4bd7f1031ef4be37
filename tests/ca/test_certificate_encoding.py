"""`build_certificate` encodes the TBSCertificate itself; cryptography's CertificateBuilder is the judge.

For the same inputs the two must produce the same TBSCertificate bytes (the signatures differ:
ECDSA is randomised), for every built-in profile, issuer key type and subject key type.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.issuance import builder_certificate as reference
from ca import profiles
from ca.issuance import SERIAL_BITS, IssuerContext, build_certificate, device_names, new_serial, server_names
from ca.signer import KeySigner, generate_key
from tests.conftest import T0


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hôpital Test")])


def both(**kw):
    return build_certificate(**kw), reference(**kw)


@pytest.mark.parametrize("ca_key_type", ["ec-p256", "ec-p384", "ed25519", "rsa-2048"])
def test_root_and_issuing_ca_match_the_builder(ca_key_type):
    key = generate_key(ca_key_type)
    ours, theirs = both(public_key=key.public_key(), subject=name("Root"), sans=[], profile=profiles.ROOT_CA,
                        issuer=None, serial=new_serial(), now=T0, signer=KeySigner(key))
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes
    assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
    key.public_key().verify(*_signature_args(ours, key))  # signed with the root's own key

    issuing_key = generate_key("ec-p256")
    issuer = IssuerContext(ours, KeySigner(key), (ours,))
    ours, theirs = both(public_key=issuing_key.public_key(), subject=name("Issuing"), sans=[],
                        profile=profiles.ISSUING_CA, issuer=issuer, serial=new_serial(), now=T0,
                        lifetime=timedelta(days=30))
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes


@pytest.fixture(scope="module")
def issuing():
    root_key = generate_key("ec-p256")
    root = build_certificate(public_key=root_key.public_key(), subject=name("Root"), sans=[],
                             profile=profiles.ROOT_CA, issuer=None, serial=new_serial(), now=T0,
                             signer=KeySigner(root_key))
    key = generate_key("ec-p256")
    ca = build_certificate(public_key=key.public_key(), subject=name("Issuing"), sans=[],
                           profile=profiles.ISSUING_CA, issuer=IssuerContext(root, KeySigner(root_key), (root,)),
                           serial=new_serial(), now=T0)
    return IssuerContext(ca, KeySigner(key), (ca, root), crl_url="http://127.0.0.1:8080/crl",
                         ocsp_url="http://127.0.0.1:8080/ocsp", ca_issuers_url="http://127.0.0.1:8080/ca.cer")


@pytest.mark.parametrize("profile", [profiles.DEVICE, profiles.GATEWAY, profiles.SERVER, profiles.OCSP])
@pytest.mark.parametrize("subject_key_type", ["ec-p256", "ec-p384", "ed25519", "rsa-2048"])
def test_end_entity_profiles_match_the_builder(issuing, profile, subject_key_type):
    key = generate_key(subject_key_type)
    if profile is profiles.SERVER:
        subject, sans = server_names(["localhost", "127.0.0.1", "::1"])
    else:
        subject, sans = device_names("pump-7", "hospital.test")
    ours, theirs = both(public_key=key.public_key(), subject=subject, sans=sans, profile=profile,
                        issuer=issuing, serial=new_serial(), now=T0 + timedelta(microseconds=123456))
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes
    issuing.signer.private_key.public_key().verify(*_signature_args(ours, issuing.signer.private_key))


def test_without_revocation_urls_and_with_an_empty_subject(issuing):
    bare = IssuerContext(issuing.certificate, issuing.signer, issuing.chain)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("pump.hospital.test")]
    ours, theirs = both(public_key=key.public_key(), subject=x509.Name([]), sans=sans, profile=profiles.DEVICE,
                        issuer=bare, serial=new_serial(), now=T0)
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes
    assert ours.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_validity_after_2049_uses_generalized_time(issuing):
    key = ec.generate_private_key(ec.SECP256R1())
    later = T0.replace(year=2049, month=12, day=31)
    root_key = generate_key("ec-p256")
    ours, theirs = both(public_key=key.public_key(), subject=name("Long"), sans=[], profile=profiles.ROOT_CA,
                        issuer=None, serial=new_serial(), now=later, signer=KeySigner(root_key),
                        lifetime=timedelta(days=400))
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes
    assert ours.not_valid_after_utc.year == 2051


@pytest.mark.parametrize("serial", [0, -5, 1 << SERIAL_BITS])
def test_serials_outside_rfc5280_are_refused(issuing, serial):
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="serial"):
        build_certificate(public_key=key.public_key(), subject=name("x"), sans=[], profile=profiles.DEVICE,
                          issuer=issuing, serial=serial, now=T0)


def _signature_args(cert: x509.Certificate, key):
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return cert.signature, cert.tbs_certificate_bytes
    if isinstance(key, rsa.RSAPrivateKey):
        return cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
    return cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
