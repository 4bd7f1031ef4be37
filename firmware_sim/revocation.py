"""How a device checks a peer: verify the OCSP response's signature and delegation itself."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID


CLOCK_SKEW = timedelta(minutes=5)


class OCSPVerifyError(Exception):
    pass


def verified_status(resp: x509_ocsp.OCSPResponse, issuer: x509.Certificate, serial: int,
                    now: datetime | None = None) -> str:
    """"good", "revoked" or "unknown", after checking the responder is delegated by `issuer`
    (RFC 6960 4.2.2.2) and signed this response; raises OCSPVerifyError otherwise."""
    if resp.response_status is not x509_ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPVerifyError(f"responder said {resp.response_status.name}")
    if resp.serial_number != serial:
        raise OCSPVerifyError("response is about another certificate")
    now = now or datetime.now(timezone.utc)
    # RFC 6960 3.2: not from the future, not past its nextUpdate (a stale retained message)
    if resp.this_update_utc > now + CLOCK_SKEW:
        raise OCSPVerifyError("response thisUpdate is in the future")
    if resp.next_update_utc is not None and resp.next_update_utc < now - CLOCK_SKEW:
        raise OCSPVerifyError("response is stale: past its nextUpdate")
    if not resp.certificates:
        raise OCSPVerifyError("response carries no responder certificate")
    responder = resp.certificates[0]
    try:
        responder.verify_directly_issued_by(issuer)
        eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
        raise OCSPVerifyError(f"responder certificate is not delegated by the issuer: {exc}") from None
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        raise OCSPVerifyError("responder certificate lacks id-kp-OCSPSigning")
    key = responder.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), resp.signature_hash_algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes)
        else:
            raise OCSPVerifyError(f"unsupported responder key {type(key).__name__}")
    except InvalidSignature:
        raise OCSPVerifyError("OCSP response signature does not verify") from None
    return {x509_ocsp.OCSPCertStatus.GOOD: "good", x509_ocsp.OCSPCertStatus.REVOKED: "revoked",
            x509_ocsp.OCSPCertStatus.UNKNOWN: "unknown"}[resp.certificate_status]
