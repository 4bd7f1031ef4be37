"""Approval of first enrollments, bound to one key: what waits, an engineer's approval of exactly
one waiting key, and its use by one issuance.

`[ca.approval]` names the device classes (criticality, model) whose first enrollment waits for an
engineer. What waits is a request, not a device: each distinct public key a device's credential
(token, IDevID) brought is one row, named by its fingerprint, the SHA-256 of the key's DER
SubjectPublicKeyInfo as lowercase hex (`openssl pkey -pubin -outform DER | sha256sum`). A row
keeps the key type, the source the edge saw (`ra:GATEWAY` for a relayed request; None when the
credential carries none), when the key first asked and when it last asked.

- The same key asking again changes only its last-seen time and source: no new row, no audit.
- At most MAX_WAITING_KEYS rows per device. A further new key gets the same 202 but is neither
  recorded nor audited (a warning is logged): the keys already waiting, among them the real
  device's, cannot be pushed out by someone holding a stolen token. `iomtca device reject`
  clears them (after `iomtca device token` has burned that token).
- `approve` marks one waiting row; only an enrollment with that very key gets through. Without a
  fingerprint it is allowed only while exactly one key waits.
- The issuance that uses an approval deletes every row of the device, in its own transaction:
  an approval is used at most once, and a later first enrollment waits again.

Only a caller whose credential already matched gets this far (a wrong token is refused before),
so strangers cannot fill the rows; nothing secret is kept (no token, only the public key's hash).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .errors import BadRequestError, CAError, NotFoundError, PendingApprovalError
from .model import AuditEvent
from .timefmt import to_rfc3339

log = logging.getLogger(__name__)

MAX_WAITING_KEYS = 5
RETRY_AFTER = 60   # seconds, the Retry-After of the 202 (RFC 7030 4.2.3)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


@dataclass(frozen=True)
class ApprovalRequest:
    """One key waiting (or approved and not yet used) for one device's first enrollment."""

    device_id: str
    fingerprint: str            # lowercase hex SHA-256 of the DER SubjectPublicKeyInfo
    key_type: str               # "EC P-256", "RSA 2048", "Ed25519"
    source: str | None          # the client address as the edge saw it, or "ra:GATEWAY"
    requested_at: datetime      # first asked
    last_seen_at: datetime      # last asked
    approved_at: datetime | None = None
    approved_by: str | None = None

    @property
    def approved(self) -> bool:
        return self.approved_at is not None

    def describe(self) -> str:
        return (f"{self.key_type} {self.fingerprint} from {self.source or '-'}, "
                f"first seen {to_rfc3339(self.requested_at)}")


