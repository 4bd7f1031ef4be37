"""The reads behind the console's lists and overview and the admin API's pages, by index, so
that a page costs what it shows and not the size of the fleet's history: a page of devices with
its filters and count, counts by status, the current certificates' expiries, the audit log's
filtered pages. Mixed into SQLiteTx, apart from sqlite.py because they are their own concern.

A "current" certificate is an unexpired one (`not_after > now`, by the index of migration 16); a
device's expiry is the latest `not_after` of its current certificates in status good.
"""
from __future__ import annotations

import unicodedata
from datetime import datetime

from .. import audit
from ..timefmt import from_rfc3339 as _dt, to_rfc3339

AUDIT_COLUMNS = "id, at, actor, action, device_id, serial, detail, prev_hash, hash"
# the device fields a filter names, and the columns a text search looks in
FILTER_COLUMNS = {"status": "status", "owner": "owner", "model": "model", "location": "location",
                  "criticality": "criticality"}
SEARCH_COLUMNS = ("id", "model", "owner", "location", "asset_tag", "serial_number")
_EXPIRY = ("(SELECT MAX(c.not_after) FROM certificates c WHERE c.device_id = d.id AND c.status = 'good' "
           "AND c.not_after > ?)")


# each device's current certificate's expiry (by the not_after index: unexpired certificates only)
_CURRENT = ("WITH current(device_id, expires) AS (SELECT device_id, MAX(not_after) FROM certificates "
            "WHERE not_after > ? AND status = 'good' AND device_id IS NOT NULL GROUP BY device_id)")


def casefold(text: str | None) -> str:
    """SQLite's lower() folds ASCII only; the console's search folds as Python does (registered
    on the read connection as `casefold`)."""
    return unicodedata.normalize("NFC", text or "").casefold()


def _device_filter(fields: dict[str, str], q: str | None, expiring_until: datetime | None,
                   absent_before: datetime | None, now: datetime) -> tuple[str, list]:
    where, args = ["1"], []
    for name, value in fields.items():
        where.append(f"COALESCE(d.{FILTER_COLUMNS[name]}, '') = ?")
        args.append(value)
    if q:
        where.append("(" + " OR ".join(f"instr(casefold(d.{c}), ?) > 0" for c in SEARCH_COLUMNS) + ")")
        args.extend([casefold(q)] * len(SEARCH_COLUMNS))
    if expiring_until is not None:   # a current certificate ends by then, and none ends later
        where.append("d.id IN (SELECT device_id FROM certificates WHERE status = 'good' AND not_after > ? "
                     "AND not_after <= ? AND device_id IS NOT NULL)")
        where.append("NOT EXISTS (SELECT 1 FROM certificates c WHERE c.device_id = d.id AND c.status = 'good' "
                     "AND c.not_after > ?)")
        args.extend([to_rfc3339(now), to_rfc3339(expiring_until), to_rfc3339(expiring_until)])
    if absent_before is not None:
        where.append("(d.last_proven_contact IS NULL OR d.last_proven_contact < ?)")
        args.append(to_rfc3339(absent_before))
    return " AND ".join(where), args


