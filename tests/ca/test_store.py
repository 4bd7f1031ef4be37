"""The SQLite store: migrations, WAL, and writers in several processes that queue instead of failing."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

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
