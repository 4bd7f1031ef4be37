"""openssl as an independent judge of certificates, CRLs and OCSP responses.

Device certificates are issued through the admin CLI (`iomtca cert issue`)
from CSRs made by `openssl req`; CRLs come from `iomtca crl --out`; OCSP
requests are made by `openssl ocsp -reqout` and answered in-process by
`Authority.ocsp` (what the HTTP listener calls). openssl then decides.

Note on `openssl ocsp`: when -cert (or -serial) is given, openssl builds its
own request (with a fresh nonce unless -no_nonce) and ignores -reqin, so a
status check and a nonce check cannot share one command line. Status is
checked with `-cert ... -no_nonce`, the nonce echo with `-reqin req.der`.
"""
from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from ca.signer import KEY_TYPES

BRIEF_KEY_TYPES = ("ec-p256", "ec-p384", "ed25519", "rsa-2048", "rsa-3072")
PUBLIC_KEY_CLASS = {
    "ec-p256": (ec.EllipticCurvePublicKey, 256), "ec-p384": (ec.EllipticCurvePublicKey, 384),
    "ed25519": (ed25519.Ed25519PublicKey, None),
    "rsa-2048": (rsa.RSAPublicKey, 2048), "rsa-3072": (rsa.RSAPublicKey, 3072),
}


def both(proc) -> str:
    return proc.stdout + proc.stderr


def verify_cmd(ca, dev, *extra):
    return ["openssl", "verify", "-x509_strict", *extra, "-CAfile", ca.root, "-untrusted", ca.issuing, dev.leaf]


def crl_entries_text(text: str) -> dict[int, str]:
    """`openssl crl -text` revoked entries: serial -> reason text ('' when absent)."""
    entries = {}
    if "Revoked Certificates:" not in text:
        return entries
    body = text.split("Revoked Certificates:", 1)[1].split("Signature Algorithm:", 1)[0]
    for block in body.split("Serial Number:")[1:]:
        lines = [line.strip() for line in block.strip().splitlines()]
        reason = ""
        if "X509v3 CRL Reason Code:" in lines:
            reason = lines[lines.index("X509v3 CRL Reason Code:") + 1]
        entries[int(lines[0], 16)] = reason
    return entries


def openssl_crl_number(sh, crl) -> int:
    out = sh(["openssl", "crl", "-inform", "DER", "-in", crl.der, "-noout", "-crlnumber"]).stdout
    match = re.fullmatch(r"crlNumber=(0x[0-9A-Fa-f]+)\s*", out)
    assert match, out
    return int(match.group(1), 16)


# -- certificates --------------------------------------------------------------


def test_parametrized_key_types_cover_every_init_key_type():
    # The parametrization below runs over ca.signer.KEY_TYPES (what `iomtca init --key-type`
    # accepts); the five the interop requirement names must all be among them.
    assert set(BRIEF_KEY_TYPES) <= set(KEY_TYPES)


@pytest.mark.parametrize("csr_form", ["pem", "der"])
def test_cli_issued_device_cert_verifies(ca, sh, csr_form):
    # The installed `iomtca` executable, in a subprocess, as an operator runs it.
    dev = ca.new_device_cert(key="ec", der_csr=csr_form == "der", subprocess_=True)
    out = sh(verify_cmd(ca, dev, "-purpose", "sslclient"))
    assert out.stdout.strip() == f"{dev.leaf}: OK"
    # The bundle the CLI wrote is device cert + issuing CA, in that order.
    bundle = x509.load_pem_x509_certificates(dev.bundle.read_bytes())
    assert [c.subject for c in bundle] == [dev.cert.subject, ca.issuing_cert.subject]


@pytest.mark.parametrize("device_key", ["rsa", "ed25519"])
def test_cli_issued_cert_for_other_device_key_types_verifies(ca, sh, device_key):
    dev = ca.new_device_cert(key=device_key)
    assert sh(verify_cmd(ca, dev)).stdout.strip() == f"{dev.leaf}: OK"


