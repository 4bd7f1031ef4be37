"""IEEE 802.1AR IDevID onboarding: which registered device a manufacturer's certificate names,
and whether the manufacturer's CRL still lets that certificate vouch for it."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from .credentials import IDevIDAuth
from .errors import UnauthorizedError, UnavailableError, UnknownDeviceError
from .model import Device


def serial_of(cert: x509.Certificate) -> str:
    """IEEE 802.1AR: the IDevID subject carries the device's serialNumber attribute."""
    values = cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
    if not values:
        raise UnauthorizedError("the IDevID certificate has no serialNumber in its subject")
    return str(values[0].value)


def same_maker(registered: str, manufacturer: str) -> bool:
    """A device registered without a manufacturer matches nobody's IDevID: which manufacturer
    CA may vouch for it is part of its registration, not something the first IDevID decides."""
    return bool(registered) and registered.casefold() == manufacturer.casefold()


def device_for(devices: list[Device], credential: IDevIDAuth) -> str:
    """`devices`: the registered devices with the IDevID's serial number (the store's index)."""
    serial = serial_of(credential.certificate)
    matches = [d for d in devices if d.serial_number == serial and same_maker(d.manufacturer, credential.manufacturer)]
    if len(matches) != 1:
        # two devices of one manufacturer with one serial number: the registry is wrong, say so
        raise UnknownDeviceError(
            f"no registered device of {credential.manufacturer} has serial number {serial!r}"
            if not matches else f"several devices of {credential.manufacturer} have serial number {serial!r}")
    return matches[0].id


def check(device: Device, credential: IDevIDAuth) -> None:
    serial = serial_of(credential.certificate)
    if device.serial_number != serial or not same_maker(device.manufacturer, credential.manufacturer):
        raise UnauthorizedError(f"the IDevID certificate ({credential.manufacturer}, serial number "
                                f"{serial!r}) does not belong to device {device.id}")


# -- manufacturer CRLs (RFC 5280 6.3): pure, the clock comes in; loading and refresh: enroll/idevid_crl.py

# A CRL whose thisUpdate is this far ahead of our clock is still used (a manufacturer's clock
# running a little fast must not suspend onboarding); nextUpdate gets no such allowance.
CRL_CLOCK_SKEW = timedelta(minutes=5)
# What a device refused for a stale or missing manufacturer CRL is told to wait (seconds).
CRL_RETRY_AFTER = 60
# The CRL extensions whose meaning this module applies; any other critical one refuses the CRL
# (RFC 5280 5.2: a CRL with an unrecognised critical extension must not be used).
_KNOWN_CRL_EXTENSIONS = (x509.CRLNumber, x509.AuthorityKeyIdentifier, x509.IssuingDistributionPoint,
                         x509.IssuerAlternativeName, x509.AuthorityInformationAccess)
# What a CRL entry may carry: an entry extension we cannot apply (certificateIssuer, i.e. an
# indirect CRL, or an unknown critical one) refuses the whole CRL.
_KNOWN_ENTRY_EXTENSIONS = (x509.CRLReason, x509.InvalidityDate)


class CRLError(ValueError):
    """A CRL that cannot serve as a manufacturer's revocation list; the message says why."""


@dataclass(frozen=True)
class CRLScope:
    """What a CRL covers (its issuingDistributionPoint, RFC 5280 5.2.5); None: every certificate
    of its issuer."""

    names: frozenset[x509.GeneralName] | None = None   # the distribution point it stands for
    only_users: bool = False
    only_cas: bool = False

    def covers(self, cert: x509.Certificate) -> bool:
        is_ca = _is_ca(cert)
        if (self.only_users and is_ca) or (self.only_cas and not is_ca):
            return False
        if self.names is None:
            return True
        try:   # a partitioned CRL covers the certificates whose cRLDistributionPoints name it
            points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            return False
        return any(p.full_name and self.names.intersection(p.full_name) for p in points)


