"""SQLite storage: with `sqlite_schema.py` (the migrations) and the query mixins
`sqlite_failures.py` and `sqlite_approvals.py`, the only modules with SQL.

WAL mode lets readers run beside the one writer; writes start with BEGIN
IMMEDIATE so that concurrent writers (other coroutines, the CLI, other worker
processes) wait on the busy timeout instead of failing with "database is
locked" at commit. synchronous=FULL: a committed certificate survives power loss.

Writes use group commit. Each `write()` block is a savepoint inside one SQLite
transaction that stays open while other writers are queued behind it (up to
GROUP_MAX blocks); the last of them commits, with one fsync for all, and no
block's caller continues before that commit. So many concurrent issuances cost
one fsync, and a certificate is still durable before anyone is told of it.

Inside a write transaction the statements run on the event loop's thread: once
BEGIN IMMEDIATE holds the write lock, each is a point query or insert of a few
microseconds, far less than a hop to a worker thread and back. Of the two
steps that can wait, COMMIT (on the disk) runs in a worker thread, and BEGIN,
while another process holds the write lock, is retried on the loop every few
milliseconds. Reads, which can be large (a CRL's revocations), stay on
aiosqlite's thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import dataclasses
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import aiosqlite

from .. import audit, crl, metrics
from ..model import (
    AuditEvent,
    CertRecord,
    CertStatus,
    Criticality,
    Device,
    DeviceStatus,
    Gateway,
    GatewayStatus,
    Revocation,
    RevocationReason,
    serial_hex,
)
from ..timefmt import from_rfc3339, to_rfc3339
from . import TokenRow
from .sqlite_approvals import ApprovalQueries
from .sqlite_failures import FailureQueries
from .sqlite_operators import OperatorQueries
from .sqlite_reports import AUDIT_COLUMNS, ReportQueries, casefold
from .sqlite_schema import MIGRATIONS, migrate  # noqa: F401 (MIGRATIONS re-exported)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
# Most write blocks one group commit may hold: bounds how long other processes wait for the lock.
GROUP_MAX = 64


_DEVICE_COLUMNS = ("id, model, owner, location, criticality, firmware, manufacturer, serial_number, "
                   "udi_di, udi_pi, asset_tag, status, created_at, last_proven_contact, reported_online, "
                   "reported_online_at, reported_firmware, reported_posture_at, posture_signed_at, "
                   "clone_suspected_at")
# what `device edit` may change (operator input, validated by ca.registry first)
_EDITABLE = frozenset({"model", "owner", "location", "criticality", "firmware", "manufacturer", "serial_number",
                       "udi_di", "udi_pi", "asset_tag"})
_CERT_SELECT = """
    SELECT c.serial, c.device_id, c.profile, c.not_before, c.not_after, c.der, c.status, c.created_at,
           r.revoked_at, r.reason
    FROM certificates c LEFT JOIN revocations r ON r.serial = c.serial AND r.released_at IS NULL
"""
_CERT_WITH_CRITICALITY = """
    SELECT c.serial, c.device_id, c.profile, c.not_before, c.not_after, c.der, c.status, c.created_at,
           r.revoked_at, r.reason, d.criticality
    FROM certificates c JOIN devices d ON d.id = c.device_id
    LEFT JOIN revocations r ON r.serial = c.serial AND r.released_at IS NULL
"""


_REASONS = {r.value: r for r in RevocationReason}
# a gateway with its newest RA certificate (serial, not_after), if any
_GATEWAY_SELECT = """
SELECT g.name, g.status, g.created_at, g.created_by, g.token_digest, g.token_expires_at, g.enrolled_at,
       g.revoked_at,
       (SELECT c.serial FROM gateway_certificates l JOIN certificates c ON c.serial = l.serial
        WHERE l.gateway = g.name ORDER BY c.created_at DESC, c.serial DESC LIMIT 1),
       (SELECT c.not_after FROM gateway_certificates l JOIN certificates c ON c.serial = l.serial
        WHERE l.gateway = g.name ORDER BY c.created_at DESC, c.serial DESC LIMIT 1)
