"""The gateway's durable state in its own SQLite file: the inbox of requests waiting for the CA,
the outbox of answers waiting for the device's ack, and what has been done once only.

One row per (device, request id) makes requests idempotent: a repeated id gets the
stored answer, never a second certificate. Several gateway processes on one host
may share the file (WAL, BEGIN IMMEDIATE); a request is claimed before it is
forwarded so only one of them sends it to the CA.

Group commit: every call joins the next transaction of one database thread, each in
its own savepoint (one failing call does not undo the others), and returns only once
that transaction is committed (synchronous=FULL). Calls made while a transaction is
being written go into the next one, so a storm of 10,000 requests costs a few hundred
fsyncs, not 40,000, and a caller's "stored" still means on disk.

Secrets only as long as needed: once a request has its final answer, its payload (a one-time
token, a signed CSR) is replaced by its SHA-256 digest, which is all that idempotency needs
(secure_delete zeroes the freed bytes, and the WAL is truncated soon after, so the clear
payload survives neither in the database file nor in its WAL).

A write that cannot be made (database locked past the busy timeout, disk full, I/O error)
raises `StoreError`: nothing of that call was stored, and the caller may try again.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from common.timefmt import from_rfc3339, to_rfc3339

log = logging.getLogger(__name__)


def digest(payload: bytes) -> bytes:
    """What a request is remembered by once answered: SHA-256 of its payload as received."""
    return hashlib.sha256(payload).digest()


def _scrub_answered(c: sqlite3.Connection) -> None:
    """3: a digest for every request; answered ones keep it instead of their payload (tokens)."""
    c.execute("ALTER TABLE requests ADD COLUMN digest BLOB")
    rows = c.execute("SELECT seq, payload FROM requests").fetchall()
    c.executemany("UPDATE requests SET digest = ? WHERE seq = ?", [(digest(p), seq) for seq, p in rows])
    c.execute("UPDATE requests SET payload = X'' WHERE state != 'pending'")


SCHEMA: list = [
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
    # 3: answered requests keep the digest of their payload, not the payload
    _scrub_answered,
]

CLAIM_TIMEOUT = timedelta(minutes=2)  # a claim older than this belonged to a gateway that died
# how long a write waits for another process's lock before it fails with StoreError
BUSY_TIMEOUT_S = float(os.environ.get("IOMTCA_GATEWAY_DB_BUSY_TIMEOUT", "30"))
WAL_TRUNCATE_AFTER_S = 1.0  # after payloads were scrubbed: truncate the WAL that still holds them


class StoreError(Exception):
    """The gateway database could not store a write (locked, full, I/O error); nothing of it was kept."""


@dataclass(frozen=True)
class Entry:
    seq: int
    device_id: str
    req_id: str
    op: str
    payload: bytes
    state: str
    answer: bytes | None
    digest: bytes | None = None     # SHA-256 of the payload (the payload itself is gone once answered)


_COLUMNS = "seq, device_id, req_id, op, payload, state, answer, digest"
_ENTRY = f"SELECT {_COLUMNS} FROM requests"
Op = Callable[[sqlite3.Connection], Any]


class Durable:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-db")
        self._c: sqlite3.Connection | None = None
        self._pending: list[tuple[Op, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._scrubbed = False                              # payloads scrubbed since the WAL was truncated
        self._truncate_timer: asyncio.TimerHandle | None = None
        self.commits = 0

    @classmethod
    async def open(cls, path: Path, owner: str) -> "Durable":
        self = cls(owner)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._connect, path)
        return self

    def _connect(self, path: Path) -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")  # a scrubbed payload's bytes are zeroed, not left in free space
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(SCHEMA[version:], start=version + 1):
                if callable(script):
                    script(conn)
                else:
                    for statement in filter(str.strip, script.split(";")):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        if version < 3 <= len(SCHEMA):
            self._truncate_wal(conn)  # the migration scrubbed payloads: drop the WAL frames that held them
        self._c = conn

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._truncate_timer is not None:
            self._truncate_timer.cancel()
            self._truncate_timer = None
        if self._c is not None and self._scrubbed:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._truncate_wal, self._c)
        if self._c is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._c.close)
            self._c = None
        self._thread.shutdown(wait=True)

    # -- group commit -------------------------------------------------------------
    async def _run(self, op: Op):
        """Run `op(conn)` in the next group transaction; its result once that transaction committed."""
        if self._c is None:
            raise RuntimeError("gateway database is closed")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await loop.run_in_executor(self._thread, self._commit, [op for op, _ in batch])
                except BaseException as exc:  # the transaction failed as a whole: nobody's write counts
                    if isinstance(exc, (sqlite3.Error, OSError)):
                        failure: Exception = StoreError(f"gateway database: {exc}")
                        failure.__cause__ = exc
                    else:
                        failure = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), (ok, value) in zip(batch, results):
                    if not future.done():
                        future.set_result(value) if ok else future.set_exception(value)
                if self._scrubbed and self._truncate_timer is None:
                    self._truncate_timer = loop.call_later(WAL_TRUNCATE_AFTER_S, self._schedule_truncate)
        finally:
            self._flusher = None

    def _schedule_truncate(self) -> None:
        self._truncate_timer = None
        if self._c is None:
            return
        self._scrubbed = False
        future = asyncio.get_running_loop().run_in_executor(self._thread, self._truncate_wal, self._c)
        future.add_done_callback(self._truncated)

    def _truncated(self, future) -> None:
        if future.cancelled() or future.exception() is not None or not future.result():
            self._scrubbed = True   # a reader (another gateway) held it, or it failed: again after the next write
            if self._c is not None and self._truncate_timer is None:
                self._truncate_timer = asyncio.get_running_loop().call_later(
                    WAL_TRUNCATE_AFTER_S * 5, self._schedule_truncate)

    @staticmethod
    def _truncate_wal(c: sqlite3.Connection) -> bool:
        """Checkpoint and truncate the WAL to zero bytes; False if another connection prevented it."""
        c.execute("PRAGMA busy_timeout = 200")  # never hold up the group commit behind another gateway
        try:
            busy, _, _ = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            log.info("could not truncate the gateway database's WAL: %s", exc)
            return False
        finally:
            c.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return busy == 0

    def _commit(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        c = self._c
        results: list[tuple[bool, Any]] = []
        c.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                c.execute("SAVEPOINT op")
                try:
                    value = op(c)
                except Exception as exc:
                    c.execute("ROLLBACK TO op")
                    c.execute("RELEASE op")
                    if isinstance(exc, sqlite3.OperationalError):  # full, locked, I/O: not this caller's bug
                        failure = StoreError(f"gateway database: {exc}")
                        failure.__cause__ = exc
                        exc = failure
                    results.append((False, exc))
                else:
                    c.execute("RELEASE op")
                    results.append((True, value))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        self.commits += 1
        return results

    # -- requests -----------------------------------------------------------
    async def receive(self, device_id: str, req_id: str, op: str, payload: bytes, now: datetime,
                      window: timedelta) -> Entry | None:
        """Record a new request; if this (device, id) was seen within `window`, return that entry instead."""
        def run(c: sqlite3.Connection) -> Entry | None:
            row = c.execute(f"SELECT {_COLUMNS}, received_at FROM requests "
                            "WHERE device_id = ? AND req_id = ?", (device_id, req_id)).fetchone()
            if row is not None:
                if from_rfc3339(row[8]) >= now - window:
                    return Entry(*row[:8])
                c.execute("DELETE FROM requests WHERE seq = ?", (row[0],))
            c.execute("INSERT INTO requests (device_id, req_id, op, payload, digest, received_at) "
                      "VALUES (?,?,?,?,?,?)", (device_id, req_id, op, payload, digest(payload), to_rfc3339(now)))
            return None
        return await self._run(run)

    async def claim_next(self, now: datetime, seq: int | None = None) -> Entry | None:
        """Claim the oldest pending request (or the one given) that is due; None if there is none."""
        claimed = await self.claim_many(now, 1, seq=seq)
        return claimed[0] if claimed else None

    async def claim_many(self, now: datetime, limit: int, *, seq: int | None = None) -> list[Entry]:
        """Claim up to `limit` of the oldest pending requests that are due (or the one given), at
        most one per device, in arrival order; [] if there is none."""
        stale = to_rfc3339(now - CLAIM_TIMEOUT)
        # one request per device at a time, so a device's requests reach the CA in its order
        # (NOT EXISTS per candidate goes through requests_device; a NOT IN list of the claimed
        # devices would scan every pending row on each claim: quadratic in a storm)
        where = ("r.state = 'pending' AND (r.claimed_by IS NULL OR r.claimed_at < ?) AND (r.retry_at IS NULL"
                 " OR r.retry_at <= ?) AND NOT EXISTS (SELECT 1 FROM requests o WHERE o.device_id = r.device_id"
                 " AND o.state = 'pending' AND o.claimed_by IS NOT NULL AND o.claimed_at >= ?)")
        args: tuple = (stale, to_rfc3339(now), stale)
        if seq is not None:
            where += " AND r.seq = ?"
            args += (seq,)

        def run(c: sqlite3.Connection) -> list[Entry]:
            rows = c.execute("SELECT r.seq, r.device_id, r.req_id, r.op, r.payload, r.state, r.answer, r.digest "
                             f"FROM requests r WHERE {where} ORDER BY r.seq LIMIT ?", args + (limit,)).fetchall()
            devices: set[str] = set()
            entries = []
            for row in rows:
                if row[1] not in devices:   # a device's later request waits for its earlier one
                    devices.add(row[1])
                    entries.append(Entry(*row))
            c.executemany("UPDATE requests SET claimed_by = ?, claimed_at = ? WHERE seq = ?",
                          [(self._owner, to_rfc3339(now), e.seq) for e in entries])
            return entries
        return await self._run(run)

    async def release_claims(self) -> int:
        """At start-up: what this gateway (same client id) was forwarding when it died is pending again."""
        return await self._run(lambda c: c.execute(
            "UPDATE requests SET claimed_by = NULL, claimed_at = NULL WHERE claimed_by = ? AND state = 'pending'",
            (self._owner,)).rowcount)

    async def unclaim(self, seq: int, retry_at: datetime | None = None) -> None:
        await self._run(lambda c: c.execute(
            "UPDATE requests SET claimed_by = NULL, claimed_at = NULL, retry_at = ? WHERE seq = ?",
            (to_rfc3339(retry_at) if retry_at else None, seq)))

    async def answer(self, seq: int, answer: bytes, now: datetime, *, serial: str | None = None) -> None:
        """Store the final answer; an ok answer with a new certificate supersedes older unacked ones.

        The request's payload (its token, its CSR) goes: the digest kept since `receive` is enough
        to tell a repeat from a different request under the same id."""
        def run(c: sqlite3.Connection) -> None:
            if serial is not None:
                c.execute("UPDATE requests SET state = 'superseded' WHERE state = 'answered' AND serial IS NOT NULL "
                          "AND device_id = (SELECT device_id FROM requests WHERE seq = ?)", (seq,))
            c.execute("UPDATE requests SET state = 'answered', answer = ?, answered_at = ?, serial = ?, "
                      "claimed_by = NULL, payload = X'' WHERE seq = ?", (answer, to_rfc3339(now), serial, seq))
            self._scrubbed = True  # seen by the flusher once this transaction is in: it truncates the WAL soon
        await self._run(run)

    async def ack(self, device_id: str, req_id: str) -> bool:
        return await self._run(lambda c: c.execute(
            "UPDATE requests SET state = 'acked' WHERE device_id = ? AND req_id = ? AND state = 'answered'",
            (device_id, req_id)).rowcount == 1)

    async def unacked(self, device_id: str, now: datetime, ttl: timedelta) -> list[Entry]:
        """Answers carrying a certificate that the device has not acknowledged (errors and
        cacerts/csrattrs answers are not re-sent: the device asks again if it needs them)."""
        return await self._run(lambda c: [Entry(*r) for r in c.execute(
            f"{_ENTRY} WHERE device_id = ? AND state = 'answered' AND serial IS NOT NULL AND answered_at >= ? "
            "ORDER BY seq", (device_id, to_rfc3339(now - ttl)))])

    async def pending_count(self) -> int:
        return await self._run(lambda c: c.execute("SELECT count(*) FROM requests WHERE state = 'pending'"
                                                   ).fetchone()[0])

    async def expire(self, now: datetime, ttl: timedelta) -> int:
        """Forget answered requests older than `ttl` (acked, superseded or never acknowledged)."""
        return await self._run(lambda c: c.execute(
            "DELETE FROM requests WHERE state != 'pending' AND answered_at < ?", (to_rfc3339(now - ttl),)).rowcount)

    # -- presence and posture, until the CA has them --------------------------------
    async def note_report(self, device_id: str, kind: str, payload: bytes, now: datetime) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO reports (device_id, kind, payload, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(device_id, kind) DO UPDATE SET payload = excluded.payload, at = excluded.at",
            (device_id, kind, payload, now.isoformat())))

    async def reports(self, limit: int = 100) -> list[tuple[str, str, bytes, str]]:
        return await self._run(lambda c: c.execute(
            "SELECT device_id, kind, payload, at FROM reports ORDER BY at LIMIT ?", (limit,)).fetchall())

    async def drop_report(self, device_id: str, kind: str, at: str) -> None:
        """Forget a report the CA has, unless a newer one replaced it meanwhile."""
        await self._run(lambda c: c.execute(
            "DELETE FROM reports WHERE device_id = ? AND kind = ? AND at = ?", (device_id, kind, at)))

    # -- things done once -----------------------------------------------------
    async def note_once(self, serial: str, kind: str, now: datetime) -> bool:
        """True the first time (serial, kind) is noted: e.g. a renew notice sent for a certificate."""
        return await self._run(lambda c: c.execute(
            "INSERT OR IGNORE INTO notices (serial, kind, at) VALUES (?, ?, ?)",
            (serial, kind, to_rfc3339(now))).rowcount == 1)

    async def cursor(self, name: str, default: int = 0) -> int:
        row = await self._run(lambda c: c.execute("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone())
        return row[0] if row else default

    async def set_cursor(self, name: str, value: int) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO cursors (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value)))
