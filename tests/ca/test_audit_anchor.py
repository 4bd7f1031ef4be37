"""ca/audit_anchor.py: anchors of the audit chain's head in an append-only file, and the checks
that hold the database to them. The chain alone (ca/audit.py) cannot see entries cut off the end
or a history rewritten with every later hash recomputed; an anchor recorded before either can.
The property test runs random appends, anchors and one tampering step against a real SQLite store
and asks that the check reports a problem exactly when the tampering contradicts an anchor."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ca.audit import verify_chain
from ca.audit_anchor import (Anchor, anchor_now, append_anchor, check_anchors, export_record, last_anchor,
                             read_anchors, record_row)
from ca.authority import Authority
from ca.config import AuditConfig, parse_config
from ca.errors import ConfigError
from ca.model import AuditEvent
from ca.registry import new_device
from ca.store.sqlite import SQLiteStore
from tests.conftest import T0, FakeClock
from tests.ca.test_audit_chain import rewrite_from


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    yield a
    await a.close()


async def add_devices(authority, n: int, stem: str = "pump") -> None:
    for i in range(n):
        await authority.registry.add(new_device(f"{stem}-{i}", model="M", owner="ICU"), actor="operator:test")


async def rows_of(store):
    async with store.read() as tx:
        return await tx.audit_rows()


def sql(database: Path, statement: str, args=()) -> None:
    """What someone with write access to the database file can do."""
    conn = sqlite3.connect(database)
    conn.execute(statement, args)
    conn.commit()
    conn.close()


# -- the file ------------------------------------------------------------------------------------

async def test_append_and_read_back(authority, tmp_path):
    await add_devices(authority, 3)
    path = tmp_path / "anchors.jsonl"
    first_head = (await rows_of(authority.store))[-1]
    first = append_anchor(path, first_head, 7, at=T0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"at": "2026-11-22T12:00:00Z", "id": first_head.id,
                                            "hash": first_head.hash, "crl_number": 7}
    written = path.read_bytes()
    await add_devices(authority, 2, stem="mon")
    second_head = (await rows_of(authority.store))[-1]
    append_anchor(path, second_head, None, at=T0 + timedelta(minutes=15))
    assert path.read_bytes().startswith(written)   # appended, never rewritten
    log = read_anchors(path)
    assert log.torn == () and log.problems == ()
    assert [(a.line, a.id, a.hash, a.crl_number) for a in log.anchors] == [
        (1, first.id, first.hash, 7), (2, second_head.id, second_head.hash, None)]
    assert last_anchor(path) == Anchor(at="2026-11-22T12:15:00Z", id=second_head.id, hash=second_head.hash,
                                       crl_number=None)
    assert await check_anchors(log.anchors, authority.store) == []


async def test_a_torn_last_line_is_reported_and_the_next_anchor_stands_on_its_own_line(authority, tmp_path):
    await add_devices(authority, 2)
    path = tmp_path / "anchors.jsonl"
    head = (await rows_of(authority.store))[-1]
    append_anchor(path, head, None, at=T0)
    with open(path, "ab") as f:   # a crash in the middle of the next write
        f.write(b'{"at":"2026-11-22T12:15:00Z","id":3,"ha')
    log = read_anchors(path)
    assert [a.id for a in log.anchors] == [head.id] and log.problems == ()
    assert log.torn == ("line 2: an incomplete anchor (a write cut short by a crash?); ignored",)
    assert last_anchor(path).id == head.id
    before = path.read_bytes()
    await add_devices(authority, 1, stem="mon")
    newer = (await rows_of(authority.store))[-1]
    append_anchor(path, newer, None, at=T0 + timedelta(minutes=30))
    assert path.read_bytes().startswith(before)
    log = read_anchors(path)
    assert [a.id for a in log.anchors] == [head.id, newer.id] and len(log.torn) == 1 and log.problems == ()
    assert await check_anchors(log.anchors, authority.store) == []
    # zeros where a write never landed (power loss) are torn too
    with open(path, "ab") as f:
        f.write(b"\0" * 40)
    assert len(read_anchors(path).torn) == 2


def test_a_line_of_json_that_is_no_anchor_is_an_edit(tmp_path):
    path = tmp_path / "anchors.jsonl"
    path.write_text('{"at":"2026-11-22T12:00:00Z","id":"four","hash":"ab","crl_number":null}\n[1,2]\n')
    log = read_anchors(path)
    assert log.anchors == () and log.torn == ()
    assert log.problems == ("anchor file edited: line 1 is not an anchor (no entry id)",
                            "anchor file edited: line 2 is not an anchor (not a JSON object)")
    with pytest.raises(FileNotFoundError):
        read_anchors(tmp_path / "missing.jsonl")
    assert last_anchor(tmp_path / "missing.jsonl") is None


# -- what the anchors reveal -----------------------------------------------------------------------

async def test_entries_cut_off_the_end_after_an_anchor(authority, tmp_path):
    await add_devices(authority, 5)
    path = tmp_path / "anchors.jsonl"
    head = (await rows_of(authority.store))[-1]
    append_anchor(path, head, None, at=T0)
    sql(authority.config.database, "DELETE FROM audit_log WHERE id > ?", (head.id - 2,))
    left = await rows_of(authority.store)
    assert verify_chain(left) == []   # the chain alone cannot see it
    problems = await check_anchors(read_anchors(path).anchors, authority.store)
    assert problems == [f"entries cut off the end: line 1 anchored entry {head.id} at 2026-11-22T12:00:00Z, "
                        f"but the log ends at entry {head.id - 2} (1 anchor(s) beyond the head)"]


async def test_cut_off_and_written_again_is_a_rewritten_history(authority, tmp_path):
    await add_devices(authority, 4)
    path = tmp_path / "anchors.jsonl"
    head = (await rows_of(authority.store))[-1]
    append_anchor(path, head, None, at=T0)
    sql(authority.config.database, "DELETE FROM audit_log WHERE id >= ?", (head.id - 1,))
    await add_devices(authority, 3, stem="other")   # new entries take the ids back, with other hashes
    assert verify_chain(await rows_of(authority.store)) == []
    [problem] = await check_anchors(read_anchors(path).anchors, authority.store)
    assert problem.startswith(f"history rewritten: entry {head.id}, anchored at line 1 (2026-11-22T12:00:00Z), "
                              "now has hash ")


async def test_a_rewritten_history_is_seen_at_every_anchor_it_reaches(authority, tmp_path):
    path = tmp_path / "anchors.jsonl"
    anchored = []
    for round_ in range(3):
        await add_devices(authority, 2, stem=f"r{round_}")
        anchored.append(append_anchor(path, (await rows_of(authority.store))[-1], None, at=T0))
    rewrite_from(authority.config.database, anchored[1].id - 1, "operator:someone-else")
    assert verify_chain(await rows_of(authority.store)) == []   # every later hash recomputed
    problems = await check_anchors(read_anchors(path).anchors, authority.store)
    assert [p.split(",")[0] for p in problems] == [f"history rewritten: entry {anchored[1].id}",
                                                   f"history rewritten: entry {anchored[2].id}"]
    # a middle entry deleted outright is gone
    sql(authority.config.database, "DELETE FROM audit_log WHERE id = ?", (anchored[0].id,))
    problems = await check_anchors(read_anchors(path).anchors, authority.store)
    assert problems[0] == f"history rewritten: entry {anchored[0].id}, anchored at line 1 (2026-11-22T12:00:00Z), is gone"


async def test_anchor_ids_that_go_backwards_mean_the_file_was_edited(authority, tmp_path):
    await add_devices(authority, 4)
    rows = await rows_of(authority.store)
    path = tmp_path / "anchors.jsonl"
    for row in (rows[2], rows[5], rows[3]):
        append_anchor(path, row, None, at=T0)
    problems = await check_anchors(read_anchors(path).anchors, authority.store)
    assert problems == [f"anchor file edited: line 3 anchors entry {rows[3].id}, below entry {rows[5].id} "
                        "of line 2 before it (ids only ever rise)"]


async def test_anchor_now_writes_only_when_the_head_moved(authority, tmp_path, clock):
    path = tmp_path / "sub" / "anchors.jsonl"
    path.parent.mkdir()
    first = await anchor_now(authority.store, path, clock=clock)
    assert first is not None and first.crl_number is None
    assert await anchor_now(authority.store, path, clock=clock) is None   # nothing new
    await add_devices(authority, 1)
    clock.advance(minutes=15)
    second = await anchor_now(authority.store, path, clock=clock)
    head = (await rows_of(authority.store))[-1]
    assert (second.id, second.hash, second.at) == (head.id, head.hash, "2026-11-22T12:15:00Z") and head.id > first.id
    await authority.crl()
    await authority.crl()
    third = await anchor_now(authority.store, path, clock=clock)   # a newer CRL is worth recording
    async with authority.store.read() as tx:
        assert third.id == second.id and third.crl_number == (await tx.latest_crl())[1] >= 2
    assert await anchor_now(authority.store, path, clock=clock) is None
    assert [a.id for a in read_anchors(path).anchors] == [first.id, second.id, third.id]


async def test_export_records_replay_to_the_same_chain(authority):
    await add_devices(authority, 3)
    rows = await rows_of(authority.store)
    records = [json.loads(json.dumps(export_record(r))) for r in rows]
    assert all(isinstance(r["detail"], dict) and "detail_text" not in r for r in records)
    assert [record_row(r) for r in records] == rows
    # a damaged row's text is kept as it is, so a replay finds exactly what the database holds
    sql(authority.config.database, "UPDATE audit_log SET detail = ? WHERE id = 2", ('{"b":1, "a":2}',))
    damaged = (await rows_of(authority.store))[1]
    record = export_record(damaged)
    assert record["detail"] == {"a": 2, "b": 1} and record["detail_text"] == '{"b":1, "a":2}'
    assert record_row(record) == damaged


# -- [audit] in config.toml ------------------------------------------------------------------------

def test_audit_config_defaults_and_refusals(tmp_path):
    home = tmp_path / "ca"
    assert parse_config({}, home).audit == AuditConfig(home / "audit-anchors.jsonl", timedelta(minutes=15))
    cfg = parse_config({"audit": {"anchor_file": "/srv/worm/anchors.jsonl", "anchor_every": "1s"}}, home).audit
    assert cfg == AuditConfig(Path("/srv/worm/anchors.jsonl"), timedelta(seconds=1))
    for bad, message in (
        ({"anchor_every": "0s"}, "must be positive"),
        ({"anchor_every": 900}, "invalid duration"),
        ({"anchor_every": "soon"}, "invalid duration"),
        ({"anchor_file": ""}, "must name a file"),
        ({"anchor_file": 42}, "must name a file"),
        ({"anchor_file": "logs/"}, "must name a file"),
        ({"anchor_file": "iomtca.db"}, "outside the database"),
        ({"anchor_file": "./iomtca.db-wal"}, "outside the database"),
        ({"anchor_every": "1m", "ancor_file": "x"}, "unknown setting(s) ancor_file"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_config({"audit": bad}, home)
    with pytest.raises(ConfigError, match="must be a table"):
        parse_config({"audit": "anchors.jsonl"}, home)


# -- the property: reported iff the tampering contradicts an anchor ----------------------------------

steps = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(1, 4)), st.just(("anchor",))),
                 min_size=1, max_size=12)
tampering = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("truncate"), st.integers(1, 6)),     # the newest k entries deleted
    st.tuples(st.just("rewrite"), st.integers(1, 60)),     # entry i changed, every later hash recomputed
    st.tuples(st.just("delete"), st.integers(1, 60)),      # entry i deleted
    st.tuples(st.just("modify"), st.integers(1, 60)),      # entry i changed in place (its hash kept)
    st.tuples(st.just("rehash"), st.integers(1, 60)),      # entry i's hash column overwritten
    st.tuples(st.just("swap_lines"), st.integers(0, 20)),  # two adjacent anchor lines swapped
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, tamper=tampering, after=st.integers(0, 3))
def test_reported_iff_the_tampering_contradicts_an_anchor(steps, tamper, after):
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), steps, tamper, after))


async def _scenario(tmp: Path, steps, tamper, after: int) -> None:
    database, path = tmp / "ca.db", tmp / "anchors.jsonl"
    store = await SQLiteStore.open(database)
    clock = FakeClock()
    counter = iter(range(1_000_000))

    async def append(n: int) -> None:
        for _ in range(n):
            clock.advance(seconds=1)
            async with store.write() as tx:   # every entry different, so a re-written id never matches
                await tx.append_audit(AuditEvent("device_registered", f"operator:t{next(counter)}"), clock())

    try:
        anchored: list[int] = []
        for step in steps:
            if step[0] == "append":
                await append(step[1])
            else:
                anchor = await anchor_now(store, path, clock=clock)
                if anchor is not None:
                    anchored.append(anchor.id)
        head = len(await rows_of(store))
        kind = tamper[0]
        if kind == "truncate" and head:
            k = min(tamper[1], head)
            sql(database, "DELETE FROM audit_log WHERE id > ?", (head - k,))
            expected = any(a > head - k for a in anchored)
        elif kind == "rewrite" and head:
            i = (tamper[1] - 1) % head + 1
            rewrite_from(database, i, "operator:forger")
            expected = any(a >= i for a in anchored)
        elif kind == "delete" and head:
            i = (tamper[1] - 1) % head + 1
            sql(database, "DELETE FROM audit_log WHERE id = ?", (i,))
            expected = i in anchored
        elif kind == "modify" and head:
            i = (tamper[1] - 1) % head + 1
            sql(database, "UPDATE audit_log SET actor = 'operator:forger' WHERE id = ?", (i,))
            expected = False   # the chain sees it (verify_chain), not the anchors
        elif kind == "rehash" and head:
            i = (tamper[1] - 1) % head + 1
            sql(database, "UPDATE audit_log SET hash = ? WHERE id = ?", ("f" * 64, i))
            expected = i in anchored
        elif kind == "swap_lines" and len(anchored) >= 2:
            lines = path.read_bytes().splitlines(keepends=True)
            j = tamper[1] % (len(lines) - 1)
            lines[j], lines[j + 1] = lines[j + 1], lines[j]
            path.write_bytes(b"".join(lines))
            expected = True   # the server anchors only a moved head: ids strictly rise
        else:
            expected = False
        await append(after)   # the log goes on after the tampering
        found = read_anchors(path).anchors if path.exists() else ()
        if kind != "swap_lines":
            assert [a.id for a in found] == anchored
        problems = await check_anchors(found, store)
        assert bool(problems) == expected, (steps, tamper, after, anchored, problems)
    finally:
        await store.close()