def fingerprint(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def key_type(public_key) -> str:
    """A key's type as an engineer reads it: "EC P-256", "RSA 2048", "Ed25519"."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {_CURVES.get(public_key.curve.name, public_key.curve.name)}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(public_key).__name__


def parse_fingerprint(text: str) -> str:
    """An engineer's fingerprint: hex in either case, with or without colons, as we store it."""
    value = text.strip().replace(":", "").lower()
    if not _HEX64.fullmatch(value):
        raise BadRequestError("a key fingerprint is 64 hex digits (SHA-256 of the DER SubjectPublicKeyInfo, "
                              "as `iomtca device pending` shows it), with or without colons")
    return value


async def check(tx, device_id: str, public_key) -> None:
    """Pass only an enrollment whose key an engineer approved; else PendingApprovalError, after
    which the caller records the request (`record`) in a transaction of its own."""
    fp = fingerprint(public_key)
    request = await tx.get_approval(device_id, fp)
    if request is not None and request.approved:
        return
    raise PendingApprovalError(f"enrollment of device {device_id} waits for approval of its key {fp} "
                               "(iomtca device pending)", retry_after=RETRY_AFTER)


async def record(tx, device_id: str, public_key, source: str | None, now: datetime, who: str) -> str:
    """Keep a waiting request: "recorded" (new, audited), "seen" (the same key again: its last-seen
    time and source updated) or "full" (a new key beyond MAX_WAITING_KEYS: not kept)."""
    fp = fingerprint(public_key)
    if await tx.get_approval(device_id, fp) is not None:
        await tx.touch_approval(device_id, fp, now, source)
        return "seen"
    if len(await tx.pending_approvals(device_id)) >= MAX_WAITING_KEYS:
        log.warning("approval: device=%s already has %d keys waiting; key %s from %s not recorded",
                    device_id, MAX_WAITING_KEYS, fp, source or "-")
        return "full"
    kind = key_type(public_key)
    await tx.request_approval(ApprovalRequest(device_id, fp, kind, source, now, now))
    await tx.append_audit(AuditEvent("enroll_pending_approval", who, device_id=device_id, detail={
        "fingerprint": fp, "key_type": kind, "source": source}), now)
    log.info("approval: device=%s key %s %s from %s waits", device_id, kind, fp, source or "-")
    return "recorded"


def _listing(requests: list[ApprovalRequest]) -> str:
    return "\n".join(f"  {r.describe()}" + (" (approved)" if r.approved else "") for r in requests)


async def _chosen(tx, device_id: str, fingerprint_text: str | None) -> ApprovalRequest:
    """The request an engineer means: the one with this fingerprint, or the only one waiting."""
    requests = await tx.pending_approvals(device_id)
    waiting = [r for r in requests if not r.approved]
    if fingerprint_text is None:
        if not waiting:
            raise NotFoundError(
                f"no enrollment of device {device_id} waits for approval; an approval binds the key the "
                "device enrolls with, so the device asks first (then `iomtca device pending` lists it)")
        if len(waiting) > 1:
            raise BadRequestError(f"{len(waiting)} keys wait for approval for device {device_id}; choose one "
                                  f"(iomtca device approve {device_id} --fingerprint FP):\n{_listing(waiting)}")
        return waiting[0]
    fp = parse_fingerprint(fingerprint_text)
    match = next((r for r in requests if r.fingerprint == fp), None)
    if match is None:
        raise NotFoundError(f"no enrollment of device {device_id} with key {fp} waits for approval; "
                            + (f"waiting:\n{_listing(requests)}" if requests else "none of its keys waits"))
    return match


async def approve(tx, device_id: str, fingerprint_text: str | None, now: datetime, actor: str) -> ApprovalRequest:
    """Approve one waiting key of `device_id` (the device exists and is active: the caller checked)."""
    request = await _chosen(tx, device_id, fingerprint_text)
    if request.approved:
        raise BadRequestError(f"key {request.fingerprint} of device {device_id} is already approved "
                              f"(by {request.approved_by}, {to_rfc3339(request.approved_at)}); "
                              "the device's next enrollment with it gets its certificate")
    if not await tx.approve(device_id, request.fingerprint, now, actor):   # guarded: still waiting
        raise CAError(f"the request of key {request.fingerprint} of device {device_id} changed meanwhile")
    await tx.append_audit(AuditEvent("enroll_approved", actor, device_id=device_id, detail={
        "fingerprint": request.fingerprint, "key_type": request.key_type, "source": request.source,
        "requested_at": to_rfc3339(request.requested_at)}), now)
    log.info("approval: device=%s key %s approved by %s", device_id, request.fingerprint, actor)
    return replace(request, approved_at=now, approved_by=actor)


async def reject(tx, device_id: str, fingerprint_text: str | None, now: datetime,
                 actor: str) -> list[ApprovalRequest]:
    """Drop the requests of `device_id` (all of them, or the one with this fingerprint), approved
    or not. A key dropped that asks again waits again, as a new request."""
    if fingerprint_text is not None:
        requests = [await _chosen(tx, device_id, fingerprint_text)]
    else:
        requests = await tx.pending_approvals(device_id)
    if not requests:
        raise NotFoundError(f"no enrollment of device {device_id} waits for approval")
    for r in requests:
        await tx.clear_approval(device_id, r.fingerprint)
    await tx.append_audit(AuditEvent("enroll_approval_rejected", actor, device_id=device_id, detail={
        "fingerprints": [r.fingerprint for r in requests]}), now)
    return requests