def test_openssl_is_a_real_judge(ca, sh, foreign_ca):
    """Negative controls: the same verify command refuses a wrong anchor and a wrong purpose."""
    dev = ca.new_device_cert()
    foreign_root, _ = foreign_ca
    wrong_anchor = sh(["openssl", "verify", "-CAfile", foreign_root, "-untrusted", ca.issuing, dev.leaf], check=False)
    assert wrong_anchor.returncode != 0
    assert "unable to get local issuer certificate" in both(wrong_anchor)
    # clientAuth only: openssl must refuse it for a TLS server.
    server_purpose = sh(verify_cmd(ca, dev, "-purpose", "sslserver"), check=False)
    assert server_purpose.returncode != 0
    assert "unsuitable certificate purpose" in both(server_purpose)


def test_device_cert_fields(ca, sh):
    dev = ca.new_device_cert()
    cert, issuer = dev.cert, ca.issuing_cert
    spiffe = f"spiffe://{ca.trust_domain}/device/{dev.device_id}"

    # Subject: CN = device id, nothing else.
    assert [(a.oid, a.value) for a in cert.subject] == [(NameOID.COMMON_NAME, dev.device_id)]
    # Exactly one SAN, the device's SPIFFE ID (an X.509-SVID).
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(spiffe)]
    assert san.critical is False
    # EKU clientAuth (and only that).
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # Serial: positive, at least 64 bits, at most 20 octets (RFC 5280 4.1.2.2).
    assert cert.serial_number > 0
    assert 64 <= cert.serial_number.bit_length() <= 159
    # Not after the issuer; issued by the issuing CA.
    assert cert.not_valid_after_utc <= issuer.not_valid_after_utc
    assert cert.not_valid_before_utc < datetime.now(timezone.utc) < cert.not_valid_after_utc
    assert cert.issuer == issuer.subject
    # AIA (OCSP + caIssuers) and CRL distribution point.
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    methods = {d.access_method for d in aia}
    assert {AuthorityInformationAccessOID.OCSP, AuthorityInformationAccessOID.CA_ISSUERS} <= methods
    for d in aia:
        assert d.access_location.value.startswith("http://")
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert len(cdp) == 1 and cdp[0].full_name[0].value.startswith("http://")
    # The certified key is the one in the CSR openssl made (the device's key).
    assert (sh(["openssl", "x509", "-in", dev.leaf, "-noout", "-pubkey"]).stdout
            == sh(["openssl", "req", "-in", dev.csr, "-noout", "-pubkey"]).stdout)

    # The same facts as openssl reads them.
    text = sh(["openssl", "x509", "-in", dev.leaf, "-noout", "-subject", "-serial", "-nameopt", "RFC2253",
               "-ext", "subjectAltName,extendedKeyUsage,authorityInfoAccess,crlDistributionPoints"]).stdout
    assert f"subject=CN={dev.device_id}\n" in text
    serial_line = re.search(r"^serial=([0-9A-F]+)$", text, re.M)
    assert serial_line and int(serial_line.group(1), 16) == cert.serial_number
    assert re.search(rf"^\s+URI:{re.escape(spiffe)}$", text, re.M)
    assert "TLS Web Client Authentication" in text
    assert "OCSP - URI:http" in text and "CA Issuers - URI:http" in text
    assert "Full Name:" in text
    purpose = sh(["openssl", "x509", "-in", dev.leaf, "-noout", "-purpose"]).stdout
    assert "SSL client : Yes" in purpose and "SSL server : No" in purpose


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_ca_key_type_chain_and_crl_verify(ca_for_key_type, sh, key_type):
    kca = ca_for_key_type(key_type)
    cls, size = PUBLIC_KEY_CLASS[key_type]
    for path in (kca.root, kca.issuing, kca.ocsp_cert):
        key = x509.load_pem_x509_certificate(path.read_bytes()).public_key()
        assert isinstance(key, cls), (path, key)
        if size is not None:
            assert key.key_size == size
    dev = kca.new_device_cert()
    assert sh(verify_cmd(kca, dev, "-purpose", "sslclient")).stdout.strip() == f"{dev.leaf}: OK"
    san = dev.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{kca.trust_domain}/device/{dev.device_id}")]

    revoked = kca.new_device_cert()
    kca.revoke(revoked, "keyCompromise")
    crl = kca.crl()
    out = sh(["openssl", "crl", "-inform", "DER", "-in", crl.der, "-CAfile", kca.chain, "-noout", "-verify"])
    assert "verify OK" in both(out)
    good = sh(verify_cmd(kca, dev, "-crl_check", "-CRLfile", crl.pem))
    assert good.stdout.strip() == f"{dev.leaf}: OK"
    bad = sh(verify_cmd(kca, revoked, "-crl_check", "-CRLfile", crl.pem), check=False)
    assert bad.returncode != 0 and "certificate revoked" in both(bad)


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_every_ca_key_type_ocsp_response_verifies(ca_for_key_type, sh, key_type):
    kca = ca_for_key_type(key_type)
    dev = kca.new_device_cert()
    req, resp = await kca.ocsp_roundtrip(dev)
    out = sh(["openssl", "ocsp", "-respin", resp, "-VAfile", kca.ocsp_cert, "-CAfile", kca.chain,
              "-issuer", kca.issuing, "-cert", dev.leaf, "-no_nonce"])
    assert f"{dev.leaf}: good" in out.stdout and "Response verify OK" in out.stderr
    nonce = sh(["openssl", "ocsp", "-reqin", req, "-respin", resp, "-VAfile", kca.ocsp_cert, "-CAfile", kca.chain])
    assert "Response verify OK" in nonce.stderr and "nonce" not in nonce.stderr.lower()


