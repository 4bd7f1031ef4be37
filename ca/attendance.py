"""Non-attendance: devices away longer than their period lose their certificates to a hold
(certificateHold), and get them back when they return with good posture.

Only proven contact counts as attendance (a renewal, a signed posture, a mutual-TLS request:
`Device.last_proven_contact`); an unsigned presence message is a report, not a return. High-
criticality devices are flagged, not held, unless configured otherwise: a life-sustaining device
must not lose its identity silently. Both functions run inside the caller's write transaction
and change statuses only through `ca.status`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from . import policy, status
from .config import CAConfig
from .errors import PostureError
from .model import AuditEvent, CertStatus, Criticality, Device, serial_hex
from .store import Tx

ACTOR = "system:attendance"


@dataclass
class AttendanceReport:
    held: dict[str, list[int]] = field(default_factory=dict)   # device id -> serials put on hold
    flagged: list[str] = field(default_factory=list)            # high-criticality devices only flagged


async def past_period(tx: Tx, config: CAConfig, now: datetime) -> list[Device]:
    """Active devices without proven contact for longer than their non-attendance period."""
    periods = [p.non_attendance for p in (*config.models.values(), *config.criticality.values()) if p.non_attendance]
    if not periods:
        return []
    away = []
    for device in await tx.absent_devices(now - min(periods)):
        period = config.non_attendance_for(device)
        if period is not None and (device.last_proven_contact or device.created_at) < now - period:
            away.append(device)
    return away


async def hold_absent(tx: Tx, config: CAConfig, now: datetime) -> AttendanceReport:
    report = AttendanceReport()
    for device in await past_period(tx, config, now):
        seen = device.last_proven_contact or device.created_at
        if device.criticality is Criticality.HIGH and not config.attendance.hold_high_criticality:
            if await tx.flag_absent(device.id, now):
                await tx.append_audit(AuditEvent("device_absent_flagged", ACTOR, device_id=device.id,
                                                 detail={"last_proven_contact": seen.isoformat()}), now)
                report.flagged.append(device.id)
            continue
        for record in await tx.list_certificates(device.id):
            if record.status is CertStatus.GOOD and record.not_after > now and \
                    await status.hold_absent(tx, record, now):
                await tx.append_audit(AuditEvent("certificate_held_absent", ACTOR, device_id=device.id,
                                                 serial=record.serial,
                                                 detail={"last_proven_contact": seen.isoformat()}), now)
                report.held.setdefault(device.id, []).append(record.serial)
    return report


async def release_returned(tx: Tx, config: CAConfig, device: Device, now: datetime) -> list[int]:
    """The device proved it is back: clear its flag and, if configured and its posture passes, lift
    the non-attendance holds still in force (never a revocation, never an operator's hold)."""
    if await tx.clear_absent_flag(device.id):
        await tx.append_audit(AuditEvent("device_returned", ACTOR, device_id=device.id), now)
    serials = await tx.attendance_holds(device.id)
    if not serials or not config.attendance.release_on_return:
        return []
    try:
        policy.posture_ok(device, config.min_firmware_for(device))
    except PostureError:
        return []
    released = []
    for serial in serials:
        if await status.release_absent(tx, serial, now):
            await tx.append_audit(AuditEvent("certificate_released", ACTOR, device_id=device.id, serial=serial,
                                             detail={"why": "device returned"}), now)
            released.append(serial)
    return released


def describe(report: AttendanceReport) -> str:
    held = ", ".join(f"{d} ({', '.join(serial_hex(s) for s in ss)})" for d, ss in report.held.items())
    return f"held: {held or 'none'}; flagged: {', '.join(report.flagged) or 'none'}"


async def held_for_absence(store, records) -> set[int]:
    """The serials among `records` (CertRecords) on hold for non-attendance rather than by an
    operator: feeds tell them apart, so that a relay keeps such a device able to come back and
    prove itself (the broker does not shut it out)."""
    held = [r for r in records if r.status is CertStatus.HOLD and r.device_id]
    found: set[int] = set()
    if not held:
        return found
    async with store.read() as tx:
        for device_id in {r.device_id for r in held}:
            found.update(await tx.attendance_holds(device_id))
    return found & {r.serial for r in held}
