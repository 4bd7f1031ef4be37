"""The service certificates of a CA directory and their renewal: when each is due, and the renewals
themselves (the EST server's TLS certificate; a gateway's RA certificate, renewed over the RA
API with its current one: the gateway keeps it in its own directory, `ca/gateways.py` tracks it). The OCSP responder's rotation lives in `ocsp_signer.py` and uses the
same arithmetic.

When a certificate is due: 2/3 of the time from its issuance to its notAfter has passed, or its
validity is longer than its profile's configured lifetime now allows (an operator who shortens
`[ca.profiles.server] lifetime` gets a new certificate at the next start). Issuance time is
notBefore + `common.renewal.BACKDATE`: counting from the backdated notBefore, a 30 s certificate would be
due the moment it is made.

A service certificate that only signs on demand (the evidence signer, `ca/evidence.py`) is kept
with its key in one file and renewed when next used (`keyed_certificate`): when it is due by the
rule above, revoked or held in the store, or no longer issued by the current issuing CA.

Every certificate comes from `Authority.issue_service`. A renewal holds an exclusive lock on a file
beside the key, re-checks under it (another process may have renewed meanwhile), then writes the
new key and after it the certificate with its issuing CA, each atomically: a reader that sees the
new key with the old certificate gets a key mismatch and retries.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from common.renewal import issued_at, longer_than, read_cert, renew_at, validity  # noqa: F401 (re-exported)

from . import gateways, policy
from .codec import cert_der, cert_pem
from .config import CAConfig, CAPaths
from .errors import CAError, ConfigError, NotFoundError, RevokedError, UnauthorizedError
from .issuance import proven_key, server_names
from .keystore import (check_private, encrypt_key, file_lock, load_private_key, load_private_key_pem, write_atomic,
                       write_private_key)
from .model import AuditEvent, CertStatus, GatewayStatus, Issued, serial_hex
from .signer import generate_key
from .timefmt import format_duration

if TYPE_CHECKING:
    from .authority import Authority

log = logging.getLogger(__name__)

SERVER_ACTOR = "system:server-renewal"


# -- the arithmetic -----------------------------------------------------------------------------

def renewal_due(cert: x509.Certificate, profile_lifetime: timedelta | None, now: datetime) -> bool:
    """Due: past its renewal point, or longer-lived than its profile's lifetime now allows."""
    return now >= renew_at(cert) or longer_than(cert, profile_lifetime)


def renewal_reason(cert: x509.Certificate, profile_lifetime: timedelta | None, now: datetime) -> str | None:
    """Why `cert` is due (for logs and `iomtca status`), or None when it is not."""
    if longer_than(cert, profile_lifetime):
        return (f"valid for {_human(validity(cert))}, longer than the configured lifetime "
                f"{_human(profile_lifetime)}")
    if now >= cert.not_valid_after_utc:
        return "expired"
    if now >= renew_at(cert):
        return "past 2/3 of its validity"
    return None


def _human(delta: timedelta) -> str:
    return format_duration(timedelta(seconds=int(delta.total_seconds())))


# -- the service certificates of a CA directory -----------------------------------------------

@dataclass(frozen=True)
class ServiceCert:
    """One service certificate of a CA directory: where it lives and who renews it."""

    name: str            # "server", "gateway RA", "OCSP responder"
    profile: str
    cert_path: Path
    key_path: Path
    renewed_by: str      # for `iomtca status`


def service_certificates(paths: CAPaths) -> list[ServiceCert]:
    return [
        ServiceCert("server", "server", paths.server_cert, paths.server_key, "the EST server"),
        ServiceCert("OCSP responder", "ocsp", paths.ocsp_cert, paths.ocsp_signer, "the EST server"),
    ]


def server_identity(config: CAConfig) -> tuple[x509.Name, list[x509.GeneralName]]:
    return server_names(list(config.server_names))


def _lock_path(key_path: Path, what: str) -> Path:
    return key_path.with_name(f"{what}-renewal.lock")


def _pem_with_issuer(issued: Issued) -> bytes:
    return cert_pem(issued.certificate) + b"".join(cert_pem(c) for c in issued.chain[:1])


# -- the EST server's TLS certificate -----------------------------------------------------------

def _server_due(authority: "Authority", now: datetime, *, check_key: bool) -> str | None:
    paths, config = authority.paths, authority.config
    cert = read_cert(paths.server_cert)
    if cert is None:
        return "missing or damaged"
    reason = renewal_reason(cert, config.profile("server").lifetime, now)
    if reason:
        return reason
    wanted = {str(n.value) for n in server_identity(config)[1]}
    if {str(n.value) for n in _sans(cert)} != wanted:
        return "server_names changed"
    if check_key and not _key_matches(paths.server_key, cert, authority.key_passphrase):
        return "the key does not match the certificate"
    return None


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _key_matches(key_path: Path, cert: x509.Certificate, passphrase: bytes) -> bool:
    try:
        key = load_private_key(key_path, passphrase)
    except ConfigError:
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def server_renewal_point(authority: "Authority") -> datetime | None:
    """When server.pem is next due (None when it cannot be read: due now)."""
    cert = read_cert(authority.paths.server_cert)
    return renew_at(cert) if cert is not None else None


