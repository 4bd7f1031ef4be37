"""Small validators composed by issuance: each checks one rule and raises a typed error."""
from __future__ import annotations

import hmac
import re
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, SignatureAlgorithmOID

from .errors import (BadRequestError, KeyPolicyError, PolicyViolationError, PostureError, ProofOfPossessionError, RevokedError,
                     UnauthorizedError)
from .model import CertRecord, CertStatus, Device, DeviceStatus, serial_hex, spiffe_id
from .profiles import Profile

_CURVES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}


def key_type(public_key) -> str:
    """Our name for a public key's type; raise KeyPolicyError for anything we do not know."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = _CURVES.get(public_key.curve.name)
        if name is None:
            raise KeyPolicyError(f"elliptic curve {public_key.curve.name} is not allowed; use P-256, P-384 or P-521")
        return name
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise KeyPolicyError(f"key type {type(public_key).__name__} is not allowed")


def key_allowed(public_key, profile: Profile) -> None:
    kind = key_type(public_key)
    if kind not in profile.key_types:
        allowed = ", ".join(sorted(profile.key_types))
        raise KeyPolicyError(f"{kind} keys are not allowed for profile {profile.name}; allowed: {allowed}")
    if kind == "rsa":
        numbers = public_key.public_numbers()
        if public_key.key_size < profile.min_rsa_bits:
            raise KeyPolicyError(
                f"RSA key of {public_key.key_size} bits is too weak; at least {profile.min_rsa_bits} required"
            )
        if numbers.e < 65537 or numbers.e % 2 == 0:
            raise KeyPolicyError(f"RSA public exponent {numbers.e} is not allowed; use 65537")


_ECDSA_SIGNATURES = frozenset({SignatureAlgorithmOID.ECDSA_WITH_SHA224, SignatureAlgorithmOID.ECDSA_WITH_SHA256,
                               SignatureAlgorithmOID.ECDSA_WITH_SHA384, SignatureAlgorithmOID.ECDSA_WITH_SHA512})


def proof_of_possession(csr: x509.CertificateSigningRequest) -> None:
    """The CSR must be signed by the key it carries (RFC 2986, RFC 7030 3.4)."""
    try:
        ok = _signature_valid(csr)
    except Exception as exc:  # unsupported algorithms surface here
        raise ProofOfPossessionError(f"CSR signature cannot be checked: {exc}") from exc
    if not ok:
        raise ProofOfPossessionError("CSR signature does not verify (no proof of possession of the key)")


def _signature_valid(csr: x509.CertificateSigningRequest) -> bool:
    # An ECDSA CSR (what devices send) is verified with its key directly: the same check as
    # is_signature_valid, which costs about 55 us more per CSR (bench/PROFILES.md). Others go there.
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and csr.signature_algorithm_oid in _ECDSA_SIGNATURES:
        try:
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(csr.signature_hash_algorithm))
        except InvalidSignature:
            return False
        return True
    return csr.is_signature_valid


def device_active(device: Device) -> None:
    if device.status is DeviceStatus.DECOMMISSIONED:
        raise RevokedError(f"device {device.id} is decommissioned")
    if device.status is not DeviceStatus.ACTIVE:
        raise PolicyViolationError(f"device {device.id} is {device.status.value}, not active")


def csr_names_this_device(csr: x509.CertificateSigningRequest, device: Device, trust_domain: str) -> None:
    """SANs a CSR asks for are ignored, but asking for another identity is refused.

    The certificate's names come from the registry; a CSR whose SANs name anything
    but this device (its id as a DNS name or its SPIFFE ID) is a sign of a
    misconfigured or malicious client, so it is refused rather than silently fixed.
    """
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise ProofOfPossessionError(f"CSR extensions are malformed or unsupported: {exc}") from exc
    allowed = {spiffe_id(trust_domain, device.id).lower(), device.id.lower()}
    for name in ext.value:
        value = name.value if isinstance(name.value, str) else str(name.value)
        if isinstance(name, (x509.UniformResourceIdentifier, x509.DNSName)) and value.lower() in allowed:
            continue
        raise PolicyViolationError(
            f"CSR asks for subject alternative name {value!r}, which is not device {device.id}"
        )


# MQTT contract: a CMS-signed renewal's signingTime must be within 10 minutes of now.
SIGNING_TIME_WINDOW = timedelta(minutes=10)


def certificate_on_file(record: CertRecord | None, cert: x509.Certificate, issuer_cert: x509.Certificate) -> CertRecord:
    """The presented certificate is ours: signed by this issuing CA, on file byte for byte, and a
    device certificate. Says nothing yet of its status or validity."""
    try:
        cert.verify_directly_issued_by(issuer_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise UnauthorizedError("the presented certificate was not issued by this CA") from None
    if record is None or record.der != cert.public_bytes(serialization.Encoding.DER):
        raise UnauthorizedError(f"certificate {serial_hex(cert.serial_number)} is not on file at this CA")
    if record.device_id is None:
        raise UnauthorizedError("the presented certificate is not a device certificate")
    return record


def not_revoked(record: CertRecord) -> None:
    if record.status is CertStatus.REVOKED:
        raise RevokedError(f"certificate {serial_hex(record.serial)} is revoked ({record.reason.name})")
    if record.status is CertStatus.HOLD:
        raise RevokedError(f"certificate {serial_hex(record.serial)} is on hold; ask an engineer to release it")


def within_validity(record: CertRecord, now: datetime, grace: timedelta) -> None:
    """Valid now, or expired for less than `grace` (devices come back from long offline windows)."""
    if now < record.not_before:
        raise UnauthorizedError(f"certificate {serial_hex(record.serial)} is not valid yet")
    if now > record.not_after + grace:
        raise UnauthorizedError(
            f"certificate {serial_hex(record.serial)} expired at {record.not_after.isoformat()}, more than "
            f"{grace} ago (the renewal grace period); enroll again with a new token")


def renewal_allowed(record: CertRecord | None, cert: x509.Certificate, issuer_cert: x509.Certificate,
                    now: datetime, grace: timedelta) -> CertRecord:
    """The presented certificate may authenticate a renewal: ours, on file, not revoked or held,
    and valid or expired for less than `grace`."""
    record = certificate_on_file(record, cert, issuer_cert)
    not_revoked(record)
    within_validity(record, now, grace)
    return record


def same_device(record: CertRecord, device_id: str | None) -> None:
    """A renewal names its device (MQTT topic); the certificate must belong to that device."""
    if device_id is not None and record.device_id != device_id:
        raise UnauthorizedError(
            f"request for device {device_id} is signed with the certificate of device {record.device_id}")


def signed_recently(signed_at: datetime | None, now: datetime) -> None:
    if signed_at is None:
        raise UnauthorizedError("signed renewal carries no signingTime")
    if abs(now - signed_at) > SIGNING_TIME_WINDOW:
        raise UnauthorizedError(
            f"signingTime {signed_at.isoformat()} is more than 10 minutes from now (replayed or clock wrong)")


def channel_bound(csr: x509.CertificateSigningRequest, expected: str) -> None:
    """RFC 7030 3.5: the CSR's challengePassword must carry this TLS connection's binding."""
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        raise UnauthorizedError("CSR carries no challengePassword with the TLS channel binding "
                                "(RFC 7030 3.5)") from None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if not hmac.compare_digest(text.strip().encode(), expected.encode()):
        raise UnauthorizedError("CSR challengePassword does not match this TLS connection's channel binding "
                                "(the CSR was made for another connection)")


def posture_firmware(posture: object) -> str | None:
    """The firmware a posture JSON object names (None when it names none)."""
    if not isinstance(posture, dict):
        raise BadRequestError("posture must be a JSON object such as {\"firmware\": \"2.4.1\"}")
    firmware = posture.get("firmware")
    if firmware is not None and (not isinstance(firmware, str) or not 0 < len(firmware) <= 64
                                 or not firmware.isprintable()):
        raise BadRequestError("posture firmware must be a printable string of 1 to 64 characters")
    return firmware


def version_key(version: str) -> tuple:
    """Firmware versions compare part by part, numbers as numbers: 2.10.0 > 2.9.1."""
    return tuple((0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p) for p in re.split(r"[.\-+_ ]", version.strip()) if p)


def posture_ok(device: Device, min_firmware: str | None) -> None:
    """Renewal needs firmware at or above the model's minimum (a per-model setting)."""
    if min_firmware is None:
        return
    if not device.firmware or version_key(device.firmware) < version_key(min_firmware):
        raise PostureError(f"device {device.id} runs firmware {device.firmware or 'unknown'}, below the minimum "
                           f"{min_firmware} for {device.model}; update the firmware, send a signed posture, then renew")
