"""The `approval_requests` queries of SQLiteTx (ca/approvals.py says what a row means): apart from
sqlite.py, as the failure counters are, because they are their own concern."""
from __future__ import annotations

from datetime import datetime

from ..approvals import ApprovalRequest
from ..timefmt import from_rfc3339, to_rfc3339

_COLUMNS = "device_id, fingerprint, key_type, source, requested_at, last_seen_at, approved_at, approved_by"


def _request(row) -> ApprovalRequest:
    return ApprovalRequest(device_id=row[0], fingerprint=row[1], key_type=row[2], source=row[3],
                           requested_at=from_rfc3339(row[4]), last_seen_at=from_rfc3339(row[5]),
                           approved_at=None if row[6] is None else from_rfc3339(row[6]), approved_by=row[7])


class ApprovalQueries:
    """Mixed into SQLiteTx: `_one`, `_all` and `_c` are its."""

    async def get_approval(self, device_id: str, fingerprint: str) -> ApprovalRequest | None:
        row = await self._one(f"SELECT {_COLUMNS} FROM approval_requests WHERE device_id = ? AND fingerprint = ?",
                              (device_id, fingerprint))
        return None if row is None else _request(row)

    async def request_approval(self, r: ApprovalRequest) -> None:
        await self._c.execute(
            f"INSERT INTO approval_requests ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
            (r.device_id, r.fingerprint, r.key_type, r.source, to_rfc3339(r.requested_at),
             to_rfc3339(r.last_seen_at)))

    async def touch_approval(self, device_id: str, fingerprint: str, at: datetime, source: str | None) -> None:
        await self._c.execute("UPDATE approval_requests SET last_seen_at = ?, source = ? "
                              "WHERE device_id = ? AND fingerprint = ?",
                              (to_rfc3339(at), source, device_id, fingerprint))

    async def approve(self, device_id: str, fingerprint: str, at: datetime, by: str) -> bool:
        cursor = await self._c.execute(
            "UPDATE approval_requests SET approved_at = ?, approved_by = ? "
            "WHERE device_id = ? AND fingerprint = ? AND approved_at IS NULL",
            (to_rfc3339(at), by, device_id, fingerprint))
        return cursor.rowcount == 1

    async def clear_approval(self, device_id: str, fingerprint: str | None = None) -> int:
        if fingerprint is None:
            cursor = await self._c.execute("DELETE FROM approval_requests WHERE device_id = ?", (device_id,))
        else:
            cursor = await self._c.execute("DELETE FROM approval_requests WHERE device_id = ? AND fingerprint = ?",
                                           (device_id, fingerprint))
        return cursor.rowcount

    async def pending_approvals(self, device_id: str | None = None) -> list[ApprovalRequest]:
        where, args = ("WHERE device_id = ?", (device_id,)) if device_id is not None else ("", ())
        rows = await self._all(f"SELECT {_COLUMNS} FROM approval_requests {where} "
                               "ORDER BY requested_at, device_id, fingerprint", args)
        return [_request(r) for r in rows]
