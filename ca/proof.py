"""What a device proves with its current certificate, and what that proof is allowed to change.

A renewal (CMS-signed over MQTT, or mutual TLS on EST) and a signed posture are proofs: the
request is signed with the key of a certificate this CA issued to the device. Only such a proof
counts as attendance, lifts a non-attendance hold, updates the firmware the renewal gate reads,
and marks the certificate used; once a newer certificate of the device has been used, an older
one proves nothing (it is superseded: a clone, or a device restored from a backup).

Unsigned MQTT presence and posture are reports: shown, labelled unverified, never trusted.
Everything here runs inside the caller's write transaction.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import attendance, policy
from .config import CAConfig
from .errors import SupersededError, UnknownDeviceError
from .model import CertRecord, CertStatus, Device, serial_hex
from .store import Tx


@dataclass(frozen=True)
class Proven:
    record: CertRecord          # the certificate that signed (or authenticated the TLS connection)
    device: Device
    absent_hold: bool           # it is on a non-attendance hold, which the proof may lift


async def prove(tx: Tx, config: CAConfig, issuer_cert: x509.Certificate, cert: x509.Certificate,
                claimed_device_id: str | None, now: datetime) -> Proven:
    """Check that `cert` (whose key signed the request) is a current certificate of the device:
    ours, on file, of the device the request names, the device active, not revoked and not on an
    operator's hold, within its validity or renewal grace, and not superseded."""
    record = policy.certificate_on_file(await tx.get_certificate(cert.serial_number), cert, issuer_cert)
    policy.same_device(record, claimed_device_id)
    device = await tx.get_device(record.device_id)
    if device is None:
        raise UnknownDeviceError(f"device {record.device_id} is not registered")
    policy.device_active(device)  # a decommissioned device: revoked, whatever its certificate says
    # A certificate on a non-attendance hold still proves its device: coming back is what lifts it.
    absent_hold = record.status is CertStatus.HOLD and record.serial in await tx.attendance_holds(device.id)
    if not absent_hold:
        policy.not_revoked(record)
    policy.within_validity(record, now, config.renewal_grace_for(device))
    newer = await tx.newer_used_certificate(record.serial)
    if newer is not None:
        raise SupersededError(
            f"certificate {serial_hex(record.serial)} is superseded: device {device.id} has used its newer "
            f"certificate {serial_hex(newer)} since; renew with the current certificate",
            serial=record.serial, newer=newer, device_id=device.id)
    return Proven(record, device, absent_hold)


async def named_device(tx: Tx, cert: x509.Certificate) -> str | None:
    """The device a presented certificate is on file for (byte for byte), proven or not: to name
    the device in the audit entry of a refusal."""
    record = await tx.get_certificate(cert.serial_number)
    if record is None or record.device_id is None or record.der != cert.public_bytes(serialization.Encoding.DER):
        return None
    return record.device_id


async def count_contact(tx: Tx, config: CAConfig, proven: Proven, now: datetime) -> tuple[Device, list[int]]:
    """The device proved itself now: attendance counted, the certificate marked used, and its
    non-attendance holds lifted when configured and its (proven) posture passes. Returns the
    device as it is now (a posture may have changed its firmware) and the serials released."""
    await tx.record_proven_contact(proven.device.id, now)
    await tx.mark_used(proven.record.serial, now)
    device = await tx.get_device(proven.device.id)
    return device, await attendance.release_returned(tx, config, device, now)
