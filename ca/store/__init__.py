"""The storage interface the core depends on; `sqlite.py` is its one implementation.

Everything goes through a transaction object: `store.write()` opens one that
holds the database's write lock from its first statement (SQLite BEGIN
IMMEDIATE; SELECT ... FOR UPDATE on PostgreSQL), commits on exit and rolls back
on any exception, so a refused request leaves nothing behind. `store.read()`
gives the same methods on a read-only connection.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from collections.abc import Collection
from typing import AsyncContextManager, Callable, Protocol

from ..approvals import ApprovalRequest
from ..audit import AuditRow
from ..model import AuditEvent, CertRecord, CertStatus, Device, DeviceStatus, Gateway, RevocationReason
from ..operators import ApiToken, ApiTokenRow, Operator, SessionRow


@dataclass(frozen=True)
class TokenRow:
    id: int
    device_id: str
    digest: bytes
    expires_at: datetime
    used_at: datetime | None


class Tx(Protocol):
    def on_commit(self, fn: Callable[[], None]) -> None:
        """In a write block: call `fn()` once the block is committed (never if it rolls back)."""

    # devices
    async def get_device(self, device_id: str) -> Device | None: ...
    async def insert_device(self, device: Device) -> None: ...
    async def list_devices(self) -> list[Device]: ...
    async def devices_with_serial(self, serial_number: str) -> list[Device]: ...   # by index (IDevID)
    async def set_device_status(self, device_id: str, status: DeviceStatus) -> None: ...
    async def record_proven_contact(self, device_id: str, at: datetime) -> None: ...
    async def set_firmware(self, device_id: str, firmware: str, signed_at: datetime | None = None) -> None:
        """The firmware the renewal gate reads: from a proven posture (with its signingTime) or an operator."""
    async def record_reported(self, device_id: str, at: datetime, *, online: bool | None = None,
                              firmware: str | None = None) -> bool:
        """An unproven report (presence, or posture with `online` None): shown, never trusted."""
    async def update_device(self, device_id: str, changes: dict[str, str]) -> None: ...
    async def flag_clone(self, device_id: str, at: datetime) -> None: ...
    # failed anonymous logins (ca/failures.py; store/sqlite_failures.py)
    async def count_failures(self, scope: str, key: str, since: datetime) -> int: ...
    async def add_failure(self, scope: str, key: str, source: str, window_start: datetime) -> None: ...
    async def unaudited_failures(self, scope: str, before: datetime) -> list[tuple[str, datetime, int]]: ...
    async def failures_in_window(self, scope: str, source: str, window_start: datetime) -> list[tuple[str, int]]: ...
    async def mark_failures_audited(self, scope: str, key: str, window_start: datetime) -> None: ...
    async def forget_failures(self, before: datetime) -> int: ...
    # enrollment tokens (digests only)
    async def insert_token(self, device_id: str, digest: bytes, created_at: datetime, expires_at: datetime) -> None: ...
    async def live_tokens(self, device_id: str) -> list[TokenRow]: ...
    async def mark_token_used(self, token_id: int, at: datetime) -> None: ...
    async def burn_tokens(self, device_id: str, at: datetime) -> int: ...
    # certificates and revocations
    async def serial_exists(self, serial: int) -> bool: ...
    async def insert_certificate(self, record: CertRecord) -> None: ...
    async def get_certificate(self, serial: int) -> CertRecord | None: ...
    async def list_certificates(self, device_id: str | None = None) -> list[CertRecord]: ...
    async def unexpired_certificates(self, now: datetime, after: str = "",
                                     limit: int = 1000) -> list[tuple[CertRecord, str]]:
        """(certificate, device criticality) of device certificates valid at `now`, in a stable
        order, after the page cursor `after`."""
    # status: only ca/status.py calls these; each changes nothing and returns False unless the
    # certificate is still in the status the caller read (a guarded UPDATE)
    async def insert_gateway(self, gateway: Gateway) -> None: ...
    async def get_gateway(self, name: str) -> Gateway | None: ...
    async def list_gateways(self) -> list[Gateway]: ...
    async def gateway_enrolled(self, name: str, at: datetime) -> bool:
        """registered -> active, the token spent; False if it was not registered."""
    async def revoke_gateway(self, name: str, at: datetime) -> bool:
        """-> revoked (final); False if it already was."""
    async def link_gateway_certificate(self, serial: int, name: str) -> None: ...
    async def gateway_of_certificate(self, serial: int) -> Gateway | None: ...
    async def gateway_certificates(self, name: str) -> list[CertRecord]: ...

    async def change_status(self, serial: int, from_status: CertStatus, to_status: CertStatus,
                            reason: RevocationReason | None, at: datetime) -> bool: ...
    async def release_attendance_hold(self, serial: int, at: datetime) -> bool:
        """hold -> good, only while the certificate is on the non-attendance hold recorded for it."""
    async def mark_used(self, serial: int, at: datetime) -> None:
        """The certificate proved its device now (renewal, signed posture, mutual TLS)."""
    async def newer_used_certificate(self, serial: int) -> int | None:
        """A certificate of the same device issued after `serial` that has been used, if any."""
    async def crl_entries(self, not_expired_at: datetime) -> list[bytes]:
        """The DER revokedCertificates entries (RFC 5280 5.1.2.6) of revocations in force whose
        certificates have not expired, oldest first."""
    async def next_crl_number(self) -> int: ...
    async def latest_crl(self) -> tuple[bytes, int, int] | None:
        """(DER, CRL number, last status change it covers) of the highest-numbered CRL stored."""
    async def store_crl(self, der: bytes, number: int, covers_change: int) -> None:
        """Keep this CRL as the latest unless one with a higher number is stored already."""
    async def status_changes_after(self, after_id: int, limit: int = 1000) -> list[tuple[int, int]]: ...
    async def last_status_change(self) -> int: ...
    # relayed requests: (device, request id) -> serial of the certificate it produced
    async def request_result(self, device_id: str, request_id: str, since: datetime) -> int | None: ...
    async def record_request_result(self, device_id: str, request_id: str, serial: int, at: datetime) -> None: ...
    # attendance: devices away too long
    async def absent_devices(self, seen_before: datetime) -> list[Device]: ...
    async def add_attendance_hold(self, serial: int, device_id: str, at: datetime) -> None:
        """Remember that the hold now in force on `serial` was placed for non-attendance."""
    async def drop_attendance_hold(self, serial: int) -> None: ...
    async def attendance_holds(self, device_id: str) -> list[int]:
        """Serials of the device still on the non-attendance hold recorded for them."""
    async def flag_absent(self, device_id: str, at: datetime) -> bool: ...
    async def clear_absent_flag(self, device_id: str) -> bool: ...
    # enrollment approvals, one row per (device, key fingerprint) (ca/approvals.py; store/sqlite_approvals.py)
    async def get_approval(self, device_id: str, fingerprint: str) -> ApprovalRequest | None: ...
    async def request_approval(self, request: ApprovalRequest) -> None: ...
    async def touch_approval(self, device_id: str, fingerprint: str, at: datetime, source: str | None) -> None:
        """The same key asked again: its last-seen time and source."""
    async def approve(self, device_id: str, fingerprint: str, at: datetime, by: str) -> bool:
        """waiting -> approved; False (nothing changed) unless that key was still waiting."""
    async def clear_approval(self, device_id: str, fingerprint: str | None = None) -> int:
        """Drop the device's requests (all, or the one of this key); how many were dropped."""
    async def pending_approvals(self, device_id: str | None = None) -> list[ApprovalRequest]:
        """Waiting and approved-but-unused requests (of one device, or all), oldest first."""
    # operators: accounts, sessions and API tokens, the last two by the SHA-256 digest of their secret
    # (ca/operators.py; store/sqlite_operators.py)
    async def insert_operator(self, name: str, role: str, password_hash: str, at: datetime, by: str) -> None: ...
    async def get_operator(self, name: str) -> Operator | None: ...
    async def list_operators(self) -> list[Operator]: ...
    async def operator_password_hash(self, name: str) -> str | None: ...
    async def set_operator_password(self, name: str, password_hash: str, at: datetime) -> bool: ...
    async def replace_operator_password_hash(self, name: str, old: str, new: str) -> bool:
        """The same password rehashed; False if the stored hash is no longer `old`."""
    async def set_operator_role(self, name: str, role: str) -> bool:
        """-> changed; False if it already had `role` (or there is no such operator)."""
    async def enable_operator(self, name: str) -> bool:
        """-> enabled; False (nothing changed) if it was not disabled."""
    async def enabled_admins(self) -> list[str]: ...
    async def disable_operator(self, name: str, at: datetime) -> bool:
        """-> disabled; False (nothing changed) if it already was."""
    async def insert_operator_session(self, digest: bytes, name: str, source: str | None, at: datetime) -> None: ...
    async def operator_session(self, digest: bytes) -> SessionRow | None:
        """The session (with its operator as it is now), expired or not: the caller judges."""
    async def touch_operator_session(self, digest: bytes, at: datetime) -> bool:
        """Its last-seen time; False if the session is gone."""
    async def delete_operator_session(self, digest: bytes) -> bool: ...
    async def delete_operator_sessions(self, name: str) -> int: ...
    async def prune_operator_sessions(self, idle_before: datetime, created_before: datetime) -> int:
        """Drop sessions last seen at or before `idle_before` or opened at or before `created_before`."""
    async def insert_operator_token(self, digest: bytes, name: str, at: datetime, expires_at: datetime,
                                    by: str, label: str | None = None) -> int:
        """-> the token's id (what lists show and revocation names; not its secret)."""
    async def list_operator_tokens(self, name: str) -> list[ApiToken]: ...
    async def delete_operator_token(self, name: str, token_id: int) -> bool: ...
    async def operator_token(self, digest: bytes) -> ApiTokenRow | None:
        """The API token (with its operator as it is now), expired or not: the caller judges."""
    async def delete_operator_tokens(self, name: str) -> int: ...
    async def prune_operator_tokens(self, expired_before: datetime) -> int: ...
    # audit
    async def append_audit(self, event: AuditEvent, at: datetime) -> str: ...
    async def audit_rows(self, *, device_id: str | None = None, actions: Collection[str] | None = None,
                         after_id: int = 0, limit: int | None = None) -> list[AuditRow]:
        """Oldest first: all after `after_id`, or those filtered, up to `limit`."""
    async def audit_entries(self, *, device_id: str | None = None, actor: str | None = None,
                            action: str | None = None, before_id: int | None = None,
                            limit: int = 100) -> list[AuditRow]:
        """Newest first: the `limit` newest entries matching every filter given, below `before_id`."""
    async def audit_count(self, *, device_id: str | None = None, actor: str | None = None,
                          action: str | None = None) -> int: ...
    async def audit_actions(self) -> list[str]:
        """The distinct actions in the log, sorted."""
    async def audit_first_id_at(self, since: datetime) -> int:
        """The id of the first entry written at or after `since` (one past the last if none)."""
    # reports: the console's pages and overview, by index (store/sqlite_reports.py)
    async def device_page(self, *, fields: dict[str, str], q: str | None = None,
                          expiring_until: datetime | None = None, absent_before: datetime | None = None,
                          now: datetime, offset: int = 0, limit: int | None = 100
                          ) -> tuple[list[tuple[Device, datetime | None]], int]:
        """(devices with their current certificate's expiry, in id order, from `offset`; how many match)."""
    async def device_status_counts(self) -> dict[str, int]: ...
    async def clone_suspects(self) -> list[str]: ...
    async def current_expiries(self, now: datetime) -> dict[str, datetime]:
        """Each device's latest `not_after` of its unexpired certificates in status good."""
    async def expiry_summary(self, now: datetime, horizons: list[datetime], sample: int = 20
                             ) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
        """Devices per UTC day their current certificate expires; per horizon, how many by then
        and the first `sample` ids."""
    async def audit_hourly(self, actions: tuple[str, ...], first_id: int) -> dict[tuple[str, str], int]:
        """{(action, "YYYY-MM-DDTHH"): device entries} from `first_id` on."""
    async def current_status_counts(self, now: datetime) -> dict[str, int]:
        """Unexpired device certificates by status."""
    async def devices_on_hold(self, now: datetime) -> list[str]: ...


class Store(Protocol):
    def write(self) -> AsyncContextManager[Tx]: ...
    def read(self) -> AsyncContextManager[Tx]: ...
    async def close(self) -> None: ...


__all__ = ["Store", "Tx", "TokenRow"]
