"""The `auth_failures` queries of SQLiteTx (ca/failures.py says what they count): apart from
sqlite.py, which holds every other query, because they are their own concern."""
from __future__ import annotations

from datetime import datetime

from ..timefmt import from_rfc3339, to_rfc3339


class FailureQueries:
    """Mixed into SQLiteTx: `_one`, `_all` and `_c` are its."""

    async def count_failures(self, scope: str, key: str, since: datetime) -> int:
        row = await self._one("SELECT COALESCE(SUM(count), 0) FROM auth_failures WHERE scope = ? AND key = ? "
                              "AND window_start >= ?", (scope, key, to_rfc3339(since)))
        return row[0]

    async def add_failure(self, scope: str, key: str, source: str, window_start: datetime) -> None:
        await self._c.execute(
            "INSERT INTO auth_failures (scope, key, source, window_start, count) VALUES (?, ?, ?, ?, 1) "
            "ON CONFLICT (scope, key, window_start) DO UPDATE SET count = count + 1",
            (scope, key, source, to_rfc3339(window_start)))

    async def unaudited_failures(self, scope: str, before: datetime) -> list[tuple[str, datetime, int]]:
        rows = await self._all("SELECT key, window_start, count FROM auth_failures WHERE scope = ? AND audited = 0 "
                               "AND window_start < ? ORDER BY window_start, key", (scope, to_rfc3339(before)))
        return [(r[0], from_rfc3339(r[1]), r[2]) for r in rows]

    async def failures_in_window(self, scope: str, source: str, window_start: datetime) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in await self._all(
            "SELECT key, count FROM auth_failures WHERE scope = ? AND source = ? AND window_start = ?",
            (scope, source, to_rfc3339(window_start)))]

    async def mark_failures_audited(self, scope: str, key: str, window_start: datetime) -> None:
        await self._c.execute("UPDATE auth_failures SET audited = 1 WHERE scope = ? AND key = ? AND window_start = ?",
                              (scope, key, to_rfc3339(window_start)))

    async def forget_failures(self, before: datetime) -> int:
        cursor = await self._c.execute("DELETE FROM auth_failures WHERE window_start < ? AND "
                                       "(audited = 1 OR scope = 'device-source')", (to_rfc3339(before),))
        return cursor.rowcount
