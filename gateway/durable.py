"""The gateway's durable state in its own SQLite file: the inbox of requests waiting for the CA,
the outbox of answers waiting for the device's ack, and what has been done once only.

One row per (device, request id) makes requests idempotent: a repeated id gets the
stored answer, never a second certificate. Several gateway processes on one host
may share the file (WAL, BEGIN IMMEDIATE); a request is claimed before it is
forwarded so only one of them sends it to the CA.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import aiosqlite

from ca.timefmt import from_rfc3339, to_rfc3339

SCHEMA = [
    """
    CREATE TABLE requests (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        req_id TEXT NOT NULL,
        op TEXT NOT NULL,
        payload BLOB NOT NULL,
        received_at TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',     -- pending, answered, acked, superseded
        claimed_by TEXT,
        claimed_at TEXT,
        retry_at TEXT,
        answer BLOB,
        answered_at TEXT,
        serial TEXT,                                -- of the certificate an ok answer carries
        UNIQUE (device_id, req_id)
    );
    CREATE INDEX requests_state ON requests(state, seq);
    CREATE INDEX requests_device ON requests(device_id, state);
    CREATE TABLE notices (
        serial TEXT NOT NULL,
        kind TEXT NOT NULL,
        at TEXT NOT NULL,
        PRIMARY KEY (serial, kind)
    );
    CREATE TABLE cursors (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )
    """,
    # 2: the latest presence and posture of each device, until the CA has them
    """
    CREATE TABLE reports (
        device_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload BLOB NOT NULL,
        at TEXT NOT NULL,
        PRIMARY KEY (device_id, kind)
    )
    """,
]

CLAIM_TIMEOUT = timedelta(minutes=2)  # a claim older than this belonged to a gateway that died


@dataclass(frozen=True)
class Entry:
    seq: int
    device_id: str
    req_id: str
    op: str
    payload: bytes
    state: str
    answer: bytes | None


class Durable:
    def __init__(self, conn: aiosqlite.Connection, owner: str) -> None:
        self._c = conn
        self._owner = owner
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, owner: str) -> "Durable":
        conn = await aiosqlite.connect(path, isolation_level=None, timeout=30)
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")
        self = cls(conn, owner)
        async with self._tx():
            version = (await self._one("PRAGMA user_version"))[0]
            for number, script in enumerate(SCHEMA[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")
        return self

    async def close(self) -> None:
        await self._c.close()

    @contextlib.asynccontextmanager
    async def _tx(self):
        async with self._lock:
            await self._c.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._c.execute("ROLLBACK")
                raise
            await self._c.execute("COMMIT")

    async def _one(self, sql, args=()):
        async with self._c.execute(sql, args) as cur:
            return await cur.fetchone()

    async def _all(self, sql, args=()):
        async with self._c.execute(sql, args) as cur:
            return await cur.fetchall()

    # -- requests -----------------------------------------------------------
    async def receive(self, device_id: str, req_id: str, op: str, payload: bytes, now: datetime,
                      window: timedelta) -> Entry | None:
        """Record a new request; if this (device, id) was seen within `window`, return that entry instead."""
        async with self._tx():
            row = await self._one(
                "SELECT seq, device_id, req_id, op, payload, state, answer, received_at FROM requests "
                "WHERE device_id = ? AND req_id = ?", (device_id, req_id))
            if row is not None:
                if from_rfc3339(row[7]) >= now - window:
                    return Entry(*row[:7])
                await self._c.execute("DELETE FROM requests WHERE seq = ?", (row[0],))
            await self._c.execute(
                "INSERT INTO requests (device_id, req_id, op, payload, received_at) VALUES (?,?,?,?,?)",
                (device_id, req_id, op, payload, to_rfc3339(now)))
        return None

    async def claim_next(self, now: datetime, seq: int | None = None) -> Entry | None:
        """Claim the oldest pending request (or the one given) that is due; None if there is none."""
        stale = to_rfc3339(now - CLAIM_TIMEOUT)
        # one request per device at a time, so a device's requests reach the CA in its order
        where = ("state = 'pending' AND (claimed_by IS NULL OR claimed_at < ?) AND (retry_at IS NULL OR retry_at <= ?)"
                 " AND device_id NOT IN (SELECT device_id FROM requests WHERE state = 'pending'"
                 " AND claimed_by IS NOT NULL AND claimed_at >= ?)")
        args: tuple = (stale, to_rfc3339(now), stale)
        if seq is not None:
            where += " AND seq = ?"
            args += (seq,)
        async with self._tx():
            row = await self._one(f"SELECT seq, device_id, req_id, op, payload, state, answer FROM requests "
                                  f"WHERE {where} ORDER BY seq LIMIT 1", args)
            if row is None:
                return None
            await self._c.execute("UPDATE requests SET claimed_by = ?, claimed_at = ? WHERE seq = ?",
                                  (self._owner, to_rfc3339(now), row[0]))
        return Entry(*row)

    async def release_claims(self) -> int:
        """At start-up: what this gateway (same client id) was forwarding when it died is pending again."""
        async with self._tx():
            cur = await self._c.execute("UPDATE requests SET claimed_by = NULL, claimed_at = NULL "
                                        "WHERE claimed_by = ? AND state = 'pending'", (self._owner,))
            return cur.rowcount

    async def unclaim(self, seq: int, retry_at: datetime | None = None) -> None:
        async with self._tx():
            await self._c.execute("UPDATE requests SET claimed_by = NULL, claimed_at = NULL, retry_at = ? "
                                  "WHERE seq = ?", (to_rfc3339(retry_at) if retry_at else None, seq))

    async def answer(self, seq: int, answer: bytes, now: datetime, *, serial: str | None = None) -> None:
        """Store the final answer; an ok answer with a new certificate supersedes older unacked ones."""
        async with self._tx():
            if serial is not None:
                await self._c.execute(
                    "UPDATE requests SET state = 'superseded' WHERE state = 'answered' AND serial IS NOT NULL "
                    "AND device_id = (SELECT device_id FROM requests WHERE seq = ?)", (seq,))
            await self._c.execute(
                "UPDATE requests SET state = 'answered', answer = ?, answered_at = ?, serial = ?, "
                "claimed_by = NULL WHERE seq = ?", (answer, to_rfc3339(now), serial, seq))

    async def ack(self, device_id: str, req_id: str) -> bool:
        async with self._tx():
            cur = await self._c.execute(
                "UPDATE requests SET state = 'acked' WHERE device_id = ? AND req_id = ? AND state = 'answered'",
                (device_id, req_id))
            return cur.rowcount == 1

    async def unacked(self, device_id: str, now: datetime, ttl: timedelta) -> list[Entry]:
        """Answers carrying a certificate that the device has not acknowledged (errors and
        cacerts/csrattrs answers are not re-sent: the device asks again if it needs them)."""
        rows = await self._all(
            "SELECT seq, device_id, req_id, op, payload, state, answer FROM requests "
            "WHERE device_id = ? AND state = 'answered' AND serial IS NOT NULL AND answered_at >= ? ORDER BY seq",
            (device_id, to_rfc3339(now - ttl)))
        return [Entry(*r) for r in rows]

    async def pending_count(self) -> int:
        return (await self._one("SELECT count(*) FROM requests WHERE state = 'pending'"))[0]

    async def expire(self, now: datetime, ttl: timedelta) -> int:
        """Forget answered requests older than `ttl` (acked, superseded or never acknowledged)."""
        async with self._tx():
            cur = await self._c.execute("DELETE FROM requests WHERE state != 'pending' AND answered_at < ?",
                                        (to_rfc3339(now - ttl),))
            return cur.rowcount

    # -- presence and posture, until the CA has them --------------------------------
    async def note_report(self, device_id: str, kind: str, payload: bytes, now: datetime) -> None:
        async with self._tx():
            await self._c.execute("INSERT INTO reports (device_id, kind, payload, at) VALUES (?, ?, ?, ?) "
                                  "ON CONFLICT(device_id, kind) DO UPDATE SET payload = excluded.payload, "
                                  "at = excluded.at", (device_id, kind, payload, now.isoformat()))

    async def reports(self, limit: int = 100) -> list[tuple[str, str, bytes, str]]:
        return await self._all("SELECT device_id, kind, payload, at FROM reports ORDER BY at LIMIT ?", (limit,))

    async def drop_report(self, device_id: str, kind: str, at: str) -> None:
        """Forget a report the CA has, unless a newer one replaced it meanwhile."""
        async with self._tx():
            await self._c.execute("DELETE FROM reports WHERE device_id = ? AND kind = ? AND at = ?",
                                  (device_id, kind, at))

    # -- things done once -----------------------------------------------------
    async def note_once(self, serial: str, kind: str, now: datetime) -> bool:
        """True the first time (serial, kind) is noted: e.g. a renew notice sent for a certificate."""
        async with self._tx():
            cur = await self._c.execute("INSERT OR IGNORE INTO notices (serial, kind, at) VALUES (?, ?, ?)",
                                        (serial, kind, to_rfc3339(now)))
            return cur.rowcount == 1

    async def cursor(self, name: str, default: int = 0) -> int:
        row = await self._one("SELECT value FROM cursors WHERE name = ?", (name,))
        return row[0] if row else default

    async def set_cursor(self, name: str, value: int) -> None:
        async with self._tx():
            await self._c.execute("INSERT INTO cursors (name, value) VALUES (?, ?) "
                                  "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))
