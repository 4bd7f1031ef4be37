"""Value types of the CA domain: frozen dataclasses and enums, no I/O."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from common.ids import DEVICE_ID_RE, check_id  # noqa: F401 (DEVICE_ID_RE re-exported)

from .errors import BadRequestError

# SPIFFE trust domain: lowercase letters, digits, dots, dashes, underscores.
TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")


def check_device_id(device_id: str) -> str:
    return check_id(device_id, "device id")


def check_trust_domain(name: str) -> str:
    if not TRUST_DOMAIN_RE.match(name) or name.startswith(".") or ".." in name:
        raise BadRequestError(f"invalid trust domain {name!r}: use lowercase letters, digits, '.', '-', '_'")
    return name


def spiffe_id(trust_domain: str, device_id: str) -> str:
    return f"spiffe://{trust_domain}/device/{device_id}"


def serial_hex(serial: int) -> str:
    """The contract's serial spelling: lowercase hex without leading zeros."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    t = text.strip().lower().replace(":", "")
    if t.startswith("0x"):
        t = t[2:]
    if not t or len(t) > 40 or any(c not in "0123456789abcdef" for c in t):
        raise BadRequestError(f"invalid serial {text!r}: expected hex, at most 20 bytes")
    return int(t, 16)


class DeviceStatus(str, enum.Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DECOMMISSIONED = "decommissioned"


class Criticality(str, enum.Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class CertStatus(str, enum.Enum):
    GOOD = "good"
    REVOKED = "revoked"
    HOLD = "hold"


class RevocationReason(enum.Enum):
    """RFC 5280 5.3.1 CRLReason codes (7 is unused by the RFC)."""

    unspecified = 0
    keyCompromise = 1
    cACompromise = 2
    affiliationChanged = 3
    superseded = 4
    cessationOfOperation = 5
    certificateHold = 6
    removeFromCRL = 8
    privilegeWithdrawn = 9
    aACompromise = 10

    @classmethod
    def parse(cls, text: str) -> "RevocationReason":
        wanted = text.replace("-", "").replace("_", "").lower()
        for member in cls:
            if member.name.lower() == wanted:
                return member
        names = ", ".join(m.name for m in cls if m not in (cls.removeFromCRL, cls.certificateHold))
        raise BadRequestError(f"unknown revocation reason {text!r}; one of: {names}")

    @property
    def flag(self) -> x509.ReasonFlags:
        return {
            0: x509.ReasonFlags.unspecified,
            1: x509.ReasonFlags.key_compromise,
            2: x509.ReasonFlags.ca_compromise,
            3: x509.ReasonFlags.affiliation_changed,
            4: x509.ReasonFlags.superseded,
            5: x509.ReasonFlags.cessation_of_operation,
            6: x509.ReasonFlags.certificate_hold,
            8: x509.ReasonFlags.remove_from_crl,
            9: x509.ReasonFlags.privilege_withdrawn,
            10: x509.ReasonFlags.aa_compromise,
        }[self.value]


@dataclass(frozen=True)
class Device:
    id: str
    model: str
    owner: str
    location: str = ""
    criticality: Criticality = Criticality.MEDIUM
    firmware: str = ""
    manufacturer: str = ""
    serial_number: str = ""
    udi_di: str = ""
    udi_pi: str = ""
    asset_tag: str = ""
    status: DeviceStatus = DeviceStatus.ACTIVE
    created_at: datetime | None = None
    # Proven: the device showed its current key (renewal, signed posture, mutual TLS). Attendance
    # and the firmware gate read only these and `firmware` (proven, or set by an operator).
    last_proven_contact: datetime | None = None
    posture_signed_at: datetime | None = None     # signingTime of the newest signed posture accepted
    # Reported: unsigned MQTT presence and posture, shown as unverified, never trusted.
    reported_online: bool | None = None
    reported_online_at: datetime | None = None
    reported_firmware: str = ""
    reported_posture_at: datetime | None = None
    # A renewal was signed with a certificate older than one the device has used since.
    clone_suspected_at: datetime | None = None


@dataclass(frozen=True)
class Token:
    """A freshly made enrollment token: the secret exists only in this object."""

    device_id: str
    secret: str
    expires_at: datetime


@dataclass(frozen=True)
class CertRecord:
    """A certificate as the store keeps it."""

    serial: int
    device_id: str | None
    profile: str
    not_before: datetime
    not_after: datetime
    der: bytes
    status: CertStatus = CertStatus.GOOD
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None


@dataclass(frozen=True)
class Revocation:
    serial: int
    reason: RevocationReason
    revoked_at: datetime


@dataclass(frozen=True)
class Issued:
    """What issuance hands back: the certificate and the chain to its root."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    device_id: str | None
    profile: str
    new: bool = True   # False: the certificate an earlier request with the same id produced

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True)
class AuditEvent:
    action: str
    actor: str
    device_id: str | None = None
    serial: int | None = None
    detail: dict = field(default_factory=dict)


class GatewayStatus(str, enum.Enum):
    """A registered gateway: `registered` until it enrolls with its one-time token, then `active`;
    `revoked` is final (its RA certificates are revoked and the RA API refuses it)."""
    REGISTERED = "registered"
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Gateway:
    """A gateway (registration authority) as the store keeps it; the token only as a digest."""

    name: str
    status: GatewayStatus
    created_at: datetime
    created_by: str
    token_digest: bytes | None = None
    token_expires_at: datetime | None = None
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None
    # its newest RA certificate, when it has one
    serial: int | None = None
    not_after: datetime | None = None
