"""SQLite storage: the only module with SQL.

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
import dataclasses
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import aiosqlite

from .. import audit, crl
from ..model import (
    AuditEvent,
    CertRecord,
    CertStatus,
    Criticality,
    Device,
    DeviceStatus,
    Revocation,
    RevocationReason,
    serial_hex,
)
from ..timefmt import from_rfc3339, to_rfc3339
from . import TokenRow

BUSY_TIMEOUT_S = 30.0
# Most write blocks one group commit may hold: bounds how long other processes wait for the lock.
GROUP_MAX = 64

# Numbered migrations; PRAGMA user_version records how many have run.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        owner TEXT NOT NULL,
        location TEXT NOT NULL DEFAULT '',
        criticality TEXT NOT NULL DEFAULT 'medium',
        firmware TEXT NOT NULL DEFAULT '',
        manufacturer TEXT NOT NULL DEFAULT '',
        serial_number TEXT NOT NULL DEFAULT '',
        udi_di TEXT NOT NULL DEFAULT '',
        udi_pi TEXT NOT NULL DEFAULT '',
        asset_tag TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'active',
        created_at TEXT NOT NULL,
        last_seen TEXT
    );
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        digest BLOB NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT,
        burned_at TEXT
    );
    CREATE INDEX tokens_device ON tokens(device_id);
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT REFERENCES devices(id),
        profile TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        der BLOB NOT NULL,
        status TEXT NOT NULL DEFAULT 'good',
        created_at TEXT NOT NULL
    );
    CREATE INDEX certificates_device ON certificates(device_id, not_after);
    CREATE TABLE revocations (
        id INTEGER PRIMARY KEY,
        serial TEXT NOT NULL REFERENCES certificates(serial),
        reason INTEGER NOT NULL,
        revoked_at TEXT NOT NULL,
        released_at TEXT
    );
    CREATE UNIQUE INDEX revocations_active ON revocations(serial) WHERE released_at IS NULL;
    CREATE TABLE crl_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        number INTEGER NOT NULL
    );
    INSERT INTO crl_state (id, number) VALUES (1, 0);
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device_id TEXT,
        serial TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 2: a feed of status changes (revoke, hold, release) that responders and the
    # gateway follow by id, and enrollment approvals.
    """
    CREATE TABLE status_changes (
        id INTEGER PRIMARY KEY,
        serial TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE approvals (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        requested_at TEXT NOT NULL,
        approved_at TEXT,
        approved_by TEXT
    );
    """,
    # 3: holds placed because a device stayed away too long (released when it returns),
    # and high-criticality devices flagged instead of held.
    """
    CREATE TABLE attendance_holds (
        serial TEXT PRIMARY KEY REFERENCES certificates(serial),
        device_id TEXT NOT NULL,
        held_at TEXT NOT NULL
    );
    CREATE TABLE attendance_flags (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        flagged_at TEXT NOT NULL
    );
    """,
    # 4: the certificate each relayed request (device, request id) produced, so a relay that
    # retries after a crash gets the same certificate back instead of "token already used".
    """
    CREATE TABLE request_results (
        device_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        serial TEXT NOT NULL REFERENCES certificates(serial),
        created_at TEXT NOT NULL,
        PRIMARY KEY (device_id, request_id)
    );
    """,
    # 5: each revocation keeps its DER CRL entry (fixed once recorded) and its certificate's
    # notAfter, so a CRL of 100k entries is one scan of this table, no join and no re-encoding.
    # Rows from before this migration have no entry yet and are encoded when read.
    """
    ALTER TABLE revocations ADD COLUMN entry BLOB;
    ALTER TABLE revocations ADD COLUMN not_after TEXT;
    UPDATE revocations SET not_after = (SELECT c.not_after FROM certificates c WHERE c.serial = revocations.serial);
    """,
    # 6: the latest CRL signed, with its number and the last status change it covers, so that
    # every process serving the CA (server workers) publishes the same CRL and the numbers a
    # client sees never go down.
    """
    ALTER TABLE crl_state ADD COLUMN der BLOB;
    ALTER TABLE crl_state ADD COLUMN der_number INTEGER;
    ALTER TABLE crl_state ADD COLUMN covers_change INTEGER;
    """,
    # 7: the status state machine (ca/status.py) enforced by the store too. A non-attendance hold
    # names the hold it placed (its revocations row), so only that same hold is ever lifted for
    # attendance; rows left behind by holds that were revoked or released since are dropped. The
    # triggers refuse, whatever SQL asks, to take a certificate out of revoked, to close a final
    # revocation, or to bring a decommissioned device back.
    """
    ALTER TABLE attendance_holds ADD COLUMN revocation_id INTEGER REFERENCES revocations(id);
    DELETE FROM attendance_holds WHERE serial NOT IN (SELECT serial FROM certificates WHERE status = 'hold');
    UPDATE attendance_holds SET revocation_id = (
        SELECT r.id FROM revocations r
        WHERE r.serial = attendance_holds.serial AND r.released_at IS NULL AND r.reason = 6);
    DELETE FROM attendance_holds WHERE revocation_id IS NULL;
    CREATE TRIGGER revoked_is_final BEFORE UPDATE OF status ON certificates
    WHEN OLD.status = 'revoked' AND NEW.status <> 'revoked'
    BEGIN SELECT RAISE(ABORT, 'a revoked certificate stays revoked'); END;
    CREATE TRIGGER revocation_is_final BEFORE UPDATE OF released_at ON revocations
    WHEN OLD.reason <> 6 AND OLD.released_at IS NULL AND NEW.released_at IS NOT NULL
    BEGIN SELECT RAISE(ABORT, 'only a certificateHold can be lifted'); END;
    CREATE TRIGGER decommissioned_is_final BEFORE UPDATE OF status ON devices
    WHEN OLD.status = 'decommissioned' AND NEW.status <> 'decommissioned'
    BEGIN SELECT RAISE(ABORT, 'a decommissioned device stays decommissioned'); END;
    """,
    # 8: what a device proved apart from what it merely reported. `last_seen` was set by
    # unauthenticated presence messages: it becomes the reported time. Proven contact starts from
    # each device's newest certificate. `used_at`: when a certificate last proved its device
    # (renewal, signed posture, mutual TLS), which is how an older certificate is known superseded.
    """
    ALTER TABLE devices RENAME COLUMN last_seen TO reported_online_at;
    ALTER TABLE devices ADD COLUMN reported_online INTEGER;
    ALTER TABLE devices ADD COLUMN reported_firmware TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN reported_posture_at TEXT;
    ALTER TABLE devices ADD COLUMN last_proven_contact TEXT;
    ALTER TABLE devices ADD COLUMN posture_signed_at TEXT;
    ALTER TABLE devices ADD COLUMN clone_suspected_at TEXT;
    UPDATE devices SET last_proven_contact = (
        SELECT MAX(c.created_at) FROM certificates c WHERE c.device_id = devices.id);
    ALTER TABLE certificates ADD COLUMN used_at TEXT;
    """,
]

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


class SQLiteTx:
    """The `Tx` methods over one connection (`_Direct` in writes, `_Threaded` in reads)."""

    def __init__(self, conn: _Direct | _Threaded) -> None:
        self._c = conn

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

    # approvals
    async def get_approval(self, device_id):
        row = await self._one("SELECT requested_at, approved_at, approved_by FROM approvals WHERE device_id = ?",
                              (device_id,))
        return None if row is None else (_dt(row[0]), _dt(row[1]), row[2])

    async def request_approval(self, device_id, at) -> None:
        await self._c.execute("INSERT OR IGNORE INTO approvals (device_id, requested_at) VALUES (?, ?)",
                              (device_id, _ts(at)))

    async def approve(self, device_id, at, by) -> None:
        await self._c.execute(
            "INSERT INTO approvals (device_id, requested_at, approved_at, approved_by) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET approved_at = excluded.approved_at, "
            "approved_by = excluded.approved_by", (device_id, _ts(at), _ts(at), by))

    async def clear_approval(self, device_id) -> None:
        await self._c.execute("DELETE FROM approvals WHERE device_id = ?", (device_id,))

    async def pending_approvals(self):
        rows = await self._all("SELECT device_id, requested_at FROM approvals WHERE approved_at IS NULL "
                               "ORDER BY requested_at")
        return [(device_id, _dt(at)) for device_id, at in rows]

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

    async def audit_rows(self):
        rows = await self._all("SELECT id, at, actor, action, device_id, serial, detail, prev_hash, hash "
                               "FROM audit_log ORDER BY id")
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
            try:
                yield SQLiteTx(_Direct(self._writer))
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
        outcome = await _finish(asyncio.to_thread(self._writer.execute, "COMMIT"))
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


def _statements(script: str) -> list[str]:
    """The statements of a migration: split at ';', rejoined until SQLite calls a piece complete
    (a trigger's body holds ';' of its own)."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending)
            pending = ""
    if pending.strip(" \n;"):
        raise sqlite3.DatabaseError(f"incomplete statement in a migration: {pending[:60]!r}")
    return statements


def migrate(conn: sqlite3.Connection) -> int:
    """Run the migrations this database has not seen yet; return the schema version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"database schema version {version} is newer than this iomt-ca ({len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)
