"""The SQLite store: migrations, WAL, and writers in several processes that queue instead of failing."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from ca.store.sqlite import MIGRATIONS, SQLiteStore


async def test_migrations_run_once_and_record_version(tmp_path):
    path = tmp_path / "x.db"
    store = await SQLiteStore.open(path)
    await store.close()
    store = await SQLiteStore.open(path)  # second open: nothing to migrate, no error
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"devices", "tokens", "certificates", "revocations", "audit_log", "crl_state"} <= tables


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "x.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        await SQLiteStore.open(path)


async def test_failed_transaction_leaves_nothing(tmp_path):
    from ca.model import AuditEvent
    from tests.conftest import T0
    store = await SQLiteStore.open(tmp_path / "x.db")
    try:
        with pytest.raises(RuntimeError):
            async with store.write() as tx:
                await tx.append_audit(AuditEvent("x", "t"), T0)
                raise RuntimeError("boom")
        async with store.read() as tx:
            assert await tx.audit_rows() == []
    finally:
        await store.close()


WORKER = textwrap.dedent("""
    import asyncio, sys
    from ca.authority import Authority, OperatorAuth
    from ca.registry import new_device
    from tests.conftest import make_csr

    async def main(home, prefix, n):
        async with await Authority.open(home) as a:
            for i in range(n):
                device_id = f"{prefix}-{i}"
                await a.registry.add(new_device(device_id, model="m", owner="o"), actor="t")
                await a.enroll(device_id, make_csr()[0], OperatorAuth("t"))
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


def test_writers_in_several_processes_all_succeed(ca_home):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(ca_home), f"w{k}", "15"],
                              stderr=subprocess.PIPE, text=True) for k in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    conn = sqlite3.connect(ca_home / "iomtca.db")
    assert conn.execute("SELECT count(*) FROM certificates WHERE profile = 'device'").fetchone()[0] == 60


async def _insert_device(tx, device_id: str) -> None:
    from dataclasses import replace

    from ca.registry import new_device
    from tests.conftest import T0
    await tx.insert_device(replace(new_device(device_id, model="m", owner="o"), created_at=T0))


async def test_group_commit_answers_each_writer_only_once_its_rows_are_on_disk(tmp_path):
    """Concurrent write blocks share commits, yet none returns before its own row is durable:
    an independent connection sees it the moment the block's caller goes on."""
    import asyncio
    path = tmp_path / "x.db"
    store = await SQLiteStore.open(path)
    statements: list[str] = []
    store._writer.set_trace_callback(statements.append)  # white box: count the COMMITs
    seen_by_other = []

    async def writer(k: int) -> None:
        async with store.write() as tx:
            await _insert_device(tx, f"d{k}")
            await asyncio.sleep(0)  # let the others queue behind this block
        other = sqlite3.connect(path)
        seen_by_other.append(other.execute("SELECT count(*) FROM devices WHERE id = ?", (f"d{k}",)).fetchone()[0])
        other.close()

    try:
        await asyncio.gather(*(writer(k) for k in range(40)))
    finally:
        await store.close()
    assert seen_by_other == [1] * 40
    commits = sum(1 for s in statements if s.strip().upper() == "COMMIT")
    assert 1 <= commits < 40 / 4, f"{commits} commits for 40 concurrent writes: no grouping"


async def test_a_failing_block_in_a_group_loses_only_its_own_rows(tmp_path):
    import asyncio
    path = tmp_path / "x.db"
    store = await SQLiteStore.open(path)

    async def writer(k: int) -> None:
        async with store.write() as tx:
            await _insert_device(tx, f"d{k}")
            await asyncio.sleep(0)
            if k % 5 == 0:
                raise ValueError(f"block {k} fails")

    try:
        results = await asyncio.gather(*(writer(k) for k in range(20)), return_exceptions=True)
    finally:
        await store.close()
    assert [k for k, r in enumerate(results) if isinstance(r, ValueError)] == [0, 5, 10, 15]
    rows = {r[0] for r in sqlite3.connect(path).execute("SELECT id FROM devices")}
    assert rows == {f"d{k}" for k in range(20) if k % 5}


