"""How a caller proves the right to a device certificate: one type per kind of proof."""
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509


@dataclass(frozen=True)
class TokenAuth:
    """The device's one-time enrollment token (EST Basic auth, MQTT `token`). `source`: where the
    attempt came from (the client address, or `ra:GATEWAY` for a relayed one), for ca/failures.py."""

    secret: str
    source: str | None = None


@dataclass(frozen=True)
class OperatorAuth:
    """An operator vouches for the request (manual onboarding, revocation...). `role` None: the
    local CLI operator (the OS account of the real uid, all rights); otherwise an operator
    account of ca/operators.py with that role."""

    name: str
    role: str | None = None


@dataclass(frozen=True)
class CertificateAuth:
    """The device's current certificate as TLS client certificate (EST simplereenroll)."""

    certificate: x509.Certificate


@dataclass(frozen=True)
class SignedRequestAuth(CertificateAuth):
    """The device's current certificate as signer of a CMS-signed CSR (MQTT simplereenroll);
    `signing_time` is the CMS signingTime attribute, None when the request carried none."""

    signing_time: datetime | None = None


@dataclass(frozen=True)
class IDevIDAuth:
    """A manufacturer-installed identity (IEEE 802.1AR IDevID) from a configured manufacturer root."""

    certificate: x509.Certificate
    manufacturer: str
    source: str | None = None   # where the request came from, as the edge saw it (shown with an approval)


Credential = TokenAuth | OperatorAuth | CertificateAuth | SignedRequestAuth | IDevIDAuth


def operator() -> OperatorAuth:
    """The operator at the CLI: the account of the process's real uid, never LOGNAME or USER from
    the environment (which anyone can set); the uid itself where it has no passwd entry."""
    uid = os.getuid()
    try:
        return OperatorAuth(pwd.getpwuid(uid).pw_name)
    except KeyError:   # no passwd entry (some containers)
        return OperatorAuth(f"uid-{uid}")


def actor(credential: Credential, device_id: str = "") -> str:
    """Who an audit row names: `operator:NAME` (the CLI), `operator:NAME:ROLE` (an operator
    account), `device:ID` or `device:ID:idevid`."""
    if isinstance(credential, OperatorAuth):
        if credential.role is None:
            return f"operator:{credential.name}"
        return f"operator:{credential.name}:{credential.role}"
    if isinstance(credential, IDevIDAuth):
        return f"device:{device_id}:idevid"
    return f"device:{device_id}"
