"""store/sqlite_reports.py against a reference written in Python: for random fleets (devices with
random fields and contact times, certificates of random status and expiry, some long expired) and
random filters, a page of devices, its count and each device's current expiry, the expiry summary
and the status counts equal what filtering every row by hand gives."""
from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ca.store.sqlite import SQLiteStore
from ca.store.sqlite_reports import casefold
from ca.timefmt import to_rfc3339

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
WORDS = ["ICU", "icu", "Radiologie", "Unité", "UNITÉ", "ward-3", "", "Straße"]
STATUSES = ["good", "hold", "revoked"]
FIELDS = ("owner", "model", "criticality", "status", "location")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reports") / "template.db"

    async def make():
        await (await SQLiteStore.open(path)).close()
    asyncio.run(make())
    return path


device = st.fixed_dictionaries({
    "model": st.sampled_from(WORDS[:4]), "owner": st.sampled_from(WORDS), "location": st.sampled_from(WORDS),
    "criticality": st.sampled_from(["low", "medium", "high"]), "status": st.sampled_from(["active", "decommissioned"]),
    "asset_tag": st.sampled_from(["", "A-17", "b-17"]),
    "contact": st.none() | st.integers(-30 * 24, 0),     # hours from NOW
    # hours from NOW, the edges often: expiring now, at a horizon, an hour either side
    "certs": st.lists(st.tuples(st.sampled_from(STATUSES), st.sampled_from([0, 1, -1, 24, 25, 168, 169]) |
                                st.integers(-400, 400)), max_size=4),
})
query = st.fixed_dictionaries({}, optional={
    "owner": st.sampled_from(WORDS), "model": st.sampled_from(WORDS[:4]), "criticality": st.sampled_from(["low", "high"]),
    "status": st.sampled_from(["active", "decommissioned"]), "location": st.sampled_from(WORDS),
    "q": st.sampled_from(["icu", "UNIT", "é", "-1", "strasse", "straße", "dev-1"]),
    "expiring": st.sampled_from([24, 168]) | st.integers(1, 300), "absent": st.integers(1, 400)})


def fill(path: Path, fleet: list[dict]) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for i, d in enumerate(fleet):
            contact = None if d["contact"] is None else to_rfc3339(NOW + timedelta(hours=d["contact"]))
            conn.execute("INSERT INTO devices (id, model, owner, location, criticality, asset_tag, status, created_at, "
                         "last_proven_contact) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (f"dev-{i}", d["model"], d["owner"], d["location"], d["criticality"], d["asset_tag"],
                          d["status"], to_rfc3339(NOW), contact))
            for j, (status, hours) in enumerate(d["certs"]):
                end = NOW + timedelta(hours=hours)
                conn.execute("INSERT INTO certificates (serial, device_id, profile, not_before, not_after, der, status, "
                             "created_at) VALUES (?, ?, 'device', ?, ?, x'00', ?, ?)",
                             (format(1000 * (i + 1) + j, "x"), f"dev-{i}", to_rfc3339(end - timedelta(days=3)),
                              to_rfc3339(end), status, to_rfc3339(NOW)))
    conn.close()


def expiry(d: dict) -> datetime | None:
    ends = [NOW + timedelta(hours=h) for status, h in d["certs"] if status == "good" and h > 0]
    return max(ends, default=None)


def reference(fleet: list[dict], q: dict) -> list[int]:
    picked = []
    for i, d in enumerate(fleet):
        if any(d[k] != q[k] for k in FIELDS if k in q):
            continue
        if "q" in q and not any(casefold(q["q"]) in casefold(v) for v in (
                f"dev-{i}", d["model"], d["owner"], d["location"], d["asset_tag"], "")):
            continue
        if "expiring" in q and not (expiry(d) is not None and expiry(d) <= NOW + timedelta(hours=q["expiring"])):
            continue
        if "absent" in q and not (d["contact"] is None or d["contact"] < -q["absent"]):
            continue
        picked.append(i)
    return sorted(picked, key=lambda i: f"dev-{i}")


def _one(certs, **fields) -> dict:
    return {"model": "ICU", "owner": "", "location": "", "criticality": "low", "status": "active",
            "asset_tag": "", "contact": None, "certs": certs, **fields}


# the edges, always tried: a certificate ending exactly at a horizon or now, a non-ASCII case
@example(fleet=[_one([("good", 24)]), _one([("good", 24), ("good", 25)])], queries=[{"expiring": 24}],
         offset=0, limit=5)
@example(fleet=[_one([("good", 0), ("hold", 0)])], queries=[{}], offset=0, limit=5)
@example(fleet=[_one([], location="UNITÉ"), _one([], owner="Straße")], queries=[{"q": "é"}, {"q": "strasse"}],
         offset=0, limit=5)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=st.lists(device, min_size=1, max_size=12), queries=st.lists(query, min_size=1, max_size=4),
       offset=st.integers(0, 5), limit=st.integers(1, 6))
def test_device_pages_counts_and_summaries_match_the_reference(template, fleet, queries, offset, limit):
    work = Path(tempfile.mkdtemp(prefix="reports-"))
    try:
        path = work / "ca.db"
        shutil.copy(template, path)
        fill(path, fleet)
        asyncio.run(_check(path, fleet, queries, offset, limit))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _check(path: Path, fleet, queries, offset, limit) -> None:
    store = await SQLiteStore.open(path)
    try:
        async with store.read() as tx:
            for q in queries:
                # an empty field is no filter (the API leaves it out), for the reference too
                fields = {k: q[k] for k in FIELDS if q.get(k)}
                expected = reference(fleet, {k: v for k, v in q.items() if k not in FIELDS or v})
                page, total = await tx.device_page(
                    fields=fields, q=q.get("q"), now=NOW, offset=offset, limit=limit,
                    expiring_until=NOW + timedelta(hours=q["expiring"]) if "expiring" in q else None,
                    absent_before=NOW - timedelta(hours=q["absent"]) if "absent" in q else None)
                assert total == len(expected), q
                assert [d.id for d, _ in page] == [f"dev-{i}" for i in expected[offset:offset + limit]], q
                for d, expires in page:
                    assert expires == expiry(fleet[int(d.id.split("-")[1])]), d.id
            current = {f"dev-{i}": expiry(d) for i, d in enumerate(fleet) if expiry(d) is not None}
            assert await tx.current_expiries(NOW) == current
            horizons = [NOW + timedelta(hours=24), NOW + timedelta(days=7)]
            days, soon = await tx.expiry_summary(NOW, horizons, sample=3)
            by_day: dict[str, int] = {}
            for t in current.values():
                by_day[t.date().isoformat()] = by_day.get(t.date().isoformat(), 0) + 1
            assert days == by_day
            soonest = sorted(current, key=lambda k: (current[k], k))[:3]
            for (n, ids), until in zip(soon, horizons):
                assert n == sum(1 for t in current.values() if t <= until)
                assert ids == [k for k in soonest if current[k] <= until]
            counts: dict[str, int] = {}
            for d in fleet:
                for status, h in d["certs"]:
                    if h > 0:
                        counts[status] = counts.get(status, 0) + 1
            assert await tx.current_status_counts(NOW) == counts
            assert await tx.devices_on_hold(NOW) == sorted(
                {f"dev-{i}" for i, d in enumerate(fleet) for status, h in d["certs"] if status == "hold" and h > 0})
    finally:
        await store.close()
