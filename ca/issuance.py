"""Building and signing certificates: pure functions of their inputs.

The clock (`now`) and the serial come in as arguments, so the same inputs give
the same certificate body; nothing here reads files, the database or the time.
"""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from . import policy
from .errors import PolicyViolationError
from .model import Device, spiffe_id
from .profiles import Profile
from .signer import Signer

# notBefore is set this far in the past so devices with slightly slow clocks
# accept a certificate the moment they receive it.
BACKDATE = timedelta(minutes=5)
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


def _revocation_extensions(builder: x509.CertificateBuilder, issuer: IssuerContext) -> x509.CertificateBuilder:
    if issuer.crl_url:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(issuer.crl_url)],
            relative_name=None, reasons=None, crl_issuer=None)
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    access = []
    if issuer.ocsp_url:
        access.append(x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(issuer.ocsp_url)))
    if issuer.ca_issuers_url:
        access.append(x509.AccessDescription(
            AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(issuer.ca_issuers_url)))
    if access:
        builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
    return builder


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
        issuer_cert = issuer.certificate
        # RFC 5280 6.1.3: a certificate outliving its issuer would fail path validation.
        not_after = min(not_after, issuer_cert.not_valid_after_utc)
        if not_after <= now:
            raise PolicyViolationError("issuing CA certificate has expired; rotate the issuing CA")
        issuer_name = issuer_cert.subject
        try:
            ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())
    else:
        issuer_name = subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    if signer is None:
        raise ValueError("a self-signed certificate needs a signer")

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=profile.is_ca, path_length=profile.path_length), critical=True)
        .add_extension(_key_usage(profile.key_usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    if profile.extended_key_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(profile.extended_key_usage)), critical=False)
    if sans:
        # RFC 5280 4.2.1.6: critical only when the subject is empty.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
    if profile.ocsp_nocheck:
        builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
    if profile.revocation_info and issuer is not None:
        builder = _revocation_extensions(builder, issuer)
    return builder.sign(signer.private_key, signer.hash_algorithm)


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
) -> x509.Certificate:
    """The device issuance function: check the CSR and device, then build from the registry.

    Only the CSR's public key is used. Subject and SANs come from the registry.
    """
    policy.proof_of_possession(csr)
    policy.key_allowed(csr.public_key(), profile)
    policy.device_active(device)
    policy.csr_names_this_device(csr, device, trust_domain)
    subject, sans = device_names(device.id, trust_domain)
    return build_certificate(
        public_key=csr.public_key(), subject=subject, sans=sans, profile=profile,
        issuer=issuer, serial=serial, now=now, lifetime=lifetime)