@dataclass(frozen=True)
class ManufacturerCRL:
    """A manufacturer CA's complete CRL whose signature has been verified with that CA's key."""

    issuer: x509.Certificate            # the manufacturer CA (root or intermediate) that signed it
    this_update: datetime
    next_update: datetime
    number: int | None                  # cRLNumber (RFC 5280 5.2.3), when it has one
    revoked: frozenset[int]             # serial numbers listed
    scope: CRLScope
    fingerprint: bytes                  # SHA-256 of the DER, to tell a re-read of the same CRL

    def current(self, now: datetime) -> bool:
        return self.this_update - CRL_CLOCK_SKEW <= now < self.next_update

    def older_than(self, other: "ManufacturerCRL") -> bool:
        """RFC 5280 5.2.3: CRL numbers only rise; without numbers, thisUpdate orders them."""
        if self.number is not None and other.number is not None:
            return self.number < other.number
        return self.this_update < other.this_update

    def describe(self) -> str:
        number = f"number {self.number}" if self.number is not None else "no number"
        return (f"{number}, {len(self.revoked)} revoked, issuer {self.issuer.subject.rfc4514_string()}, "
                f"next update {self.next_update:%Y-%m-%dT%H:%M:%SZ}")


def accept_crl(crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]) -> ManufacturerCRL:
    """RFC 5280 6.3.3 as far as a manufacturer's CRL needs it: signed by one of `cas` (name and
    key), that CA allowed to sign CRLs, complete (not a delta), direct (not indirect), with a
    nextUpdate and no critical extension we cannot apply. Raises CRLError otherwise, also for
    the parts cryptography parses only when first read (names, extensions, entries)."""
    try:
        return _accept_crl(crl, cas)
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:   # TypeError: a name
        if isinstance(exc, CRLError):                                                   # attribute's type
            raise
        raise CRLError(f"part of it does not parse ({exc})") from None


def _accept_crl(crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]) -> ManufacturerCRL:
    issuer_name = crl.issuer.rfc4514_string()
    named = [ca for ca in cas if ca.subject == crl.issuer]
    if not named:
        raise CRLError(f"it is issued by {issuer_name!r}, which is none of the manufacturer's CA certificates")
    signer = next((ca for ca in named if _crl_signed_by(crl, ca)), None)
    if signer is None:
        raise CRLError(f"its signature does not verify with the key of {issuer_name!r}")
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:
            raise CRLError(f"{issuer_name!r} has no cRLSign key usage")
    except x509.ExtensionNotFound:
        pass
    if crl.next_update_utc is None:
        raise CRLError("it has no nextUpdate, so its staleness cannot be judged (RFC 5280 5.1.2.5)")
    scope, number = CRLScope(), None
    for ext in crl.extensions:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            raise CRLError("it is a delta CRL; configure the manufacturer's complete CRL")
        if isinstance(ext.value, x509.CRLNumber):
            number = ext.value.crl_number
        elif isinstance(ext.value, x509.IssuingDistributionPoint):
            scope = _scope(ext.value)
        elif ext.critical and not isinstance(ext.value, _KNOWN_CRL_EXTENSIONS):
            raise CRLError(f"it has a critical extension this server cannot apply ({ext.oid.dotted_string})")
    revoked = set()
    for entry in crl:
        for ext in entry.extensions:
            if not isinstance(ext.value, _KNOWN_ENTRY_EXTENSIONS) and (
                    ext.critical or isinstance(ext.value, x509.CertificateIssuer)):
                raise CRLError("it is an indirect CRL or has entry extensions this server cannot apply "
                               f"({ext.oid.dotted_string})")
        revoked.add(entry.serial_number)
    return ManufacturerCRL(signer, crl.last_update_utc, crl.next_update_utc, number, frozenset(revoked), scope,
                           crl.fingerprint(hashes.SHA256()))