# -- CRL -----------------------------------------------------------------------


def test_crl_signature_verifies(ca, sh, foreign_ca):
    crl = ca.crl(subprocess_=True)
    out = sh(["openssl", "crl", "-inform", "DER", "-in", crl.der, "-CAfile", ca.chain, "-noout", "-verify"])
    assert "verify OK" in both(out)
    # Negative control: against an unrelated CA openssl refuses the same CRL.
    foreign_root, _ = foreign_ca
    refused = sh(["openssl", "crl", "-inform", "DER", "-in", crl.der, "-CAfile", foreign_root, "-noout",
                  "-verify"], check=False)
    assert "verify OK" not in both(refused)
    # Issuer and AKI tie the CRL to the issuing CA; v2 with the two mandatory-ish extensions.
    issuer = ca.issuing_cert
    assert crl.crl.issuer == issuer.subject
    aki = crl.crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.crl.next_update_utc > crl.crl.last_update_utc
    text = sh(["openssl", "crl", "-inform", "DER", "-in", crl.der, "-noout", "-text"]).stdout
    assert "Version 2 (0x1)" in text


def test_crl_number_is_monotonic(ca, sh):
    first, second = ca.crl(subprocess_=True), ca.crl(subprocess_=True)
    n1, n2 = openssl_crl_number(sh, first), openssl_crl_number(sh, second)
    assert n2 > n1 >= 1
    assert first.crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == n1
    assert second.crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == n2
    assert second.crl.last_update_utc >= first.crl.last_update_utc


def test_crl_check_passes_good_and_fails_revoked(ca, sh):
    good, bad = ca.new_device_cert(), ca.new_device_cert()
    ca.revoke(bad, "keyCompromise", subprocess_=True)
    crl = ca.crl(subprocess_=True)
    ok = sh(verify_cmd(ca, good, "-crl_check", "-CRLfile", crl.pem))
    assert ok.stdout.strip() == f"{good.leaf}: OK"
    refused = sh(verify_cmd(ca, bad, "-crl_check", "-CRLfile", crl.pem), check=False)
    assert refused.returncode != 0
    assert "certificate revoked" in both(refused)


REASONS = [
    # (CLI --reason, cryptography flag, openssl -text spelling)
    ("keyCompromise", x509.ReasonFlags.key_compromise, "Key Compromise"),
    ("superseded", x509.ReasonFlags.superseded, "Superseded"),
    ("cessationOfOperation", x509.ReasonFlags.cessation_of_operation, "Cessation Of Operation"),
    ("affiliationChanged", x509.ReasonFlags.affiliation_changed, "Affiliation Changed"),
    ("privilegeWithdrawn", x509.ReasonFlags.privilege_withdrawn, "Privilege Withdrawn"),
]


