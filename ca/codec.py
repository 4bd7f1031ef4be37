"""Decoding what peers and operators hand us (CSRs, certificates) into typed objects.

Every failure is a BadRequestError with a readable reason; the rest of the core
only ever sees `cryptography` objects.
"""
from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.jsonobj import load_object

from .errors import BadRequestError

MAX_CSR_BYTES = 64 * 1024


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 request from PEM or DER; the signature is not checked here."""
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequestError("CSR must be bytes")
    if not data:
        raise BadRequestError("CSR is empty")
    if len(data) > MAX_CSR_BYTES:
        raise BadRequestError(f"CSR is {len(data)} bytes, over the {MAX_CSR_BYTES}-byte limit")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(bytes(data))
        return x509.load_der_x509_csr(bytes(data))
    except (ValueError, x509.InvalidVersion) as exc:   # InvalidVersion is no ValueError (a 500, once)
        raise BadRequestError(f"CSR is not a valid PKCS#10 request: {exc}") from exc


def load_certificate(data: bytes) -> x509.Certificate:
    if not data:
        raise BadRequestError("certificate is empty")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(bytes(data))
        return x509.load_der_x509_certificate(bytes(data))
    except (ValueError, x509.InvalidVersion) as exc:
        raise BadRequestError(f"not a valid X.509 certificate: {exc}") from exc


# What cryptography may raise from a certificate's parts, which it parses only when first asked for.
CERT_PARSE_ERRORS = (ValueError, x509.InvalidVersion, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def fully_parsed(cert: x509.Certificate, what: str = "certificate") -> x509.Certificate:
    """`cert` with its names and extensions parsed now: a broken one is the caller's input error
    here, not a surprise for whatever reads them later (fuzz/ found such certificates)."""
    try:
        cert.subject, cert.issuer, cert.extensions
    except CERT_PARSE_ERRORS as exc:
        raise BadRequestError(f"{what} is not a valid X.509 certificate: {exc}") from exc
    return cert


def b64decode_strict(text: str | bytes, what: str = "value") -> bytes:
    """Standard base64 (RFC 4648 section 4); whitespace and line breaks are ignored."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError as exc:
            raise BadRequestError(f"{what} is not base64: non-ASCII characters") from exc
    compact = b"".join(bytes(text).split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{what} is not valid base64: {exc}") from exc


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


MAX_POSTURE_BYTES = 16 * 1024


def posture_json(data: bytes) -> dict:
    """A posture document (the content of a signed posture, or a mutual-TLS posture body): a JSON
    object such as {"firmware": "2.4.1", "model": "..."}, at most 16 KiB."""
    return load_object(data, what="posture", limit=MAX_POSTURE_BYTES, example='{"firmware": "2.4.1"}')
