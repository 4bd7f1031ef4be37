"""Building and signing certificates: pure functions of their inputs.

The clock (`now`) and the serial come in as arguments, so the same inputs give
the same certificate body; nothing here reads files, the database or the time.

The TBSCertificate is DER-encoded here (`der.py`) rather than through
cryptography's CertificateBuilder: the extensions that are the same for every
certificate of a profile and issuer are encoded once and reused, which halves
the cost of a certificate. The tests hold the result byte for byte to what
CertificateBuilder makes from the same inputs, and openssl, GnuTLS and pkilint
judge it.
"""
from __future__ import annotations

import functools
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from common.renewal import BACKDATE  # noqa: F401 (notBefore is set this far in the past)

from . import der, policy
from .errors import PolicyViolationError
from .model import Device, spiffe_id
from .profiles import SERVER, Profile
from .signer import KeySigner, Signer
SERIAL_BITS = 159  # positive, fits the 20-octet limit of RFC 5280 4.1.2.2


def new_serial() -> int:
    """A random positive serial with 159 bits from the OS CSPRNG (CA/B BR asks for >= 64)."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial.bit_length() > 64:
            return serial


@dataclass(frozen=True)
class IssuerContext:
    """Everything about the issuing CA that goes into what it signs."""

    certificate: x509.Certificate
    signer: Signer
    chain: tuple[x509.Certificate, ...]   # issuing CA first, root last
    crl_url: str | None = None
    ocsp_url: str | None = None
    ca_issuers_url: str | None = None


def _key_usage(names: frozenset[str]) -> x509.KeyUsage:
    flags = {n: n in names for n in (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign")}
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)


def _revocation_extensions(issuer: IssuerContext) -> list[x509.Extension]:
    extensions = []
    if issuer.crl_url:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(issuer.crl_url)],
            relative_name=None, reasons=None, crl_issuer=None)
        extensions.append(x509.CRLDistributionPoints([point]))
    access = []
    if issuer.ocsp_url:
        access.append(x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(issuer.ocsp_url)))
    if issuer.ca_issuers_url:
        access.append(x509.AccessDescription(
            AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(issuer.ca_issuers_url)))
    if access:
        extensions.append(x509.AuthorityInformationAccess(access))
    return extensions


def _extension(value: x509.ExtensionType, critical: bool = False) -> bytes:
    return der.extension(value.oid.dotted_string, value.public_bytes(), critical)


_FIXED: dict[tuple[int, int], tuple[Profile, IssuerContext | None, tuple[bytes, bytes, bytes]]] = {}


def _fixed_extensions(profile: Profile, issuer: IssuerContext | None) -> tuple[bytes, bytes, bytes]:
    # keyed by identity (hashing an IssuerContext hashes certificates); the entry keeps both alive,
    # so an id is never reused while its entry stands
    key = (id(profile), id(issuer))
    entry = _FIXED.get(key)
    if entry is None or entry[0] is not profile or entry[1] is not issuer:
        if len(_FIXED) > 64:
            _FIXED.clear()
        entry = _FIXED[key] = (profile, issuer, _encode_fixed_extensions(profile, issuer))
    return entry[2]


def _encode_fixed_extensions(profile: Profile, issuer: IssuerContext | None) -> tuple[bytes, bytes, bytes]:
    """(before SKI, after SKI up to the SAN, after the SAN) for a profile and issuer, encoded once.

    The order is the one CertificateBuilder would emit for the same additions: basicConstraints,
    keyUsage, SKI, AKI, EKU, SAN, OCSP no-check, CRL distribution points, AIA.
    """
    head = (_extension(x509.BasicConstraints(ca=profile.is_ca, path_length=profile.path_length), True)
            + _extension(_key_usage(profile.key_usage), True))
    middle = b""
    if issuer is not None:
        try:
            ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            middle = _extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski))
        except x509.ExtensionNotFound:
            middle = _extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.certificate.public_key()))
    if profile.extended_key_usage:
        middle += _extension(x509.ExtendedKeyUsage(list(profile.extended_key_usage)))
    tail = _extension(x509.OCSPNoCheck()) if profile.ocsp_nocheck else b""
    if profile.revocation_info and issuer is not None:
        tail += b"".join(_extension(e) for e in _revocation_extensions(issuer))
    return head, middle, tail


@functools.lru_cache(maxsize=16)
def _issuer_name(certificate: x509.Certificate) -> bytes:
    return certificate.subject.public_bytes()


def build_certificate(
    *,
    public_key,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    profile: Profile,
    issuer: IssuerContext | None,
    serial: int,
    now: datetime,
    signer: Signer | None = None,
    lifetime: timedelta | None = None,
) -> x509.Certificate:
    """Build and sign one certificate; `issuer=None` makes a self-signed root with `signer`."""
    lifetime = lifetime or profile.lifetime
    not_before = now - BACKDATE
    not_after = now + lifetime
    if issuer is not None:
        signer = issuer.signer
        # RFC 5280 6.1.3: a certificate outliving its issuer would fail path validation.
        not_after = min(not_after, issuer.certificate.not_valid_after_utc)
        if not_after <= now:
            raise PolicyViolationError("issuing CA certificate has expired; rotate the issuing CA")
    if signer is None:
        raise ValueError("a self-signed certificate needs a signer")
    if not 0 < serial.bit_length() <= SERIAL_BITS or serial < 0:
        raise ValueError(f"the serial must be positive and at most {SERIAL_BITS} bits (RFC 5280 4.1.2.2)")
    subject_der = subject.public_bytes()
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    head, middle, tail = _fixed_extensions(profile, issuer)
    ski = _extension(x509.SubjectKeyIdentifier.from_public_key(public_key))
    if issuer is None:  # self-signed: the AKI names the certificate's own key
        middle = _extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)) + middle
    # RFC 5280 4.2.1.6: the SAN is critical only when the subject is empty.
    san = _extension(x509.SubjectAlternativeName(sans), len(subject) == 0) if sans else b""
    tbs = der.sequence(
        der.explicit(0, der.integer(2)),  # v3
        der.integer(serial),
        signer.algorithm_identifier,
        subject_der if issuer is None else _issuer_name(issuer.certificate),
        der.sequence(der.time(not_before), der.time(not_after)),
        subject_der,
        spki,
        der.explicit(3, der.sequence(head, ski, middle, san, tail)),
    )
    signature = signer.sign(tbs)
    return x509.load_der_x509_certificate(der.sequence(tbs, signer.algorithm_identifier, der.bit_string(signature)))


def device_names(device_id: str, trust_domain: str) -> tuple[x509.Name, list[x509.GeneralName]]:
    """Subject CN = device id and exactly one URI SAN: a valid SPIFFE X.509-SVID."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return subject, [x509.UniformResourceIdentifier(spiffe_id(trust_domain, device_id))]