async def test_revocations_recorded_before_migration_5_still_reach_the_crl(tmp_path):
    """Migration 5 stores each CRL entry when it is recorded; older rows are encoded when read."""
    from datetime import timedelta

    from ca.crl import encode_entry
    from ca.model import CertStatus, Revocation, RevocationReason
    from tests.conftest import T0
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:4]:
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute("INSERT INTO devices (id, model, owner, created_at) VALUES ('d', 'm', 'o', '2026-11-22T12:00:00Z')")
    for serial, not_after in ((0x1234, "2026-11-25T12:00:00Z"), (0x5678, "2026-11-20T12:00:00Z")):
        conn.execute("INSERT INTO certificates (serial, device_id, profile, not_before, not_after, der, status, "
                     "created_at) VALUES (?, 'd', 'device', '2026-11-19T12:00:00Z', ?, x'00', 'revoked', "
                     "'2026-11-19T12:00:00Z')", (format(serial, "x"), not_after))
        conn.execute("INSERT INTO revocations (serial, reason, revoked_at) VALUES (?, 1, '2026-11-21T10:00:00Z')",
                     (format(serial, "x"),))
    conn.close()
    store = await SQLiteStore.open(path)
    try:
        async with store.read() as tx:
            entries = await tx.crl_entries(T0)
        # a revocation recorded now keeps its entry
        async with store.write() as tx:
            await tx.insert_certificate(_record(0x9abc, T0 + timedelta(days=3)))
            await tx.change_status(0x9abc, CertStatus.GOOD, CertStatus.REVOKED, RevocationReason.superseded, T0)
        async with store.read() as tx:
            after = await tx.crl_entries(T0)
    finally:
        await store.close()
    revoked_at = T0.replace(day=21, hour=10)
    assert entries == [encode_entry(Revocation(0x1234, RevocationReason.keyCompromise, revoked_at))]  # 0x5678 expired
    assert after == entries + [encode_entry(Revocation(0x9abc, RevocationReason.superseded, T0))]
    stored = sqlite3.connect(path).execute("SELECT entry, not_after FROM revocations WHERE serial = '9abc'").fetchone()
    assert stored == (after[-1], "2026-11-25T12:00:00Z")


def _record(serial, not_after):
    from ca.model import CertRecord
    from tests.conftest import T0
    return CertRecord(serial=serial, device_id=None, profile="server", not_before=T0, not_after=not_after,
                      der=b"\x00", created_at=T0)


async def test_migration_15_keeps_api_tokens_and_never_reuses_an_id(tmp_path):
    """operator_tokens is rebuilt with AUTOINCREMENT: tokens of version 14 stay, and the id of a
    revoked newest token is not handed out again (without it SQLite reuses the largest rowid)."""
    from ca.store.sqlite_schema import _statements
    path = tmp_path / "v14.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    for script in MIGRATIONS[:14]:
        for statement in _statements(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 14")
    conn.execute("INSERT INTO operators (name, role, password_hash, created_at, created_by) "
                 "VALUES ('ci', 'auditor', 'scrypt$x', '2026-11-22T12:00:00Z', 'test')")
    for n in (1, 2):
        conn.execute("INSERT INTO operator_tokens (digest, operator, created_at, created_by, expires_at) "
                     "VALUES (?, 'ci', '2026-11-22T12:00:00Z', 'test', '2027-01-01T00:00:00Z')", (bytes([n]) * 32,))
    conn.close()
    store = await SQLiteStore.open(path)
    try:
        async with store.read() as tx:
            assert [(t.id, t.label) for t in await tx.list_operator_tokens("ci")] == [(1, None), (2, None)]
        async with store.write() as tx:
            assert await tx.delete_operator_token("ci", 2)
            from tests.conftest import T0
            new_id = await tx.insert_operator_token(b"\x03" * 32, "ci", T0, T0 + timedelta(days=1), "test", "x")
        assert new_id == 3
    finally:
        await store.close()
