"""The one JSON shape of a device, a certificate and an audit entry, for every edge that shows
them (the CLI's --json, the admin API, the console's exports): what a field means is said once.

Proven facts and what unsigned messages reported are separate fields; the reported ones are
named `reported_*` and never merged into the proven ones.
"""
from __future__ import annotations

import json
from datetime import datetime

from .audit import AuditRow
from .model import CertRecord, Device, serial_hex
from .timefmt import to_rfc3339


def ts(value: datetime | None) -> str | None:
    return to_rfc3339(value) if value else None


def device_json(d: Device, cert_expires: datetime | None) -> dict:
    return {
        "device_id": d.id, "model": d.model, "owner": d.owner, "location": d.location,
        "criticality": d.criticality.value, "firmware": d.firmware, "manufacturer": d.manufacturer,
        "serial_number": d.serial_number, "udi_di": d.udi_di, "udi_pi": d.udi_pi, "asset_tag": d.asset_tag,
        "status": d.status.value,
        "created_at": ts(d.created_at),
        # proven: a renewal, a signed posture or a mutual-TLS request with the device's current key
        "last_proven_contact": ts(d.last_proven_contact),
        "posture_signed_at": ts(d.posture_signed_at),
        # reported by unsigned MQTT presence/posture: shown, never trusted
        "reported_online": d.reported_online,
        "reported_online_at": ts(d.reported_online_at),
        "reported_firmware": d.reported_firmware or None,
        "reported_posture_at": ts(d.reported_posture_at),
        "clone_suspected_at": ts(d.clone_suspected_at),
        "cert_not_after": ts(cert_expires),
    }


def editable_values(d: Device) -> dict[str, str]:
    """The fields an operator may edit (ca/registry.py EDITABLE), as an edit form or a row shows
    them: `udi` is the DI and PI together."""
    return {"model": d.model, "owner": d.owner, "location": d.location, "criticality": d.criticality.value,
            "firmware": d.firmware, "manufacturer": d.manufacturer, "serial_number": d.serial_number,
            "udi": " ".join(v for v in (d.udi_di, d.udi_pi) if v), "asset_tag": d.asset_tag}


def cert_json(r: CertRecord) -> dict:
    return {
        "serial": serial_hex(r.serial), "device_id": r.device_id, "profile": r.profile,
        "not_before": to_rfc3339(r.not_before), "not_after": to_rfc3339(r.not_after), "status": r.status.value,
        "revoked_at": ts(r.revoked_at),
        "reason": r.reason.name if r.reason else None,
    }


def approval_json(r) -> dict:
    """A waiting (or approved, unused) enrollment request: ca/approvals.py ApprovalRequest."""
    return {"device_id": r.device_id, "key_type": r.key_type, "fingerprint": r.fingerprint, "source": r.source,
            "requested_at": ts(r.requested_at), "last_seen_at": ts(r.last_seen_at),
            "state": "approved" if r.approved else "waiting",
            "approved_at": ts(r.approved_at), "approved_by": r.approved_by}


def audit_json(row: AuditRow) -> dict:
    return {"id": row.id, "at": row.at, "actor": row.actor, "action": row.action, "device_id": row.device_id,
            "serial": row.serial, "detail": json.loads(row.detail) if row.detail else {}, "hash": row.hash}


def operator_json(o) -> dict:
    """An operator account (ca/operators.Operator): never its password hash."""
    return {"name": o.name, "role": o.role, "disabled": o.disabled, "created_at": ts(o.created_at),
            "password_changed_at": ts(o.password_changed_at)}


def api_token_json(t, now: datetime) -> dict:
    """An API token as listed (ca/operators.ApiToken): its id and label, never its secret."""
    return {"id": t.id, "operator": t.operator, "label": t.label, "created_at": ts(t.created_at),
            "created_by": t.created_by, "expires_at": ts(t.expires_at), "expired": t.expires_at <= now}
