"""Who is calling: HTTP Basic credentials and the TLS client certificate, turned into credentials.

The client certificate comes from the TLS connection itself. A reverse proxy's
client-certificate header is used only when the request comes from an address
listed in `trusted_proxies`; everyone else's is ignored. Either way the
certificate is verified here against this CA or a configured manufacturer, and
its validity period is checked (the TLS layer leaves time to us, see tls.py); an
IDevID is also checked against its manufacturer's CRLs (idevid_crl.py).
"""
from __future__ import annotations

import base64
import functools
import ipaddress
import urllib.parse
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ca import idevid
from ca.credentials import CertificateAuth, IDevIDAuth, TokenAuth
from ca.errors import BadRequestError, UnauthorizedError
from common.ids import check_id

from .config import EnrollConfig


@dataclass(frozen=True)
class BasicCredentials:
    device_id: str
    token: TokenAuth


def client_source(request, config: EnrollConfig) -> str:
    """Where a request comes from, for the failure counters (ca/failures.py): the peer address, or,
    from a proxy in `trusted_proxies`, the nearest address in X-Forwarded-For that is not one of
    them (what the proxies saw; anything further left the client could have written)."""
    remote = request.remote or "unknown"
    if not _from_trusted_proxy(request, config):
        return remote
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return remote   # a hop that is no address: trust the list no further than the proxy
        if not any(address in net for net in config.trusted_proxies):
            return str(address)
    return remote


def basic_credentials(request: web.Request, source: str | None = None) -> BasicCredentials | None:
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise UnauthorizedError(f"unsupported authorization scheme {scheme!r}; use Basic")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except ValueError:   # not base64 (binascii.Error), not ASCII, not UTF-8 inside: all ValueErrors
        raise BadRequestError("malformed Basic authorization header") from None
    if not sep or not user or not password:
        raise UnauthorizedError("Basic credentials need the device id as user and the enrollment token as password")
    # checked before it is used, logged or stored: the syntax is public, so saying so tells nothing
    return BasicCredentials(check_id(user), TokenAuth(password, source=source))


def peer_certificate(request: web.Request, config: EnrollConfig) -> x509.Certificate | None:
    """The client certificate of this request: from TLS, or from a trusted proxy's header."""
    proxy_value = request.headers.get(config.proxy_cert_header)
    if proxy_value and _from_trusted_proxy(request, config):
        try:
            return x509.load_pem_x509_certificate(urllib.parse.unquote(proxy_value).encode())
        except (ValueError, x509.InvalidVersion) as exc:
            raise BadRequestError(f"proxy client-certificate header is not a PEM certificate: {exc}") from exc
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def _from_trusted_proxy(request: web.Request, config: EnrollConfig) -> bool:
    if not config.trusted_proxies or not request.remote:
        return False
    try:
        address = ipaddress.ip_address(request.remote)
    except ValueError:
        return False
    return any(address in net for net in config.trusted_proxies)


@functools.lru_cache(maxsize=1024)
def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    # Cached: whether these exact bytes carry the issuer's signature never changes, and the gateway
    # and renewing devices present the same certificate on every request (certificates compare by
    # their DER). Revocation and validity are checked on every request, elsewhere.
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def classify(cert: x509.Certificate, issuing_ca: x509.Certificate, config: EnrollConfig,
             now: datetime) -> CertificateAuth | IDevIDAuth | None:
    """Ours (a device or RA certificate), a manufacturer's IDevID, or nobody we know.

    An IDevID must be within its validity and, when its manufacturer has CRLs configured, pass
    them (enroll/idevid_crl.py: revoked is 401, a CRL out of date or not loaded yet is 503)."""
    if _issued_by(cert, issuing_ca):
        return CertificateAuth(cert)  # validity is judged by the renewal policy (grace period)
    for maker in config.idevid:
        issuer = next((ca for ca in maker.certificates if _issued_by(cert, ca)), None)
        if issuer is None:
            continue
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UnauthorizedError(f"the IDevID certificate of {maker.manufacturer} is outside its validity")
        idevid.check_ca_validity(issuer, maker.certificates, now, maker.manufacturer)
        if maker.revocation is not None:
            maker.revocation.check(cert, issuer, now)
        return IDevIDAuth(cert, maker.manufacturer)
    return None
