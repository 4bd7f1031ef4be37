"""Valid inputs for each fuzz target, made fresh (keys differ every run): where atheris starts."""
from __future__ import annotations

import base64
import json
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import AttributeOID, NameOID

from ca import issuance, profiles
from ca.signer import generate_key
from enroll import codec as est_codec
from firmware_sim.sim_device import cms_sign

from .targets import DEVICE, NOW, PKI, TRUST_DOMAIN, _OPS


def _csr(key_type: str = "ec-p256", *, challenge: str | None = None) -> tuple[bytes, object]:
    key = generate_key(key_type)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE.id)]))
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    csr = builder.sign(key, None if key_type == "ed25519" else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key


def _device_cert(key) -> x509.Certificate:
    subject, sans = issuance.device_names(DEVICE.id, TRUST_DOMAIN)
    return issuance.build_certificate(public_key=key.public_key(), subject=subject, sans=sans, profile=profiles.DEVICE,
                                      issuer=PKI.issuer, serial=issuance.new_serial(), now=NOW)


def _manufacturer_crls() -> list[bytes]:
    """The throwaway CA's CRLs (DER, and one in PEM) listing serials next to the fuzz IDevID's
    (a seed must pass the whole target; mutations reach the listed case)."""
    out = []
    for number, serials in ((1, [PKI.idevid.serial_number + 1, 77]), (2, [PKI.idevid.serial_number - 1])):
        builder = (x509.CertificateRevocationListBuilder().issuer_name(PKI.issuer.certificate.subject)
                   .last_update(NOW - timedelta(hours=1)).next_update(NOW + timedelta(days=1))
                   .add_extension(x509.CRLNumber(number), critical=False))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=2))
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
        crl = builder.sign(PKI.issuer.signer.private_key, hashes.SHA256())
        out.append(crl.public_bytes(serialization.Encoding.DER))
    out.append(x509.load_der_x509_crl(out[0]).public_bytes(serialization.Encoding.PEM))
    return out


def seeds() -> dict[str, list[bytes]]:
    csrs = [_csr()[0], _csr("ec-p384")[0], _csr("ed25519")[0], _csr(challenge="fuzz-binding")[0]]
    der, key = _csr()
    cert = _device_cert(key)
    renewal = cms_sign(_csr()[0], cert, key)
    posture = cms_sign(json.dumps({"firmware": "2.4.1"}).encode(), cert, key)
    request = x509_ocsp.OCSPRequestBuilder().add_certificate(cert, PKI.issuer.certificate, hashes.SHA1())
    ocsp_plain = request.build().public_bytes(serialization.Encoding.DER)
    ocsp_nonce = request.add_extension(x509.OCSPNonce(b"n" * 16), critical=False).build().public_bytes(
        serialization.Encoding.DER)
    body, content_type = est_codec.encode_serverkeygen(
        generate_key("ec-p256").private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), cert)
    b64 = [base64.b64encode(c).decode() for c in csrs]
    enroll = {"id": "r1", "csr": b64[0], "token": "tok-123"}
    mqtt = [bytes([_OPS.index(op)]) + json.dumps(payload).encode() for op, payload in [
        ("simpleenroll", enroll), ("simplereenroll", {"id": "r2", "cms": base64.b64encode(renewal).decode()}),
        ("posture", {"id": "r3", "cms": base64.b64encode(posture).decode()}), ("cacerts", {"id": "r4"}),
        ("csrattrs", {"id": "r5"})]]
    return {
        "est_csr_body": [est_codec.wrap64(c) for c in csrs] + [
            x509.load_der_x509_csr(csrs[0]).public_bytes(serialization.Encoding.PEM)],
        "csr_der": csrs,
        "certs_only": [est_codec.encode_certs_only([cert, PKI.issuer.certificate])],
        "cms_request": [renewal, posture],
        "ocsp_request": [ocsp_plain, ocsp_nonce],
        "ocsp_get_path": [base64.b64encode(ocsp_plain), base64.b64encode(ocsp_nonce)],
        "serverkeygen_multipart": [content_type.encode() + b"\n" + body],
        "mqtt_request": mqtt,
        "mqtt_report": [b'{"firmware": "2.4.1", "model": "infusion-pump"}'],
        "basic_header": [b"Basic " + base64.b64encode(b"pump-0001:tok-123"), b"Basic " + base64.b64encode(b"x:y")],
        "manufacturer_crl": _manufacturer_crls(),
        "ra_json": [json.dumps({"csr": b64[0], "token": "tok", "request_id": "r1"}).encode(),
                    json.dumps({"requests": [{"op": "simpleenroll", "device_id": DEVICE.id, "csr": b, "token": "t",
                                              "request_id": f"r{i}"} for i, b in enumerate(b64)]
                                + [{"op": "simplereenroll", "device_id": DEVICE.id,
                                    "cms": base64.b64encode(renewal).decode()}]}).encode()],
    }