class ReportQueries:
    """Mixed into SQLiteTx: `_one`, `_all`, `_device_columns` (the devices columns in order) and
    `_device_row` (a row of them as a Device) are its."""

    # devices
    async def device_page(self, *, fields: dict[str, str], q: str | None = None,
                          expiring_until: datetime | None = None, absent_before: datetime | None = None,
                          now: datetime, offset: int = 0, limit: int | None = 100):
        where, args = _device_filter(fields, q, expiring_until, absent_before, now)
        total = (await self._one(f"SELECT COUNT(*) FROM devices d WHERE {where}", tuple(args)))[0]
        bound = "" if limit is None else f" LIMIT {int(limit)} OFFSET {int(offset)}"
        columns = ", ".join(f"d.{c.strip()}" for c in self._device_columns.split(","))
        rows = await self._all(f"SELECT {columns}, {_EXPIRY} FROM devices d WHERE {where} ORDER BY d.id{bound}",
                               (to_rfc3339(now), *args))
        return [(self._device_row(r[:-1]), None if r[-1] is None else _dt(r[-1])) for r in rows], total

    async def device_status_counts(self) -> dict[str, int]:
        return dict(await self._all("SELECT status, COUNT(*) FROM devices GROUP BY status"))

    async def clone_suspects(self) -> list[str]:
        return [r[0] for r in await self._all(
            "SELECT id FROM devices WHERE clone_suspected_at IS NOT NULL ORDER BY id")]

    # current certificates
    async def current_expiries(self, now: datetime) -> dict[str, datetime]:
        rows = await self._all(f"{_CURRENT} SELECT device_id, expires FROM current", (to_rfc3339(now),))
        return {d: _dt(t) for d, t in rows}

    async def expiry_summary(self, now: datetime, horizons: list[datetime], sample: int = 20):
        """(devices per UTC day their current certificate expires, {"YYYY-MM-DD": n}; and per
        horizon, (how many expire by then, the ids of up to `sample` of them, soonest first)), in
        SQL: a fleet's worth of rows never reaches Python."""
        at, ends = to_rfc3339(now), [to_rfc3339(h) for h in horizons]
        sums = ", SUM(expires <= ?)" * len(ends)
        rows = await self._all(f"{_CURRENT} SELECT substr(expires, 1, 10), COUNT(*){sums} FROM current GROUP BY 1",
                               (at, *ends))
        soonest = await self._all(f"{_CURRENT} SELECT device_id, expires FROM current ORDER BY expires, device_id "
                                  "LIMIT ?", (at, sample))
        days = {r[0]: r[1] for r in rows}
        return days, [(sum(r[2 + i] for r in rows), [d for d, t in soonest if t <= end]) for i, end in enumerate(ends)]

    async def current_status_counts(self, now: datetime) -> dict[str, int]:
        return dict(await self._all("SELECT status, COUNT(*) FROM certificates WHERE not_after > ? "
                                    "AND device_id IS NOT NULL GROUP BY status", (to_rfc3339(now),)))

    async def devices_on_hold(self, now: datetime) -> list[str]:
        return [r[0] for r in await self._all(
            "SELECT DISTINCT device_id FROM certificates WHERE not_after > ? AND status = 'hold' "
            "AND device_id IS NOT NULL ORDER BY device_id", (to_rfc3339(now),))]

    # the audit log
    @staticmethod
    def _audit_filter(device_id, actor, action, before_id) -> tuple[str, tuple]:
        where, args = ["1"], []
        for column, value in (("device_id", device_id), ("actor", actor), ("action", action)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        return " AND ".join(where), tuple(args)

    async def audit_entries(self, *, device_id=None, actor=None, action=None, before_id=None, limit=100):
        where, args = self._audit_filter(device_id, actor, action, before_id)
        rows = await self._all(f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE {where} ORDER BY id DESC LIMIT ?",
                               (*args, int(limit)))
        return [audit.AuditRow(*r) for r in rows]

    async def audit_count(self, *, device_id=None, actor=None, action=None):
        if device_id is None and actor is None and action is None:   # ids run 1, 2, ... (the chain's)
            return (await self._one("SELECT COALESCE(MAX(id), 0) FROM audit_log"))[0]
        where, args = self._audit_filter(device_id, actor, action, None)
        return (await self._one(f"SELECT COUNT(*) FROM audit_log WHERE {where}", args))[0]

    async def audit_actions(self):
        # a skip scan of the action index: one probe per distinct action, not a read of every entry
        rows = await self._all("WITH RECURSIVE a(action) AS (SELECT MIN(action) FROM audit_log UNION ALL "
                               "SELECT (SELECT MIN(action) FROM audit_log WHERE action > a.action) FROM a "
                               "WHERE a.action IS NOT NULL) SELECT action FROM a WHERE action IS NOT NULL")
        return [r[0] for r in rows]

    async def audit_hourly(self, actions: tuple[str, ...], first_id: int) -> dict[tuple[str, str], int]:
        """{(action, "YYYY-MM-DDTHH"): entries} of device entries from `first_id` on, counted in SQL."""
        marks = ",".join("?" * len(actions))
        rows = await self._all(f"SELECT action, substr(at, 1, 13), COUNT(*) FROM audit_log WHERE id >= ? AND "
                               f"action IN ({marks}) AND device_id IS NOT NULL GROUP BY 1, 2", (first_id, *actions))
        return {(a, hour): n for a, hour, n in rows}

    async def audit_first_id_at(self, since: datetime) -> int:
        """The first entry written at or after `since` (entries are appended in time order, so a
        binary search over ids, a few point reads; one past the last if none)."""
        last = (await self._one("SELECT COALESCE(MAX(id), 0) FROM audit_log"))[0]
        low, high, when = 1, last + 1, to_rfc3339(since)
        while low < high:
            mid = (low + high) // 2
            row = await self._one("SELECT at FROM audit_log WHERE id >= ? ORDER BY id LIMIT 1", (mid,))
            if row is not None and row[0] < when:
                low = mid + 1
            else:
                high = mid
        return low