async def renew_server_certificate(authority: "Authority", now: datetime | None = None, *,
                                   check_key: bool = False) -> bool:
    """Renew server.pem and private/server.key if due; True when this call renewed them.

    `check_key` (at start): a key that does not match the certificate (a crash between the two
    writes) counts as due too. Of several processes that find it due at once, one renews.
    """
    now = now or authority.now()
    if _server_due(authority, now, check_key=check_key) is None:
        return False
    paths, config = authority.paths, authority.config
    async with file_lock(_lock_path(paths.server_key, "server")):
        reason = _server_due(authority, now, check_key=check_key)  # another process may have renewed
        if reason is None:
            return False
        key = await asyncio.to_thread(generate_key, config.key_type)
        subject, sans = server_identity(config)
        issued = await authority.issue_service(key.public_key(), "server", subject, sans, actor=SERVER_ACTOR)
        write_private_key(paths.server_key, key, authority.key_passphrase)    # key first, then the cert
        write_atomic(paths.server_cert, _pem_with_issuer(issued))
    log.info("renewed the server certificate (%s) serial=%s not_after=%s", reason, serial_hex(issued.serial),
             issued.not_after.isoformat())
    return True


# -- a service certificate kept with its key in one file, renewed when next used ----------------

@dataclass(frozen=True)
class KeyedCert:
    """A service certificate and its private key. On disk: the certificate's PEM, then the key's
    (encrypted with the CA passphrase), in one 0600 file replaced atomically, so a reader never
    pairs a new certificate with an old key."""

    certificate: x509.Certificate
    key: object


def read_keyed_certificate(path: Path, passphrase: bytes) -> KeyedCert | None:
    """The pair in `path`, or None when there is none yet."""
    if not path.exists():
        return None
    check_private(path)
    data = path.read_bytes()
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"{path} holds no certificate") from exc
    return KeyedCert(cert, load_private_key_pem(data, passphrase, str(path)))


