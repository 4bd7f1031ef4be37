"""EST wire formats (RFC 7030 with RFC 8951): base64 PKCS#10 in, PKCS#7 certs-only out,
CSR attributes, and the serverkeygen multipart. Pure; the simulator's EST client reuses it."""
from __future__ import annotations

import base64
import re
import secrets

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from ca import der
from ca.codec import b64decode_strict, fully_parsed, load_csr
from ca.errors import BadRequestError

CT_PKCS10 = "application/pkcs10"
CT_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CT_CSRATTRS = "application/csrattrs"
CT_PKCS8 = "application/pkcs8"

# OIDs for CSR attributes (RFC 7030 4.5.2)
OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_ED25519 = "1.3.101.112"
_CURVE_OIDS = {"ec-p256": "1.2.840.10045.3.1.7", "ec-p384": "1.3.132.0.34", "ec-p521": "1.3.132.0.35"}
_SIG_OIDS = {"ec-p256": "1.2.840.10045.4.3.2", "ec-p384": "1.2.840.10045.4.3.3",
             "ec-p521": "1.2.840.10045.4.3.4", "rsa": "1.2.840.113549.1.1.11"}


def wrap64(data: bytes) -> bytes:
    """Base64 in lines of 64 characters: strict EST clients expect line-wrapped bodies."""
    text = base64.b64encode(data)
    return b"\n".join(text[i:i + 64] for i in range(0, len(text), 64)) + b"\n"


def decode_csr_body(body: bytes) -> x509.CertificateSigningRequest:
    """An EST request body: base64 DER (with or without line breaks), or PEM from hand-made clients."""
    if not body.strip():
        raise BadRequestError("request body is empty; expected a base64-encoded PKCS#10 CSR")
    if body.lstrip().startswith(b"-----BEGIN"):
        return load_csr(body)
    return load_csr(b64decode_strict(body, "PKCS#10 body"))


def encode_certs_only(certs: list[x509.Certificate]) -> bytes:
    """A degenerate PKCS#7 SignedData holding `certs`, base64 (RFC 7030 4.1.3, 4.2.3)."""
    return wrap64(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    try:
        certs = pkcs7.load_der_pkcs7_certificates(b64decode_strict(body, "PKCS#7 body"))
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:   # fuzz/ found the last two
        raise BadRequestError(f"not a PKCS#7 certs-only structure: {exc}") from exc
    return [fully_parsed(c, "certificate in the PKCS#7") for c in certs]


def encode_csrattrs(key_types: list[str], *, challenge_password: bool) -> bytes:
    """CsrAttrs (RFC 7030 4.5.2) naming the preferred key type and signature algorithm, and
    challengePassword when the server wants the TLS channel binding in it (RFC 7030 3.5)."""
    items = []
    if challenge_password:
        items.append(der.oid(OID_CHALLENGE_PASSWORD))
    preferred = key_types[0]
    if preferred in _CURVE_OIDS:
        items.append(der.sequence(der.oid(OID_EC_PUBLIC_KEY), der.tlv(0x31, der.oid(_CURVE_OIDS[preferred]))))
    elif preferred == "rsa":
        items.append(der.oid(OID_RSA_ENCRYPTION))
    elif preferred == "ed25519":
        items.append(der.oid(OID_ED25519))
    if preferred in _SIG_OIDS:
        items.append(der.oid(_SIG_OIDS[preferred]))
    return der.sequence(*items)


def encode_serverkeygen(private_key_der: bytes, cert: x509.Certificate) -> tuple[bytes, str]:
    """RFC 7030 4.4.2: multipart/mixed with the PKCS#8 key and then the certificate (certs-only)."""
    boundary = "est-" + secrets.token_hex(12)
    parts = [
        (CT_PKCS8, wrap64(private_key_der)),
        (CT_CERTS_ONLY, encode_certs_only([cert])),
    ]
    # RFC 2046 5.1.1: lines end in CRLF, and the CRLF before each delimiter belongs to it
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n\r\n".encode()
        + payload.rstrip(b"\n").replace(b"\n", b"\r\n") + b"\r\n" for ctype, payload in parts
    ) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/mixed; boundary={boundary}"


_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.I)


def decode_serverkeygen(body: bytes, content_type: str) -> tuple[bytes, x509.Certificate]:
    """The client side of encode_serverkeygen: (PKCS#8 DER key, certificate)."""
    match = _BOUNDARY_RE.search(content_type or "")
    if not content_type.lower().startswith("multipart/mixed") or not match:
        raise BadRequestError(f"expected multipart/mixed with a boundary, got {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    key = cert = None
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.partition(b"\r\n\r\n")
        headers = head.decode("latin-1").lower()
        if "application/pkcs8" in headers:
            key = b64decode_strict(payload, "PKCS#8 part")
        elif "application/pkcs7-mime" in headers:
            certs = decode_certs_only(payload)
            cert = certs[0] if certs else None
    if key is None or cert is None:
        raise BadRequestError("serverkeygen response lacks the key or the certificate part")
    return key, cert
