"""CRL generation (RFC 5280 section 5): a pure function of the revocations and the clock.

Entries are DER-encoded directly (see `der.py`), so a CRL of 100k entries costs
one pass over them plus one signature.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterable

from cryptography import x509

from . import der
from .model import Revocation, RevocationReason
from .signer import Signer

OID_AUTHORITY_KEY_IDENTIFIER = "2.5.29.35"
OID_CRL_NUMBER = "2.5.29.20"
OID_REASON_CODE = "2.5.29.21"

# Precomputed crlEntryExtensions for each reason: the same bytes for every entry.
_REASON_EXTENSIONS = {
    reason: der.sequence(der.extension(OID_REASON_CODE, der.enumerated(reason.value)))
    for reason in RevocationReason
}


def encode_entry(entry: Revocation) -> bytes:
    # RFC 5280 5.3.1: the reasonCode "unspecified" SHOULD be absent rather than present.
    extensions = b"" if entry.reason is RevocationReason.unspecified else _REASON_EXTENSIONS[entry.reason]
    return der.sequence(der.integer(entry.serial), der.time(entry.revoked_at), extensions)


def authority_key_identifier(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())


def build_crl(
    *,
    issuer_cert: x509.Certificate,
    signer: Signer,
    entries: Iterable[Revocation | bytes],
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> bytes:
    """A signed v2 CRL in DER with the AKI and CRL number extensions.

    `entries` are revocations, or their entries already encoded by `encode_entry` (as stored).
    """
    revoked = b"".join(e if isinstance(e, bytes) else encode_entry(e) for e in entries)
    extensions = der.explicit(0, der.sequence(
        der.extension(OID_AUTHORITY_KEY_IDENTIFIER, authority_key_identifier(issuer_cert).public_bytes()),
        der.extension(OID_CRL_NUMBER, der.integer(number)),
    ))
    tbs = der.sequence(
        der.integer(1),                       # version v2
        signer.algorithm_identifier,
        issuer_cert.subject.public_bytes(),
        der.time(this_update),
        der.time(next_update),
        der.tlv(0x30, revoked) if revoked else b"",   # absent when empty (RFC 5280 5.1.2.6)
        extensions,
    )
    return der.sequence(tbs, signer.algorithm_identifier, der.bit_string(signer.sign(tbs)))
