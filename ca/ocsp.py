"""OCSP (RFC 6960) request parsing and response signing: pure functions.

Responses are signed by the delegated OCSP responder certificate (RFC 6960
4.2.2.2), which the responder includes so clients can check the delegation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from .errors import BadRequestError
from .model import CertStatus, RevocationReason
from .signer import Signer

# RFC 8954 2.1: responders accept nonces of 1..32 octets; 0 or more than 128 is malformed.
NONCE_ECHO_MAX = 32
NONCE_MAX = 128


@dataclass(frozen=True)
class OCSPQuery:
    serial: int
    hash_algorithm: hashes.HashAlgorithm
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    nonce: bytes | None


@dataclass(frozen=True)
class OCSPAnswer:
    """The status we know for a serial; `status=None` means unknown to this CA."""

    status: CertStatus | None
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None


def parse_request(data: bytes) -> OCSPQuery:
    if not data:
        raise BadRequestError("empty OCSP request")
    try:
        req = ocsp.load_der_ocsp_request(bytes(data))
        serial = req.serial_number
        algorithm = req.hash_algorithm
        name_hash, key_hash = req.issuer_name_hash, req.issuer_key_hash
        nonce = None
        for ext in req.extensions:
            if isinstance(ext.value, x509.OCSPNonce):
                nonce = ext.value.nonce
    except (ValueError, TypeError) as exc:
        raise BadRequestError(f"malformed OCSP request: {exc}") from exc
    except NotImplementedError as exc:
        # cryptography parses one CertID per request, as RFC 5019 clients send; more is refused.
        raise BadRequestError(f"unsupported OCSP request: {exc}") from exc
    except (x509.UnsupportedGeneralNameType, UnsupportedAlgorithm) as exc:
        raise BadRequestError(f"unsupported OCSP request: {exc}") from exc
    if serial < 0:
        raise BadRequestError("OCSP request names a negative serial number (RFC 5280 4.1.2.2: serials are positive)")
    if nonce is not None and not 1 <= len(nonce) <= NONCE_MAX:
        raise BadRequestError(f"OCSP nonce of {len(nonce)} octets is outside 1..{NONCE_MAX} (RFC 8954)")
    return OCSPQuery(serial, algorithm, name_hash, key_hash, nonce)


def issuer_hashes(issuer_cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of RFC 6960 4.1.1 for one hash algorithm."""
    if type(algorithm) in _CACHED_HASHES:   # the same issuer and algorithm for every response signed
        return _cached_issuer_hashes(issuer_cert, type(algorithm))
    return _issuer_hashes(issuer_cert, algorithm)


_CACHED_HASHES = (hashes.SHA1, hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512)


@functools.lru_cache(maxsize=32)   # certificates compare by their bytes
def _cached_issuer_hashes(issuer_cert: x509.Certificate, algorithm_type: type) -> tuple[bytes, bytes]:
    return _issuer_hashes(issuer_cert, algorithm_type())


def _issuer_hashes(issuer_cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    name = hashes.Hash(algorithm)
    name.update(issuer_cert.subject.public_bytes())
    spki = issuer_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_bits = asn1_keys.PublicKeyInfo.load(spki)["public_key"].contents[1:]  # drop unused-bits octet
    key = hashes.Hash(algorithm)
    key.update(key_bits)
    return name.finalize(), key.finalize()


def is_for_issuer(query: OCSPQuery, issuer_cert: x509.Certificate) -> bool:
    return issuer_hashes(issuer_cert, query.hash_algorithm) == (query.issuer_name_hash, query.issuer_key_hash)


def build_response(
    *,
    serial: int,
    answer: OCSPAnswer,
    issuer_cert: x509.Certificate,
    responder_cert: x509.Certificate,
    responder_signer: Signer,
    this_update: datetime,
    next_update: datetime,
    hash_algorithm: hashes.HashAlgorithm | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """A signed successful BasicOCSPResponse (DER) for one serial."""
    algorithm = hash_algorithm or hashes.SHA1()
    name_hash, key_hash = issuer_hashes(issuer_cert, algorithm)
    if answer.status is None:
        status, revoked_at, reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
    elif answer.status is CertStatus.GOOD:
        status, revoked_at, reason = ocsp.OCSPCertStatus.GOOD, None, None
    else:
        status = ocsp.OCSPCertStatus.REVOKED
        revoked_at = answer.revoked_at
        r = answer.reason or RevocationReason.unspecified
        # RFC 5280 5.3.1 advice applies here too: omit the reason when it says nothing.
        reason = None if r is RevocationReason.unspecified else r.flag
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(name_hash, key_hash, serial, algorithm, status,
                              this_update, next_update, revoked_at, reason)
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
        .certificates([responder_cert])
    )
    if nonce is not None and len(nonce) <= NONCE_ECHO_MAX:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    response = builder.sign(responder_signer.private_key, responder_signer.hash_algorithm)
    return response.public_bytes(serialization.Encoding.DER)


def error_response(status: ocsp.OCSPResponseStatus) -> bytes:
    """An unsigned error response: malformedRequest, internalError, tryLater, unauthorized."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
