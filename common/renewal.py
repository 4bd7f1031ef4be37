"""When a service certificate is due for renewal: at 2/3 of the time from its issuance to its
notAfter, or when it is valid for longer than its profile now allows. Pure; shared by the CA
(server certificate, OCSP responder) and the gateway (its RA certificate)."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

# The CA sets notBefore this far in the past, so devices with slightly slow clocks accept a
# certificate the moment they receive it (ca/issuance.py); issuance time is notBefore + BACKDATE.
BACKDATE = timedelta(minutes=5)
RENEW_AT = 2 / 3
# Certificates carry whole seconds: a validity this much over the lifetime is rounding, not a
# longer lifetime.
SLACK = timedelta(seconds=1)


def issued_at(cert: x509.Certificate) -> datetime:
    """When `cert` was made: notBefore + BACKDATE (what issuance subtracted). A certificate valid
    for no longer than BACKDATE cannot have been backdated (one made elsewhere): its notBefore."""
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    return not_before + BACKDATE if not_after - not_before > BACKDATE else not_before


def validity(cert: x509.Certificate) -> timedelta:
    """The time from issuance to notAfter."""
    return cert.not_valid_after_utc - issued_at(cert)


def renew_at(cert: x509.Certificate, fraction: float = RENEW_AT) -> datetime:
    """The renewal point: `fraction` (2/3) of the time from issuance to notAfter."""
    start = issued_at(cert)
    return start + (cert.not_valid_after_utc - start) * fraction


def longer_than(cert: x509.Certificate, lifetime: timedelta | None) -> bool:
    """Valid for longer than `lifetime` (the profile's configured lifetime) allows."""
    return lifetime is not None and validity(cert) > lifetime + SLACK


def read_cert(path: Path) -> x509.Certificate | None:
    """The first certificate of a PEM file (leaf, then chain), or None when missing or damaged."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


