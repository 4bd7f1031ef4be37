"""OCSP (RFC 6960) request parsing and response signing: pure functions.

Responses are signed by the delegated OCSP responder certificate (RFC 6960
4.2.2.2), which the responder includes so clients can check the delegation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timezone

from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from . import der
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
    """A signed successful BasicOCSPResponse (DER) for one serial, produced at `this_update`.

    Encoded here (see `der.py`), as certificates and CRLs are: the same bytes cryptography's
    OCSPResponseBuilder emits (tests/ca/test_ocsp_encoding.py compares them), without re-encoding
    the responder certificate on every response, and signed through any `Signer` (a key or a token),
    where the builder needs the private key object. Times are whole seconds (GeneralizedTime).
    """
    algorithm = hash_algorithm or hashes.SHA1()
    name_hash, key_hash = issuer_hashes(issuer_cert, algorithm)
    if answer.status is None:
        status = b"\x82\x00"                       # unknown [2] IMPLICIT NULL
    elif answer.status is CertStatus.GOOD:
        status = b"\x80\x00"                       # good [0] IMPLICIT NULL
    else:
        r = answer.reason or RevocationReason.unspecified
        # RFC 5280 5.3.1 advice applies here too: omit the reason when it says nothing.
        reason = b"" if r is RevocationReason.unspecified else der.explicit(0, der.enumerated(r.value))
        status = der.tlv(0xA1, _generalized(answer.revoked_at) + reason)   # revoked [1] IMPLICIT RevokedInfo
    single = der.sequence(
        der.sequence(_hash_identifier(algorithm.name), der.octet_string(name_hash), der.octet_string(key_hash),
                     der.integer(serial)),
        status, _generalized(this_update), der.explicit(0, _generalized(next_update)))
    extensions = b""
    if nonce is not None and len(nonce) <= NONCE_ECHO_MAX:
        extensions = der.explicit(1, der.sequence(der.extension(OID_NONCE, der.octet_string(nonce))))
    responder_id, certs = _responder_parts(responder_cert)
    tbs = der.sequence(responder_id, _generalized(this_update), der.sequence(single), extensions)
    basic = der.sequence(tbs, responder_signer.algorithm_identifier, der.bit_string(responder_signer.sign(tbs)), certs)
    # OCSPResponse: successful (0), responseBytes [0] EXPLICIT { id-pkix-ocsp-basic, OCTET STRING }
    return der.sequence(b"\x0a\x01\x00", der.explicit(0, der.sequence(der.oid(OID_BASIC), der.octet_string(basic))))


OID_BASIC = "1.3.6.1.5.5.7.48.1.1"
OID_NONCE = "1.3.6.1.5.5.7.48.1.2"
_HASH_OIDS = {"sha1": "1.3.14.3.2.26", "sha224": "2.16.840.1.101.3.4.2.4", "sha256": "2.16.840.1.101.3.4.2.1",
              "sha384": "2.16.840.1.101.3.4.2.2", "sha512": "2.16.840.1.101.3.4.2.3"}


@functools.lru_cache(maxsize=8)
def _hash_identifier(name: str) -> bytes:
    if name not in _HASH_OIDS:
        raise BadRequestError(f"OCSP CertID hash {name} is not supported")
    return der.sequence(der.oid(_HASH_OIDS[name]), der.null())   # with NULL parameters, as OpenSSL writes


@functools.lru_cache(maxsize=16)   # certificates compare by their bytes: once per responder
def _responder_parts(responder_cert: x509.Certificate) -> tuple[bytes, bytes]:
    """(responderID byKey: SHA-1 of the responder's public key bits, the certs field carrying it)."""
    key_hash = _issuer_hashes(responder_cert, hashes.SHA1())[1]
    return (der.explicit(2, der.octet_string(key_hash)),
            der.explicit(0, der.sequence(responder_cert.public_bytes(serialization.Encoding.DER))))


def _generalized(when: datetime) -> bytes:
    """GeneralizedTime in whole seconds, UTC (RFC 6960 refers to RFC 5280 4.1.2.5.2)."""
    when = when.astimezone(timezone.utc) if when.tzinfo is not timezone.utc else when
    return b"\x18\x0f" + (f"{when.year:04d}{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}"
                           f"{when.second:02d}Z").encode()


def error_response(status: ocsp.OCSPResponseStatus) -> bytes:
    """An unsigned error response: malformedRequest, internalError, tryLater, unauthorized."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