@pytest.mark.parametrize("cli_reason, flag, text_reason", REASONS, ids=[r[0] for r in REASONS])
def test_revoked_serial_in_crl_with_reason(ca, sh, cli_reason, flag, text_reason):
    dev = ca.new_device_cert()
    ca.revoke(dev, cli_reason)
    crl = ca.crl()
    entry = crl.crl.get_revoked_certificate_by_serial_number(dev.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is flag
    text = sh(["openssl", "crl", "-inform", "DER", "-in", crl.der, "-noout", "-text"]).stdout
    assert crl_entries_text(text)[dev.serial] == text_reason


def test_unspecified_reason_is_left_out_of_the_entry(ca, sh):
    # RFC 5280 5.3.1: reasonCode unspecified SHOULD be absent.
    dev = ca.new_device_cert()
    ca.revoke(dev)  # CLI default reason: unspecified
    crl = ca.crl()
    entry = crl.crl.get_revoked_certificate_by_serial_number(dev.serial)
    assert entry is not None and len(entry.extensions) == 0
    text = sh(["openssl", "crl", "-inform", "DER", "-in", crl.der, "-noout", "-text"]).stdout
    assert crl_entries_text(text)[dev.serial] == ""


def test_hold_is_listed_and_release_removes_it(ca, sh):
    dev = ca.new_device_cert()
    ca.hold(dev, subprocess_=True)
    held = ca.crl()
    entry = held.crl.get_revoked_certificate_by_serial_number(dev.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.certificate_hold
    text = sh(["openssl", "crl", "-inform", "DER", "-in", held.der, "-noout", "-text"]).stdout
    assert crl_entries_text(text)[dev.serial] == "Certificate Hold"
    on_hold = sh(verify_cmd(ca, dev, "-crl_check", "-CRLfile", held.pem), check=False)
    assert on_hold.returncode != 0 and "certificate revoked" in both(on_hold)

    ca.release(dev, subprocess_=True)
    after = ca.crl()
    assert after.crl.get_revoked_certificate_by_serial_number(dev.serial) is None
    assert openssl_crl_number(sh, after) > openssl_crl_number(sh, held)
    text = sh(["openssl", "crl", "-inform", "DER", "-in", after.der, "-noout", "-text"]).stdout
    assert dev.serial not in crl_entries_text(text)
    released = sh(verify_cmd(ca, dev, "-crl_check", "-CRLfile", after.pem))
    assert released.stdout.strip() == f"{dev.leaf}: OK"


# -- OCSP ----------------------------------------------------------------------


def ocsp_status(sh, ca, resp, target, *extra) -> str:
    """openssl's verdict on a response for one certificate (or serial): stdout, after asserting
    the signature and the delegated responder verified."""
    what = ["-cert", target.leaf] if hasattr(target, "leaf") else ["-serial", hex(target)]
    out = sh(["openssl", "ocsp", "-respin", resp, "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain,
              "-issuer", ca.issuing, *extra, *what, "-no_nonce"])
    assert "Response verify OK" in out.stderr, out.stderr
    return out.stdout


async def test_ocsp_good_with_nonce(ca, sh):
    dev = ca.new_device_cert()
    req, resp = await ca.ocsp_roundtrip(dev, nonce=True)
    status = ocsp_status(sh, ca, resp, dev)
    assert status.startswith(f"{dev.leaf}: good\n")
    assert "This Update:" in status and "Next Update:" in status

    # The nonce of the request is echoed: openssl compares them.
    echoed = sh(["openssl", "ocsp", "-reqin", req, "-respin", resp, "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain])
    assert "Response verify OK" in echoed.stderr
    assert "nonce" not in echoed.stderr.lower()
    # Negative control: against another request (another nonce) openssl reports the mismatch.
    other = ca.ocsp_request(dev, nonce=True)
    mismatch = sh(["openssl", "ocsp", "-reqin", other, "-respin", resp, "-VAfile", ca.ocsp_cert,
                   "-CAfile", ca.chain], check=False)
    assert mismatch.returncode != 0 and "Nonce Verify error" in mismatch.stderr

    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert parsed.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert parsed.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert parsed.serial_number == dev.serial


async def test_ocsp_without_nonce(ca, sh):
    dev = ca.new_device_cert()
    req, resp = await ca.ocsp_roundtrip(dev, nonce=False)
    assert ocsp_status(sh, ca, resp, dev).startswith(f"{dev.leaf}: good\n")
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert not any(isinstance(e.value, x509.OCSPNonce) for e in parsed.extensions)
    out = sh(["openssl", "ocsp", "-reqin", req, "-respin", resp, "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain])
    assert "Response verify OK" in out.stderr and "Nonce Verify error" not in out.stderr


async def test_ocsp_delegated_responder_verifies_through_the_chain(ca, sh, foreign_ca):
    """Without -VAfile openssl checks the delegation itself: the responder certificate must be
    issued by the certificate's issuer and carry id-kp-OCSPSigning (RFC 6960 4.2.2.2)."""
    dev = ca.new_device_cert()
    _, resp = await ca.ocsp_roundtrip(dev, nonce=False)
    out = sh(["openssl", "ocsp", "-respin", resp, "-CAfile", ca.root, "-verify_other", ca.issuing,
              "-issuer", ca.issuing, "-cert", dev.leaf, "-no_nonce"])
    assert "Response verify OK" in out.stderr and f"{dev.leaf}: good" in out.stdout
    foreign_root, _ = foreign_ca
    refused = sh(["openssl", "ocsp", "-respin", resp, "-CAfile", foreign_root, "-issuer", ca.issuing,
                  "-cert", dev.leaf, "-no_nonce"], check=False)
    assert refused.returncode != 0 and "Response Verify Failure" in refused.stderr
    # The responder certificate carried in the response is the one ocsp.pem holds.
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    responder = x509.load_pem_x509_certificate(ca.ocsp_cert.read_bytes())
    assert parsed.certificates == [responder]
    assert responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING])
    responder.extensions.get_extension_for_class(x509.OCSPNoCheck)


@pytest.mark.parametrize("cli_reason, flag, openssl_reason", [
    ("keyCompromise", x509.ReasonFlags.key_compromise, "keyCompromise"),
    ("superseded", x509.ReasonFlags.superseded, "superseded"),
])
async def test_ocsp_revoked_with_reason(ca, sh, cli_reason, flag, openssl_reason):
    dev = ca.new_device_cert()
    ca.revoke(dev, cli_reason)
    _, resp = await ca.ocsp_roundtrip(dev)
    status = ocsp_status(sh, ca, resp, dev)
    assert status.startswith(f"{dev.leaf}: revoked\n")
    assert f"Reason: {openssl_reason}" in status
    assert "Revocation Time:" in status
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert parsed.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert parsed.revocation_reason is flag
    assert abs(parsed.revocation_time_utc - datetime.now(timezone.utc)) < timedelta(minutes=5)


async def test_ocsp_hold_then_release(ca, sh):
    dev = ca.new_device_cert()
    ca.hold(dev)
    _, resp = await ca.ocsp_roundtrip(dev)
    status = ocsp_status(sh, ca, resp, dev)
    assert status.startswith(f"{dev.leaf}: revoked\n") and "Reason: certificateHold" in status
    ca.release(dev)
    _, resp = await ca.ocsp_roundtrip(dev)
    assert ocsp_status(sh, ca, resp, dev).startswith(f"{dev.leaf}: good\n")


async def test_ocsp_unknown_serial(ca, sh):
    serial = secrets.randbits(120) | (1 << 119)   # never issued: ours are 159-bit draws
    async with await ca.open() as authority:
        assert serial not in {r.serial for r in await authority.certificates()}
    _, resp = await ca.ocsp_roundtrip(serial)
    status = ocsp_status(sh, ca, resp, serial)
    assert status.startswith(f"{hex(serial)}: unknown\n")
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert parsed.certificate_status is ocsp.OCSPCertStatus.UNKNOWN and parsed.serial_number == serial


async def test_ocsp_sha256_cert_id(ca, sh):
    dev = ca.new_device_cert()
    _, resp = await ca.ocsp_roundtrip(dev, extra=("-sha256",))
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert isinstance(parsed.hash_algorithm, hashes.SHA256)
    # openssl matches the CertID including its hash algorithm.
    assert ocsp_status(sh, ca, resp, dev, "-sha256").startswith(f"{dev.leaf}: good\n")


async def test_ocsp_other_issuer_is_unauthorized(ca, sh, foreign_ca):
    foreign_root, foreign_dev = foreign_ca
    req = ca.work / f"{ca.unique('foreign')}.der"
    sh(["openssl", "ocsp", "-issuer", foreign_root, "-cert", foreign_dev, "-reqout", req])
    resp = req.with_suffix(".resp")
    resp.write_bytes(await ca.ocsp(req.read_bytes()))
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert parsed.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    out = sh(["openssl", "ocsp", "-respin", resp, "-CAfile", ca.chain], check=False)
    assert "Responder Error: unauthorized (6)" in both(out)

    # Our own root is another issuer too: only the issuing CA's certificates are answered.
    req2 = ca.work / f"{ca.unique('root-issuer')}.der"
    sh(["openssl", "ocsp", "-issuer", ca.root, "-cert", ca.issuing, "-reqout", req2])
    parsed = ocsp.load_der_ocsp_response(await ca.ocsp(req2.read_bytes()))
    assert parsed.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


@pytest.mark.parametrize("garbage", [
    b"", b"\x00", b"\x30\x03\x02\x01\x01", b"GET /ocsp HTTP/1.1\r\n\r\n", b"\x30\x82\xff\xff" + bytes(16),
], ids=["empty", "zero", "wrong-structure", "http-text", "bad-length"])
async def test_ocsp_garbage_is_malformed_request(ca, sh, garbage):
    parsed = ocsp.load_der_ocsp_response(await ca.ocsp(garbage))
    assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


async def test_ocsp_random_and_truncated_requests_are_malformed(ca, sh):
    dev = ca.new_device_cert()
    real = ca.ocsp_request(dev).read_bytes()
    for bad in (secrets.token_bytes(64), real[: len(real) // 2], real[:-1]):
        resp = ca.work / f"{ca.unique('malformed')}.der"
        resp.write_bytes(await ca.ocsp(bad))
        parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
        assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST, bad.hex()
    out = sh(["openssl", "ocsp", "-respin", resp, "-CAfile", ca.chain], check=False)
    assert "Responder Error: malformedrequest (1)" in both(out)


# -- requests the responder cannot answer get an OCSP error, never an exception ---------------

async def test_ocsp_request_for_two_certificates_is_malformed_request(ca, sh):
    # cryptography parses one CertID per request (what RFC 5019 clients send); more is refused in-band.
    a, b = ca.new_device_cert(), ca.new_device_cert()
    req = ca.work / f"{ca.unique('two-certs')}.der"
    sh(["openssl", "ocsp", "-issuer", ca.issuing, "-cert", a.leaf, "-cert", b.leaf, "-no_nonce", "-reqout", req])
    assert sh(["openssl", "ocsp", "-reqin", req, "-req_text"]).stdout.count("Certificate ID:") == 2
    parsed = ocsp.load_der_ocsp_response(await ca.ocsp(req.read_bytes()))
    assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize("digest", ["-md5", "-sha3-256"])
async def test_ocsp_request_with_unsupported_certid_hash_is_malformed_request(ca, sh, digest):
    dev = ca.new_device_cert()
    req = ca.ocsp_request(dev, nonce=False, extra=(digest,))
    answer = await ca.ocsp(req.read_bytes())
    assert ocsp.load_der_ocsp_response(answer).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_ca_certificates_cannot_be_revoked_onto_the_issuing_crl(fresh_ca, sh):
    # RFC 5280 5.1: the issuing CA's CRL lists only certificates the issuing CA issued.
    root = x509.load_pem_x509_certificate(fresh_ca.root.read_bytes())
    issuing = fresh_ca.issuing_cert
    for cert in (root, issuing):
        proc = fresh_ca.iomtca("cert", "revoke", format(cert.serial_number, "x"), "--reason", "cACompromise",
                               check=False)
        assert proc.returncode == 1 and "CA certificates are revoked by replacing the CA" in proc.stderr
    crl = fresh_ca.crl()
    listed = {entry.serial_number for entry in crl.crl}
    assert root.serial_number not in listed and issuing.serial_number not in listed