async def _keyed_due(authority: "Authority", current: KeyedCert | None, profile: str, now: datetime) -> str | None:
    if current is None:
        return "none yet"
    cert = current.certificate
    reason = renewal_reason(cert, authority.config.profile(profile).lifetime, now)
    if reason:
        return reason
    try:
        cert.verify_directly_issued_by(authority.issuer.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return "issued by another issuing CA"
    try:
        record = await authority.certificate(cert.serial_number)
    except NotFoundError:
        return "not on file in the database"
    if record.status is not CertStatus.GOOD:
        return f"{record.status.value} in the database"
    return None


async def keyed_certificate(authority: "Authority", path: Path, profile: str,
                            names: tuple[x509.Name, list[x509.GeneralName]], *, key_type: str, actor: str,
                            now: datetime | None = None) -> KeyedCert:
    """The pair in `path`, first renewed (new key, new certificate of `profile` with these subject
    and SANs) when it is missing or due: past 2/3 of its validity or longer than the profile now
    allows, revoked or on hold, or not issued by the current issuing CA. Of several processes
    that find it due at once, one renews; the others read what it wrote."""
    now = now or authority.now()
    passphrase = authority.key_passphrase
    current = read_keyed_certificate(path, passphrase)
    if await _keyed_due(authority, current, profile, now) is None:
        return current
    async with file_lock(_lock_path(path, profile)):
        current = read_keyed_certificate(path, passphrase)   # another process may have renewed meanwhile
        reason = await _keyed_due(authority, current, profile, now)
        if reason is None:
            return current
        key = await asyncio.to_thread(generate_key, key_type)
        issued = await authority.issue_service(key.public_key(), profile, *names, actor=actor)
        write_atomic(path, cert_pem(issued.certificate) + encrypt_key(key, passphrase), mode=0o600)
    log.info("renewed the %s certificate (%s) serial=%s not_after=%s", profile, reason, serial_hex(issued.serial),
             issued.not_after.isoformat())
    return KeyedCert(issued.certificate, key)


# -- the gateway's RA certificate, renewed over the RA API with its current one ------------------

async def renew_ra_certificate(authority: "Authority", presented: x509.Certificate,
                               csr: x509.CertificateSigningRequest) -> Issued:
    """A new `gateway` certificate for the key of `csr`, with the same subject and SANs as
    `presented`, the RA certificate the caller authenticated with (good, on file, unexpired).

    Refusals raise a CAError and are audited as `ra_renewal_refused`.
    """
    now = authority.now()
    who = f"gateway:{_common_name(presented)}"
    try:
        await _check_presented(authority, presented, now)
        key = proven_key(csr)   # proof of possession of the new key
        policy.key_allowed(key, authority.config.profile("gateway"))
        issued = await gateways.renew(authority, presented.serial_number, key, presented.subject, _sans(presented),
                                      actor=who)
    except CAError as exc:
        async with authority.store.write() as tx:
            await tx.append_audit(AuditEvent("ra_renewal_refused", who, serial=presented.serial_number,
                                             detail={"code": exc.code, "reason": exc.message}), now)
        log.warning("RA renewal refused for %s serial=%s: %s", who, serial_hex(presented.serial_number), exc)
        raise
    log.info("renewed the RA certificate of %s serial=%s -> %s not_after=%s", who,
             serial_hex(presented.serial_number), serial_hex(issued.serial), issued.not_after.isoformat())
    return issued


async def _check_presented(authority: "Authority", cert: x509.Certificate, now: datetime) -> None:
    try:
        record = await authority.certificate(cert.serial_number)
    except CAError:
        record = None
    if record is None or record.der != cert_der(cert) or record.profile != "gateway":
        raise UnauthorizedError("only a gateway RA certificate issued by this CA can renew itself")
    if record.status is not CertStatus.GOOD:
        raise RevokedError(f"RA certificate {serial_hex(record.serial)} is {record.status.value}")
    if not record.not_before <= now <= record.not_after:
        raise UnauthorizedError(f"RA certificate {serial_hex(record.serial)} is outside its validity; "
                                "an expired RA certificate cannot renew itself")


def _common_name(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else "unknown"


async def active_gateway_certificates(store) -> list[tuple[str, x509.Certificate]]:
    """(name, newest RA certificate) of each active gateway, for `iomtca status`."""
    found = []
    async with store.read() as tx:
        for gateway in await tx.list_gateways():
            if gateway.status is GatewayStatus.ACTIVE and gateway.serial is not None:
                record = await tx.get_certificate(gateway.serial)
                if record is not None:
                    found.append((gateway.name, x509.load_der_x509_certificate(record.der)))
    return found


# -- what `iomtca status` shows -------------------------------------------------------------------

EXPIRY_WARNING = timedelta(days=30)


@dataclass(frozen=True)
class CertState:
    name: str
    path: Path
    cert: x509.Certificate | None
    renewed_by: str | None            # None: replaced by hand (the CA certificates)
    renew_at: datetime | None
    due: str | None                   # why it is due now, if it is
    warning: str | None


def _self_renewing(name: str, path: Path, cert: x509.Certificate, profile: str, renewed_by: str,
                   config: CAConfig, now: datetime) -> CertState:
    due = renewal_reason(cert, config.profile(profile).lifetime, now)
    warning = None
    if cert.not_valid_after_utc <= now:
        warning = f"{name} certificate expired at {cert.not_valid_after_utc.isoformat()}"
    elif cert.not_valid_after_utc - now <= EXPIRY_WARNING and now >= renew_at(cert):
        warning = (f"{name} certificate expires at {cert.not_valid_after_utc.isoformat()} and its "
                   f"renewal (by {renewed_by}) is overdue")
    return CertState(name, path, cert, renewed_by, renew_at(cert), due, warning)


def directory_status(paths: CAPaths, config: CAConfig, now: datetime,
                     gateway_certs: list[tuple[str, x509.Certificate]] = ()) -> list[CertState]:
    """Each service certificate, the newest RA certificate of each active gateway (from the
    database: the files are on the gateway hosts), and the two CA certificates, with renewal
    points and warnings.

    A self-renewing certificate warns when it expires within 30 days and its renewal is not
    ahead (overdue: is the server or gateway running?); a CA certificate whenever it expires
    within 30 days (it is replaced by hand).
    """
    states = []
    for svc in service_certificates(paths):
        cert = read_cert(svc.cert_path)
        if cert is None:
            states.append(CertState(svc.name, svc.cert_path, None, svc.renewed_by, None, "missing or damaged",
                                    f"{svc.name} certificate {svc.cert_path} is missing or damaged"))
            continue
        states.append(_self_renewing(svc.name, svc.cert_path, cert, svc.profile, svc.renewed_by, config, now))
    for gateway, cert in gateway_certs:
        states.append(_self_renewing(f"gateway {gateway} RA", Path(f"{gateway}:ra.pem"), cert, "gateway",
                                     f"gateway {gateway}, over the RA API", config, now))
    for name, path in (("issuing CA", paths.issuing_cert), ("root CA", paths.root_cert)):
        cert = read_cert(path)
        warning = None
        if cert is None:
            warning = f"{name} certificate {path} is missing or damaged"
        elif cert.not_valid_after_utc <= now:
            warning = f"{name} certificate expired at {cert.not_valid_after_utc.isoformat()}"
        elif cert.not_valid_after_utc - now <= EXPIRY_WARNING:
            warning = (f"{name} certificate expires at {cert.not_valid_after_utc.isoformat()}, within 30 days; "
                       "it is not renewed automatically")
        states.append(CertState(name, path, cert, None, None, None, warning))
    return states