FROM gateways g"""


def _ts(value: datetime | None) -> str | None:
    return None if value is None else to_rfc3339(value)


def _dt(value: str | None) -> datetime | None:
    return None if value is None else from_rfc3339(value)


def _device(row) -> Device:
    return Device(
        id=row[0], model=row[1], owner=row[2], location=row[3], criticality=Criticality(row[4]),
        firmware=row[5], manufacturer=row[6], serial_number=row[7], udi_di=row[8], udi_pi=row[9],
        asset_tag=row[10], status=DeviceStatus(row[11]), created_at=_dt(row[12]), last_proven_contact=_dt(row[13]),
        reported_online=None if row[14] is None else bool(row[14]), reported_online_at=_dt(row[15]),
        reported_firmware=row[16], reported_posture_at=_dt(row[17]), posture_signed_at=_dt(row[18]),
        clone_suspected_at=_dt(row[19]))


def _gateway(row) -> Gateway:
    return Gateway(name=row[0], status=GatewayStatus(row[1]), created_at=_dt(row[2]), created_by=row[3],
                   token_digest=row[4], token_expires_at=_dt(row[5]), enrolled_at=_dt(row[6]),
                   revoked_at=_dt(row[7]), serial=None if row[8] is None else int(row[8], 16),
                   not_after=_dt(row[9]))


def _cert(row) -> CertRecord:
    return CertRecord(
        serial=int(row[0], 16), device_id=row[1], profile=row[2], not_before=_dt(row[3]),
        not_after=_dt(row[4]), der=bytes(row[5]), status=CertStatus(row[6]), created_at=_dt(row[7]),
        revoked_at=_dt(row[8]), reason=None if row[9] is None else RevocationReason(row[9]))


class _Direct:
    """A sqlite3 connection used on the loop's thread, for statements under a held write lock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, args=()) -> sqlite3.Cursor:
        return self._conn.execute(sql, args)

    async def one(self, sql: str, args=()):
        return self._conn.execute(sql, args).fetchone()

    async def all(self, sql: str, args=()):
        return self._conn.execute(sql, args).fetchall()