def check_revocation(cert: x509.Certificate, issuer: x509.Certificate, cas: Sequence[x509.Certificate],
                     crls: Sequence[ManufacturerCRL], now: datetime, manufacturer: str) -> None:
    """An IDevID issued by `issuer` (one of the manufacturer's `cas`) against the manufacturer's
    CRLs: its issuer's CRL must cover it and be current (else the server cannot tell, and says
    so: UnavailableError), and must not list it (UnauthorizedError). The CAs above `issuer` in
    `cas` are checked against their own issuer's CRL when one is configured (a revoked
    intermediate refuses every IDevID under it)."""
    if _listed(cert, issuer, crls, now, manufacturer, required=True):
        raise UnauthorizedError("the IDevID certificate has been revoked by its manufacturer")
    for ca, parent in _chain_above(issuer, cas):
        if _listed(ca, parent, crls, now, manufacturer, required=False):
            raise UnauthorizedError("the manufacturer CA that issued this IDevID certificate has been revoked")


def check_ca_validity(issuer: x509.Certificate, cas: Sequence[x509.Certificate], now: datetime,
                      manufacturer: str) -> None:
    """The manufacturer CA that issued an IDevID, and the configured CAs above it, must be within
    their validity (the TLS layer skips time checks: tls.py; a device's own expired certificate
    is judged by the renewal policy, a manufacturer CA's by this)."""
    for ca in [issuer] + [parent for _, parent in _chain_above(issuer, cas)]:
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            raise UnauthorizedError(f"the {manufacturer} CA certificate that vouches for this IDevID "
                                    "is outside its validity")


def stale_issuers(crls: Sequence[ManufacturerCRL], now: datetime) -> list[x509.Certificate]:
    """The manufacturer CAs whose every CRL held is past its nextUpdate (or not yet valid)."""
    issuers = {c.issuer: False for c in crls}
    for c in crls:
        issuers[c.issuer] |= c.current(now)
    return [issuer for issuer, current in issuers.items() if not current]


def _listed(cert: x509.Certificate, issuer: x509.Certificate, crls: Sequence[ManufacturerCRL], now: datetime,
            manufacturer: str, *, required: bool) -> bool:
    usable = [c for c in crls if c.issuer == issuer and c.scope.covers(cert)]
    if not usable:
        if required:
            raise UnauthorizedError("no CRL of its manufacturer covers this IDevID certificate")
        return False
    current = [c for c in usable if c.current(now)]
    if not current:
        raise UnavailableError(f"IDevID onboarding from {manufacturer} is suspended: the manufacturer's CRL "
                               "is out of date; retry later or enroll with a token", retry_after=CRL_RETRY_AFTER)
    newest = max(current, key=lambda c: (c.number if c.number is not None else -1, c.this_update))
    return cert.serial_number in newest.revoked


def _chain_above(issuer: x509.Certificate, cas: Sequence[x509.Certificate]):
    """(CA, the CA of `cas` that signed it) from `issuer` up to a self-signed root."""
    seen, ca = {issuer}, issuer
    while ca.subject != ca.issuer:
        parent = next((p for p in cas if p not in seen and p.subject == ca.issuer and _cert_signed_by(ca, p)), None)
        if parent is None:
            return
        yield ca, parent
        seen.add(parent)
        ca = parent


def _scope(idp: x509.IssuingDistributionPoint) -> CRLScope:
    if idp.indirect_crl:
        raise CRLError("it is an indirect CRL (issuingDistributionPoint indirectCRL), which is not supported")
    if idp.only_some_reasons:
        raise CRLError("it covers only some revocation reasons (a partitioned CRL), which is not supported")
    if idp.only_contains_attribute_certs:
        raise CRLError("it covers only attribute certificates")
    if idp.relative_name is not None:
        raise CRLError("its issuingDistributionPoint has a relative name, which is not supported")
    names = frozenset(idp.full_name) if idp.full_name else None
    return CRLScope(names, idp.only_contains_user_certs, idp.only_contains_ca_certs)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def _cert_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
