"""ca/audit_chain.py: the console's view of the audit chain. Verified in full on the first call
and once `full_every` has passed, incrementally in between; a rewritten history or entries cut
off the end are reported at once (and stay reported), an entry edited in place by the next full
pass; the store's filtered, paged reads of the log agree with filtering every entry by hand."""
from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from ca.audit import chain_hash, verify_chain
from ca.audit_chain import ChainMonitor
from ca.authority import Authority
from ca.registry import new_device


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    yield a
    await a.close()


async def add_devices(authority, n: int, stem: str = "pump") -> None:
    for i in range(n):
        await authority.registry.add(new_device(f"{stem}-{i}", model="M", owner="ICU"), actor="operator:test")


async def all_rows(authority):
    async with authority.store.read() as tx:
        return await tx.audit_rows()


def sql(authority, statement: str, args=()) -> None:
    """What someone with write access to the database file can do."""
    conn = sqlite3.connect(authority.config.database)
    conn.execute(statement, args)
    conn.commit()
    conn.close()


def rewrite_from(database, entry_id: int, actor: str) -> None:
    """Change one entry and recompute every later hash, as a careful forger would."""
    conn = sqlite3.connect(database)
    conn.execute("UPDATE audit_log SET actor = ? WHERE id = ?", (actor, entry_id))
    rows = conn.execute("SELECT id, at, actor, action, device_id, serial, detail, prev_hash FROM audit_log "
                        "WHERE id >= ? ORDER BY id", (entry_id,)).fetchall()
    prev = rows[0][7]
    for id_, at, who, action, device, serial, detail, _ in rows:
        h = chain_hash(prev, id=id_, at=at, actor=who, action=action, device_id=device, serial=serial, detail=detail)
        conn.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE id = ?", (prev, h, id_))
        prev = h
    conn.commit()
    conn.close()


async def test_an_intact_log_and_new_entries_as_they_come(authority, clock):
    await add_devices(authority, 7)
    monitor = ChainMonitor(authority.store, clock, chunk=3)   # pages smaller than the log
    status = await monitor.status()
    rows = await all_rows(authority)
    assert status.intact and status.entries == len(rows) == rows[-1].id and status.head == rows[-1].hash
    assert status.full_at == clock.now
    clock.advance(minutes=5)
    await add_devices(authority, 4, "monitor")
    status = await monitor.status()
    rows = await all_rows(authority)
    assert status.intact and status.entries == rows[-1].id and status.head == rows[-1].hash
    assert status.full_at == clock.now - timedelta(minutes=5)   # no full pass: only the new entries


async def test_an_entry_edited_in_place_is_found_by_the_next_full_pass(authority, clock):
    await add_devices(authority, 5)
    monitor = ChainMonitor(authority.store, clock, full_every=timedelta(hours=1))
    assert (await monitor.status()).intact
    sql(authority, "UPDATE audit_log SET actor = 'operator:nobody' WHERE id = 2")
    assert verify_chain(await all_rows(authority))   # the whole log shows it
    clock.advance(minutes=59)
    assert (await monitor.status()).intact           # between full passes the old entries are not read
    clock.advance(minutes=1)
    status = await monitor.status()
    assert not status.intact and status.problem_count == 1 and "entry 2" in status.problems[0]


async def test_a_rewritten_history_is_reported_at_once_and_stays_reported(authority, clock):
    await add_devices(authority, 5)
    monitor = ChainMonitor(authority.store, clock)
    assert (await monitor.status()).intact
    rewrite_from(authority.config.database, 2, "operator:forger")
    assert verify_chain(await all_rows(authority)) == []   # the forgery is a whole chain
    status = await monitor.status()
    assert not status.intact and "gone or changed" in status.problems[0]
    clock.advance(hours=2)   # full passes later: still reported in this process
    assert not (await monitor.status()).intact


async def test_entries_cut_off_the_end_are_reported(authority, clock):
    await add_devices(authority, 5)
    monitor = ChainMonitor(authority.store, clock)
    before = await monitor.status()
    sql(authority, "DELETE FROM audit_log WHERE id > ?", (before.entries - 2,))
    status = await monitor.status()
    assert not status.intact and status.entries == before.entries - 2
    assert f"entry {before.entries}" in status.problems[0]


async def test_filtered_pages_of_the_log_match_filtering_by_hand(authority, clock):
    await add_devices(authority, 6)
    await authority.registry.new_token("pump-2", actor="operator:bob")
    rows = await all_rows(authority)
    async with authority.store.read() as tx:
        for wanted in ({}, {"device_id": "pump-2"}, {"actor": "operator:bob"}, {"action": "device_registered"},
                       {"device_id": "pump-2", "action": "token_issued"}):
            expected = [r for r in rows if all(getattr(r, k) == v for k, v in wanted.items())]
            assert await tx.audit_count(**wanted) == len(expected), wanted
            newest = await tx.audit_entries(**wanted, limit=2)
            assert newest == list(reversed(expected))[:2], wanted
            if newest:   # the page below the oldest shown
                older = await tx.audit_entries(**wanted, before_id=newest[-1].id, limit=100)
                assert older == list(reversed(expected))[2:], wanted
        assert await tx.audit_actions() == sorted({r.action for r in rows})


async def test_the_first_pass_runs_in_the_background_and_a_caller_sees_its_progress(authority, clock):
    await add_devices(authority, 12)
    monitor = ChainMonitor(authority.store, clock, chunk=2)
    early = await monitor.status(wait=0)   # the pass has started; nothing verified to the end yet
    rows = await all_rows(authority)
    assert not early.complete and early.full_at is None and early.entries < len(rows)
    done = await monitor.status()
    assert done.complete and done.intact and done.entries == len(rows) and done.full_at == clock.now
    assert done.json()["verified_in_full_at"] == clock.now.isoformat()