class _Threaded:
    """An aiosqlite connection: each query is one hop to its thread and back."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, args=()):
        return await self._conn.execute(sql, args)

    async def one(self, sql: str, args=()):
        rows = await self._conn.execute_fetchall(sql, args)
        return rows[0] if rows else None

    async def all(self, sql: str, args=()):
        return await self._conn.execute_fetchall(sql, args)


class SQLiteTx(FailureQueries, ApprovalQueries, OperatorQueries, ReportQueries):
    """The `Tx` methods over one connection (`_Direct` in writes, `_Threaded` in reads)."""

    _device_columns = _DEVICE_COLUMNS   # for ReportQueries
    _device_row = staticmethod(_device)

    def __init__(self, conn: _Direct | _Threaded) -> None:
        self._c = conn
        self._on_commit: list = []

    def on_commit(self, fn) -> None:
        """Call `fn()` once this write block is committed (never if it rolls back)."""
        self._on_commit.append(fn)

    def committed(self) -> None:
        for fn in self._on_commit:
            try:
                fn()
            except Exception:   # a counter must not fail a committed write
                log.exception("after-commit callback failed")

    async def _one(self, sql: str, args=()):
        return await self._c.one(sql, args)

    async def _all(self, sql: str, args=()):
        return await self._c.all(sql, args)

    # devices
    async def get_device(self, device_id):
        row = await self._one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,))
        return None if row is None else _device(row)

    async def insert_device(self, d: Device) -> None:
        await self._c.execute(
            f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({','.join('?' * 20)})",
            (d.id, d.model, d.owner, d.location, d.criticality.value, d.firmware, d.manufacturer,
             d.serial_number, d.udi_di, d.udi_pi, d.asset_tag, d.status.value, _ts(d.created_at),
             _ts(d.last_proven_contact), None if d.reported_online is None else int(d.reported_online),
             _ts(d.reported_online_at), d.reported_firmware, _ts(d.reported_posture_at), _ts(d.posture_signed_at),
             _ts(d.clone_suspected_at)))

    async def list_devices(self):
        return [_device(r) for r in await self._all(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY id")]

    async def devices_with_serial(self, serial_number):
        return [_device(r) for r in await self._all(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE serial_number = ? AND serial_number <> '' ORDER BY id",
            (serial_number,))]

    async def set_device_status(self, device_id, status) -> None:
        await self._c.execute("UPDATE devices SET status = ? WHERE id = ?", (status.value, device_id))

    async def record_proven_contact(self, device_id, at) -> None:
        await self._c.execute("UPDATE devices SET last_proven_contact = ? WHERE id = ?", (_ts(at), device_id))

    async def set_firmware(self, device_id, firmware, signed_at=None) -> None:
        await self._c.execute("UPDATE devices SET firmware = ?, posture_signed_at = COALESCE(?, posture_signed_at) "
                              "WHERE id = ?", (firmware, _ts(signed_at), device_id))

    async def record_reported(self, device_id, at, *, online=None, firmware=None) -> bool:
        if online is not None:
            cur = await self._c.execute("UPDATE devices SET reported_online = ?, reported_online_at = ? WHERE id = ?",
                                        (int(online), _ts(at), device_id))
        else:
            cur = await self._c.execute(
                "UPDATE devices SET reported_firmware = COALESCE(?, reported_firmware), reported_posture_at = ? "
                "WHERE id = ?", (firmware, _ts(at), device_id))
        return cur.rowcount == 1

    async def update_device(self, device_id, changes) -> None:
        unknown = set(changes) - _EDITABLE
        if unknown:
            raise ValueError(f"not editable: {', '.join(sorted(unknown))}")
        if changes:
            names = sorted(changes)
            await self._c.execute(f"UPDATE devices SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                                  (*(changes[n] for n in names), device_id))

    async def flag_clone(self, device_id, at) -> None:
        await self._c.execute("UPDATE devices SET clone_suspected_at = ? WHERE id = ?", (_ts(at), device_id))

    # tokens
    async def insert_token(self, device_id, digest, created_at, expires_at) -> None:
        await self._c.execute(
            "INSERT INTO tokens (device_id, digest, created_at, expires_at) VALUES (?,?,?,?)",
            (device_id, digest, _ts(created_at), _ts(expires_at)))

    async def live_tokens(self, device_id):
        rows = await self._all(
            "SELECT id, device_id, digest, expires_at, used_at FROM tokens "
            "WHERE device_id = ? AND burned_at IS NULL", (device_id,))
        return [TokenRow(r[0], r[1], bytes(r[2]), _dt(r[3]), _dt(r[4])) for r in rows]

    async def mark_token_used(self, token_id, at) -> None:
        await self._c.execute("UPDATE tokens SET used_at = ? WHERE id = ? AND used_at IS NULL",
                              (_ts(at), token_id))

    async def burn_tokens(self, device_id, at) -> int:
        cur = await self._c.execute(
            "UPDATE tokens SET burned_at = ? WHERE device_id = ? AND burned_at IS NULL AND used_at IS NULL",
            (_ts(at), device_id))
        return cur.rowcount

    # certificates
    async def serial_exists(self, serial) -> bool:
        return await self._one("SELECT 1 FROM certificates WHERE serial = ?", (serial_hex(serial),)) is not None

    async def insert_certificate(self, r: CertRecord) -> None:
        await self._c.execute(
            "INSERT INTO certificates (serial, device_id, profile, not_before, not_after, der, status, created_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (serial_hex(r.serial), r.device_id, r.profile, _ts(r.not_before), _ts(r.not_after), r.der,
             r.status.value, _ts(r.created_at)))

    async def get_certificate(self, serial):
        row = await self._one(_CERT_SELECT + " WHERE c.serial = ?", (serial_hex(serial),))
        return None if row is None else _cert(row)

    async def list_certificates(self, device_id=None):
        if device_id is None:
            rows = await self._all(_CERT_SELECT + " ORDER BY c.created_at, c.serial")
        else:
            rows = await self._all(_CERT_SELECT + " WHERE c.device_id = ? ORDER BY c.created_at, c.serial",
                                   (device_id,))
        return [_cert(r) for r in rows]

    async def unexpired_certificates(self, now, after="", limit=1000):
        rows = await self._all(
            _CERT_WITH_CRITICALITY + " WHERE c.not_after > ? AND c.serial > ? ORDER BY c.serial LIMIT ?",
            (_ts(now), after, limit))
        return [(_cert(r), r[10]) for r in rows]

    # gateways (registration authorities) and their RA certificates
    async def insert_gateway(self, g: Gateway) -> None:
        await self._c.execute(
            "INSERT INTO gateways (name, status, token_digest, token_expires_at, created_at, created_by) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (g.name, g.status.value, g.token_digest, _ts(g.token_expires_at), _ts(g.created_at), g.created_by))

    async def get_gateway(self, name):
        row = await self._one(_GATEWAY_SELECT + " WHERE g.name = ?", (name,))
        return None if row is None else _gateway(row)

    async def list_gateways(self):
        return [_gateway(r) for r in await self._all(_GATEWAY_SELECT + " ORDER BY g.name")]

    async def gateway_enrolled(self, name, at) -> bool:
        # the token is spent (single use, like a device's); its digest stays, so that only the holder
        # of that token hears "already enrolled" and a stranger's guess is refused like any other
        cur = await self._c.execute(
            "UPDATE gateways SET status = 'active', token_expires_at = NULL, enrolled_at = ? "
            "WHERE name = ? AND status = 'registered'", (_ts(at), name))
        return cur.rowcount == 1

    async def revoke_gateway(self, name, at) -> bool:
        cur = await self._c.execute(
            "UPDATE gateways SET status = 'revoked', token_digest = NULL, token_expires_at = NULL, revoked_at = ? "
            "WHERE name = ? AND status <> 'revoked'", (_ts(at), name))
        return cur.rowcount == 1

    async def link_gateway_certificate(self, serial, name) -> None:
        await self._c.execute("INSERT INTO gateway_certificates (serial, gateway) VALUES (?, ?)",
                              (serial_hex(serial), name))

    async def gateway_of_certificate(self, serial):
        row = await self._one(_GATEWAY_SELECT + " JOIN gateway_certificates gc ON gc.gateway = g.name "
                              "WHERE gc.serial = ?", (serial_hex(serial),))
        return None if row is None else _gateway(row)

    async def gateway_certificates(self, name):
        rows = await self._all(_CERT_SELECT + " JOIN gateway_certificates gc ON gc.serial = c.serial "
                               "WHERE gc.gateway = ? ORDER BY c.created_at, c.serial", (name,))
        return [_cert(r) for r in rows]

    async def change_status(self, serial, from_status, to_status, reason, at) -> bool:
        key = serial_hex(serial)
        # the guard: nothing changes unless the certificate is still in `from_status`
        cur = await self._c.execute("UPDATE certificates SET status = ? WHERE serial = ? AND status = ?",
                                    (to_status.value, key, from_status.value))
        if cur.rowcount != 1:
            return False
        if from_status is CertStatus.HOLD:  # the hold's entry closes (lifted, or made final below)
            await self._c.execute("UPDATE revocations SET released_at = ? WHERE serial = ? AND released_at IS NULL",
                                  (_ts(at), key))
        if to_status is not CertStatus.GOOD:
            await self._c.execute(
                "INSERT INTO revocations (serial, reason, revoked_at, entry, not_after) "
                "SELECT ?, ?, ?, ?, not_after FROM certificates WHERE serial = ?",
                (key, reason.value, _ts(at), crl.encode_entry(Revocation(serial, reason, at)), key))
        await self._c.execute("INSERT INTO status_changes (serial, at) VALUES (?, ?)", (key, _ts(at)))
        return True

    async def release_attendance_hold(self, serial, at) -> bool:
        key = serial_hex(serial)
        cur = await self._c.execute(
            "UPDATE certificates SET status = 'good' WHERE serial = ? AND status = 'hold' AND EXISTS ("
            " SELECT 1 FROM attendance_holds a JOIN revocations r ON r.id = a.revocation_id"
            " WHERE a.serial = certificates.serial AND r.released_at IS NULL AND r.reason = 6)", (key,))
        if cur.rowcount != 1:
            return False
        await self._c.execute("UPDATE revocations SET released_at = ? WHERE serial = ? AND released_at IS NULL",
                              (_ts(at), key))
        await self._c.execute("INSERT INTO status_changes (serial, at) VALUES (?, ?)", (key, _ts(at)))
        return True

    async def mark_used(self, serial, at) -> None:
        await self._c.execute("UPDATE certificates SET used_at = ? WHERE serial = ?", (_ts(at), serial_hex(serial)))

    async def newer_used_certificate(self, serial):
        # rowid: insertion order, which is issuance order (several may share one created_at)
        row = await self._one(
            "SELECT n.serial FROM certificates o JOIN certificates n ON n.device_id = o.device_id "
            "AND n.rowid > o.rowid AND n.used_at IS NOT NULL WHERE o.serial = ? ORDER BY n.rowid DESC LIMIT 1",
            (serial_hex(serial),))
        return None if row is None else int(row[0], 16)

    # relayed requests
    async def request_result(self, device_id, request_id, since):
        row = await self._one("SELECT serial FROM request_results WHERE device_id = ? AND request_id = ? "
                              "AND created_at >= ?", (device_id, request_id, _ts(since)))
        return None if row is None else int(row[0], 16)

    async def record_request_result(self, device_id, request_id, serial, at) -> None:
        await self._c.execute("INSERT OR REPLACE INTO request_results (device_id, request_id, serial, created_at) "
                              "VALUES (?, ?, ?, ?)", (device_id, request_id, serial_hex(serial), _ts(at)))

    # attendance
    async def absent_devices(self, seen_before):
        rows = await self._all(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE status = 'active' "
            "AND COALESCE(last_proven_contact, created_at) < ?", (_ts(seen_before),))
        return [_device(r) for r in rows]

    async def add_attendance_hold(self, serial, device_id, at) -> None:
        key = serial_hex(serial)
        await self._c.execute(
            "INSERT OR REPLACE INTO attendance_holds (serial, device_id, held_at, revocation_id) "
            "SELECT ?, ?, ?, id FROM revocations WHERE serial = ? AND released_at IS NULL AND reason = 6",
            (key, device_id, _ts(at), key))

    async def drop_attendance_hold(self, serial) -> None:
        await self._c.execute("DELETE FROM attendance_holds WHERE serial = ?", (serial_hex(serial),))

    async def attendance_holds(self, device_id):
        rows = await self._all(
            "SELECT a.serial FROM attendance_holds a JOIN revocations r ON r.id = a.revocation_id "
            "WHERE a.device_id = ? AND r.released_at IS NULL ORDER BY a.serial", (device_id,))
        return [int(r[0], 16) for r in rows]

    async def flag_absent(self, device_id, at) -> bool:
        cur = await self._c.execute("INSERT OR IGNORE INTO attendance_flags (device_id, flagged_at) VALUES (?, ?)",
                                    (device_id, _ts(at)))
        return cur.rowcount == 1

    async def clear_absent_flag(self, device_id) -> bool:
        cur = await self._c.execute("DELETE FROM attendance_flags WHERE device_id = ?", (device_id,))
        return cur.rowcount == 1

    async def status_changes_after(self, after_id, limit=1000):
        rows = await self._all("SELECT id, serial FROM status_changes WHERE id > ? ORDER BY id LIMIT ?",
                               (after_id, limit))
        return [(row_id, int(serial, 16)) for row_id, serial in rows]

    async def last_status_change(self) -> int:
        return (await self._one("SELECT COALESCE(MAX(id), 0) FROM status_changes"))[0]

    async def crl_entries(self, not_expired_at):
        rows = await self._all(
            "SELECT entry, serial, reason, revoked_at FROM revocations "
            "WHERE released_at IS NULL AND not_after > ? ORDER BY id", (_ts(not_expired_at),))
        # the CRL's hot path (100k rows): the stored entries as they are
        return [entry if entry is not None else
                crl.encode_entry(Revocation(int(serial, 16), _REASONS[reason], from_rfc3339(at)))
                for entry, serial, reason, at in rows]

    async def latest_crl(self):
        row = await self._one("SELECT der, der_number, covers_change FROM crl_state WHERE id = 1")
        return None if row is None or row[0] is None else (bytes(row[0]), row[1], row[2])

    async def store_crl(self, der, number, covers_change) -> None:
        await self._c.execute("UPDATE crl_state SET der = ?, der_number = ?, covers_change = ? "
                              "WHERE id = 1 AND (der_number IS NULL OR der_number < ?)",
                              (der, number, covers_change, number))

    async def next_crl_number(self) -> int:
        await self._c.execute("UPDATE crl_state SET number = number + 1 WHERE id = 1")
        return (await self._one("SELECT number FROM crl_state WHERE id = 1"))[0]

    # audit
    async def append_audit(self, event: AuditEvent, at: datetime) -> str:
        last = await self._one("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1")
        new_id, prev = (1, audit.GENESIS) if last is None else (last[0] + 1, last[1])
        serial = None if event.serial is None else serial_hex(event.serial)
        detail = audit.canonical_detail(event.detail)
        at_text = to_rfc3339(at)
        digest = audit.chain_hash(prev, id=new_id, at=at_text, actor=event.actor, action=event.action,
                                  device_id=event.device_id, serial=serial, detail=detail)
        await self._c.execute(
            "INSERT INTO audit_log (id, at, actor, action, device_id, serial, detail, prev_hash, hash)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (new_id, at_text, event.actor, event.action, event.device_id, serial, detail, prev, digest))
        return digest

    async def audit_rows(self, *, device_id=None, actions=None, after_id=0, limit=None):
        where, args = ["id > ?"], [after_id]
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if actions is not None:
            where.append(f"action IN ({','.join('?' * len(actions))})" if actions else "0")
            args.extend(actions)
        bound = "" if limit is None else f" LIMIT {int(limit)}"
        rows = await self._all(f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE {' AND '.join(where)} ORDER BY id{bound}",
                               tuple(args))
        return [audit.AuditRow(*r) for r in rows]


class SQLiteStore:
    """One write connection shared by group commit, one read-only connection."""

    def __init__(self, writer: sqlite3.Connection, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()
        self._queued = 0  # write() callers waiting for the lock: the open group waits for them
        self._group: asyncio.Future | None = None  # resolved when the open transaction commits
        self._group_size = 0

    @classmethod
    async def open(cls, path: Path) -> "SQLiteStore":
        path = Path(path)
        writer = await asyncio.to_thread(_open_writer, path)
        try:
            reader = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                             timeout=BUSY_TIMEOUT_S)
            await reader.create_function("casefold", 1, casefold, deterministic=True)   # the console's search
        except BaseException:
            writer.close()
            raise
        return cls(writer, reader)

    @contextlib.asynccontextmanager
    async def write(self):
        self._queued += 1
        try:
            await self._write_lock.acquire()
        finally:
            self._queued -= 1
        try:
            if self._group is None:
                await self._begin()
            group = self._group
            self._group_size += 1
            self._writer.execute("SAVEPOINT block")
            tx = SQLiteTx(_Direct(self._writer))
            try:
                yield tx
            except BaseException as exc:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK TO block")
                    self._writer.execute("RELEASE block")
                else:  # SQLite rolled back the whole transaction (disk full, I/O error): the group is lost
                    self._fail_group(sqlite3.OperationalError(f"transaction rolled back by SQLite: {exc}"))
                raise
            else:
                self._writer.execute("RELEASE block")
            finally:
                if self._group is not None and (self._queued == 0 or self._group_size >= GROUP_MAX):
                    await self._commit()
        finally:
            self._write_lock.release()
        await asyncio.shield(group)  # durable before the caller goes on
        tx.committed()

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE, retried on the loop while another process holds the write lock.

        SQLite's own busy handler sleeps up to 100 ms between tries, which with another worker's
        group commits in the way made for tail latencies of 400 ms; asking every millisecond or
        two costs nothing on the loop and takes the lock as soon as it is free.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.0005
        while True:
            try:
                self._writer.execute("BEGIN IMMEDIATE")  # the writer's busy timeout is 0: never waits
                break
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:  # any BUSY_*
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.004)
        self._group, self._group_size = asyncio.get_running_loop().create_future(), 0

    async def _commit(self) -> None:
        group, self._group = self._group, None
        metrics.GROUP_SIZE.observe(self._group_size)
        started = time.monotonic()
        outcome = await _finish(asyncio.to_thread(self._writer.execute, "COMMIT"))
        metrics.GROUP_SECONDS.observe(time.monotonic() - started)
        if outcome.exception is not None:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            self._group = group
            self._fail_group(outcome.exception)
        else:
            group.set_result(None)
        if outcome.cancelled:
            raise asyncio.CancelledError

    def _fail_group(self, exc: BaseException) -> None:
        group, self._group = self._group, None
        group.set_exception(exc)
        group.exception()  # blocks that failed on their own never await it: no "never retrieved"

    @contextlib.asynccontextmanager
    async def read(self):
        yield SQLiteTx(_Threaded(self._reader))

    async def close(self) -> None:
        async with self._write_lock:
            if self._group is not None:
                await self._commit()
        await self._reader.close()
        self._writer.close()


@dataclasses.dataclass
class _Outcome:
    exception: BaseException | None
    cancelled: bool


async def _finish(awaitable) -> _Outcome:
    """Run a step on the shared write connection to its end even if the caller is cancelled
    meanwhile (nobody else may use the connection before the worker thread is done)."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = cancelled or not task.done()
        except Exception:
            pass
    return _Outcome(task.exception(), cancelled)


def _open_writer(path: Path) -> sqlite3.Connection:
    # check_same_thread off: COMMIT runs in a worker thread, the rest on the loop's thread, never at
    # the same time (the write lock orders them)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
        conn.execute("PRAGMA busy_timeout = 0")  # from now on `_begin` does the waiting, on the loop
    except BaseException:
        conn.close()
        raise
    return conn