def server_names(names: list[str]) -> tuple[x509.Name, list[x509.GeneralName]]:
    """DNS names and IP addresses for a TLS server; CN is the first DNS name."""
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    dns = [n for n in names if _ip_or_none(n) is None]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else names[0])])
    return subject, sans


def service_names(common_name: str, trust_domain: str, path: str) -> tuple[x509.Name, list[x509.GeneralName]]:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return subject, [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/{path}")]


def _ip_or_none(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def issue_device_certificate(
    csr: x509.CertificateSigningRequest,
    device: Device,
    profile: Profile,
    issuer: IssuerContext,
    *,
    trust_domain: str,
    serial: int,
    now: datetime,
    lifetime: timedelta | None = None,
    checked_key=None,
) -> x509.Certificate:
    """The device issuance function: check the CSR and device, then build from the registry.

    Only the CSR's public key is used. Subject and SANs come from the registry.
    `checked_key`: what `proven_key(csr)` returned, when the caller checked it already.
    """
    public_key = checked_key if checked_key is not None else proven_key(csr)
    policy.key_allowed(public_key, profile)
    policy.device_active(device)
    policy.csr_names_this_device(csr, device, trust_domain)
    subject, sans = device_names(device.id, trust_domain)
    return build_certificate(
        public_key=public_key, subject=subject, sans=sans, profile=profile,
        issuer=issuer, serial=serial, now=now, lifetime=lifetime)


def proven_key(csr: x509.CertificateSigningRequest):
    """The CSR's public key, once its signature shows the requester holds the private key.

    The costliest check of an issuance (a signature verification), and one that needs nothing
    but the CSR: the Authority runs it before taking the write lock.
    """
    policy.proof_of_possession(csr)
    return csr.public_key()


def self_check_certificate(key, now: datetime, lifetime: timedelta = timedelta(hours=1)) -> x509.Certificate:
    """A self-signed TLS server certificate for a process's own in-memory handshakes (the channel
    binding self-check, enroll/channel_binding.py): trusted by nobody, never stored or served."""
    subject, sans = server_names(["localhost"])
    return build_certificate(public_key=key.public_key(), subject=subject, sans=sans, profile=SERVER, issuer=None,
                             serial=new_serial(), now=now, signer=KeySigner(key), lifetime=lifetime)
