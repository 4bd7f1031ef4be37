"""A simulated device's identity and its decisions: a pure state machine, no I/O.

The device keeps its current certificate and key until a renewed pair has been
used successfully once; a failed renewal never leaves it with nothing.
"""
from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from cryptography import x509

from ca.timefmt import from_rfc3339, to_rfc3339


class State(str, enum.Enum):
    UNENROLLED = "unenrolled"
    ENROLLED = "enrolled"
    RENEWING = "renewing"
    EXPIRED = "expired"        # past notAfter: the grace path may still renew it
    REVOKED = "revoked"
    STRANDED = "stranded"      # past the grace period: needs a new token from an engineer


class Action(str, enum.Enum):
    ENROLL = "enroll"
    RENEW = "renew"
    NONE = "none"


@dataclass
class DeviceRecord:
    """What a device keeps in its folder (besides its key and certificate files)."""

    device_id: str
    model: str
    firmware: str
    transport: str                     # "http" or "mqtt"
    token: str | None = None
    state: State = State.UNENROLLED
    not_before: str | None = None      # of the current certificate (RFC 3339)
    not_after: str | None = None
    issued_at: str | None = None       # when the device received it (notBefore is backdated)
    serial: str | None = None
    pending: dict[str, str] = field(default_factory=dict)  # request id -> op, awaiting an answer
    renew_requested: bool = False      # the gateway said "renew"
    server_keygen: bool = False        # some models cannot make keys (RFC 7030 serverkeygen)

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DeviceRecord":
        data = json.loads(text)
        data["state"] = State(data["state"])
        return cls(**data)


def adopt(record: DeviceRecord, cert: x509.Certificate, received_at: datetime) -> None:
    """A new certificate is in use: remember its validity; the device is enrolled."""
    record.not_before = to_rfc3339(cert.not_valid_before_utc)
    record.not_after = to_rfc3339(cert.not_valid_after_utc)
    record.issued_at = to_rfc3339(max(received_at, cert.not_valid_before_utc))
    record.serial = format(cert.serial_number, "x")
    record.state = State.ENROLLED
    record.renew_requested = False
    record.token = None  # one-time: spent


def renewal_point(record: DeviceRecord, fraction: float = 2 / 3) -> datetime | None:
    """`fraction` of the way from issuance to notAfter. Not from notBefore: it is backdated a few
    minutes for clock skew, which would swallow the whole of a short demo lifetime."""
    if record.not_after is None:
        return None
    start = from_rfc3339(record.issued_at or record.not_before)
    end = from_rfc3339(record.not_after)
    return start + (end - start) * fraction


def next_action(record: DeviceRecord, now: datetime, grace: timedelta, fraction: float = 2 / 3) -> Action:
    """What the device should do now that it is online."""
    if record.state in (State.REVOKED, State.STRANDED):
        return Action.NONE
    if record.state is State.UNENROLLED:
        return Action.ENROLL if record.token else Action.NONE
    end = from_rfc3339(record.not_after)
    if now > end + grace:
        record.state = State.STRANDED
        return Action.NONE
    if now > end:
        record.state = State.EXPIRED
        return Action.RENEW
    if record.renew_requested or now >= renewal_point(record, fraction):
        return Action.RENEW
    return Action.NONE


def has_valid_certificate(record: DeviceRecord, now: datetime) -> bool:
    return (record.state in (State.ENROLLED, State.RENEWING) and record.not_after is not None
            and from_rfc3339(record.not_before) <= now <= from_rfc3339(record.not_after))
