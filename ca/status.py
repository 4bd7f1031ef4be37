"""Certificate status: the one table of allowed transitions and the only code that changes a status.

    good -> hold      (certificateHold: an operator, or the attendance check)
    hold -> good      (release: only from hold)
    good -> revoked   (any other reason)
    hold -> revoked   (a hold made final)

Revoked is terminal. Every caller (`Authority.revoke/hold/release/decommission`, the
attendance check, a device coming back) goes through these functions, inside its write
transaction. Each asks the store for a guarded change ("from this status to that one"): a
store that changed nothing, because another process got there first, is a refusal here,
never a silent success. The SQLite store also refuses, with a trigger, any UPDATE that would
take a certificate out of revoked, so no SQL path can undo a revocation either.
"""
from __future__ import annotations

from datetime import datetime

from . import metrics
from .errors import PolicyViolationError
from .model import CertRecord, CertStatus, RevocationReason, serial_hex
from .store import Tx

GOOD, HOLD, REVOKED = CertStatus.GOOD, CertStatus.HOLD, CertStatus.REVOKED

# (from, to) -> the operation that makes it. Nothing else is allowed.
TRANSITIONS: dict[tuple[CertStatus, CertStatus], str] = {
    (GOOD, HOLD): "hold",
    (HOLD, GOOD): "release",
    (GOOD, REVOKED): "revoke",
    (HOLD, REVOKED): "revoke",
}


class TransitionError(PolicyViolationError):
    """The certificate's current status does not allow the change asked for."""


def allowed(current: CertStatus, target: CertStatus) -> bool:
    return (current, target) in TRANSITIONS


def target_of(reason: RevocationReason) -> CertStatus:
    return HOLD if reason is RevocationReason.certificateHold else REVOKED


def _refuse(record: CertRecord, target: CertStatus) -> TransitionError:
    serial = serial_hex(record.serial)
    if record.status is REVOKED:
        return TransitionError(f"certificate {serial} is already revoked"
                               + (f" ({record.reason.name})" if record.reason else "") + "; revocation is final")
    if record.status is HOLD and target is HOLD:
        return TransitionError(f"certificate {serial} is already on hold")
    if target is GOOD:
        return TransitionError(f"certificate {serial} is {record.status.value}, not on hold; "
                               "only a hold can be released")
    return TransitionError(f"certificate {serial} cannot go from {record.status.value} to {target.value}")


async def revoke(tx: Tx, record: CertRecord, reason: RevocationReason, at: datetime) -> None:
    """good -> hold (certificateHold), good/hold -> revoked (any other reason)."""
    if reason is RevocationReason.removeFromCRL:
        raise PolicyViolationError("removeFromCRL is not a revocation reason; release the hold instead")
    target = target_of(reason)
    if not allowed(record.status, target):
        raise _refuse(record, target)
    if not await tx.change_status(record.serial, record.status, target, reason, at):
        raise await _lost_race(tx, record, target)
    tx.on_commit(metrics.STATUS_CHANGES.labels(target.value, reason.name).inc)
    if target is REVOKED:
        await tx.drop_attendance_hold(record.serial)   # a final revocation supersedes any hold


async def release(tx: Tx, record: CertRecord, at: datetime) -> None:
    """hold -> good."""
    if not allowed(record.status, GOOD):
        raise _refuse(record, GOOD)
    if not await tx.change_status(record.serial, HOLD, GOOD, None, at):
        raise await _lost_race(tx, record, GOOD)
    tx.on_commit(metrics.STATUS_CHANGES.labels("released", "").inc)
    await tx.drop_attendance_hold(record.serial)


async def hold_absent(tx: Tx, record: CertRecord, at: datetime) -> bool:
    """The attendance check's hold: good -> hold, remembered as a non-attendance hold. False when
    the certificate is no longer good (nothing is changed then)."""
    if record.status is not GOOD or not await tx.change_status(record.serial, GOOD, HOLD,
                                                                RevocationReason.certificateHold, at):
        return False
    tx.on_commit(metrics.STATUS_CHANGES.labels("hold", "absent").inc)
    await tx.add_attendance_hold(record.serial, record.device_id, at)
    return True


async def release_absent(tx: Tx, serial: int, at: datetime) -> bool:
    """Lift a non-attendance hold: only while the certificate is still on that same hold (not
    revoked since, not released and held again by an operator). False when nothing changed."""
    if not await tx.release_attendance_hold(serial, at):
        return False
    tx.on_commit(metrics.STATUS_CHANGES.labels("released", "returned").inc)
    await tx.drop_attendance_hold(serial)
    return True


async def _lost_race(tx: Tx, record: CertRecord, target: CertStatus) -> TransitionError:
    """The store changed nothing: another writer changed the status since `record` was read."""
    current = await tx.get_certificate(record.serial)
    if current is not None and current.status is not record.status:
        return _refuse(current, target)
    return TransitionError(f"certificate {serial_hex(record.serial)}: the status change from "
                           f"{record.status.value} to {target.value} was refused by the store")
