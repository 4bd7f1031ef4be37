"""Certificate profiles as data: lifetime, key usages, subject and SAN rules.

Issuance reads a profile; it never branches on a profile's name. A new kind of
certificate is a new entry here, not new code in `issuance.py`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

ALL_KEY_TYPES = frozenset({"ec-p256", "ec-p384", "ec-p521", "ed25519", "rsa"})


class SubjectRule(enum.Enum):
    DEVICE = "device"        # CN = device id, SAN = one SPIFFE URI (an X.509-SVID)
    SERVER = "server"        # CN = first DNS name, SANs = configured DNS names and IPs
    SERVICE = "service"      # CN = service name, SAN = spiffe://{td}/{service path}
    CA = "ca"                # subject given by the caller, no SAN


@dataclass(frozen=True)
class Profile:
    name: str
    lifetime: timedelta
    subject_rule: SubjectRule
    key_usage: frozenset[str] = frozenset({"digital_signature"})
    extended_key_usage: tuple[ObjectIdentifier, ...] = ()
    key_types: frozenset[str] = ALL_KEY_TYPES
    min_rsa_bits: int = 2048
    is_ca: bool = False
    path_length: int | None = None
    ocsp_nocheck: bool = False
    # CRL distribution point and AIA (OCSP, caIssuers) pointing at our responder.
    revocation_info: bool = True


DEVICE = Profile(
    name="device",
    lifetime=timedelta(hours=72),
    subject_rule=SubjectRule.DEVICE,
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
)

GATEWAY = Profile(
    name="gateway",
    lifetime=timedelta(days=90),
    subject_rule=SubjectRule.SERVICE,
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
)

SERVER = Profile(
    name="server",
    lifetime=timedelta(days=90),
    subject_rule=SubjectRule.SERVER,
    extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
)

OCSP = Profile(
    name="ocsp",
    lifetime=timedelta(days=7),
    subject_rule=SubjectRule.SERVICE,
    extended_key_usage=(ExtendedKeyUsageOID.OCSP_SIGNING,),
    ocsp_nocheck=True,           # RFC 6960 4.2.2.2.1: clients need not check the responder
    revocation_info=False,
)

# RFC 9336: id-kp-documentSigning, for signatures over documents (here the auditor's evidence
# export, ca/evidence.py). Not emailProtection (no mailbox is named, and an S/MIME client would
# take the certificate for a person's), not codeSigning, not OCSP or TLS: a key that signs exports
# can sign nothing a relying party would read as anything else.
DOCUMENT_SIGNING = ObjectIdentifier("1.3.6.1.5.5.7.3.36")

EVIDENCE = Profile(
    name="evidence",
    lifetime=timedelta(days=90),
    subject_rule=SubjectRule.SERVICE,
    extended_key_usage=(DOCUMENT_SIGNING,),
)

ROOT_CA = Profile(
    name="root-ca",
    lifetime=timedelta(days=3652 * 2),
    subject_rule=SubjectRule.CA,
    key_usage=frozenset({"key_cert_sign", "crl_sign"}),
    is_ca=True,
    revocation_info=False,
)

ISSUING_CA = Profile(
    name="issuing-ca",
    lifetime=timedelta(days=3652),
    subject_rule=SubjectRule.CA,
    key_usage=frozenset({"key_cert_sign", "crl_sign"}),
    is_ca=True,
    path_length=0,
    revocation_info=False,
)

BUILTIN: dict[str, Profile] = {p.name: p for p in (DEVICE, GATEWAY, SERVER, OCSP, EVIDENCE, ROOT_CA,
                                                   ISSUING_CA)}
