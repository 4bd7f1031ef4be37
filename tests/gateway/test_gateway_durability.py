"""Nothing acknowledged that is not stored, no secret kept longer than needed (issue 11).

A real mosquitto, `iomtca serve` and `iomtca gateway`; the gateway's database is locked from
outside (an sqlite3 connection holding BEGIN EXCLUSIVE) while a device publishes, and mosquitto's
own log (`log_type all`) says whether the gateway sent PUBACK. The gateway's busy timeout is cut
to half a second (IOMTCA_GATEWAY_DB_BUSY_TIMEOUT) so a short lock is already a failed store.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
from datetime import timedelta

import pytest

from ca.timefmt import to_rfc3339, utc_now
from gateway import durable as durable_mod
from tests.gateway import gwkit
from tests.gateway.gwkit import resp

BUSY_TIMEOUT_S = "0.5"


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IOMTCA_GATEWAY_DB_BUSY_TIMEOUT", BUSY_TIMEOUT_S)  # read by the gateway at its start
        s = make_stack(tmp_path_factory.mktemp("durability")).start()
    yield s
    s.close()


def db_path(stack):
    return stack.gateway.home / "gateway.db"


def stored_bytes(stack) -> bytes:
    """The database file and its WAL, as they are on disk now."""
    data = b""
    for suffix in ("", "-wal"):
        path = db_path(stack).with_name(db_path(stack).name + suffix)
        if path.exists():
            data += path.read_bytes()
    return data


def rows(stack, device_id: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db_path(stack)}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT req_id, op, state, payload, digest, answer FROM requests WHERE device_id = ?",
                            (device_id,)).fetchall()
    finally:
        conn.close()


def sent_to_gateway(log: str, client_id: str, topic: str) -> int | None:
    """The mid of the last PUBLISH mosquitto sent `client_id` on `topic`, per its log."""
    mids = re.findall(rf"Sending PUBLISH to {re.escape(client_id)} \(d\d, q1, r\d, m(\d+), '{re.escape(topic)}'",
                      log)
    return int(mids[-1]) if mids else None


def pubacked(log: str, client_id: str, mid: int) -> bool:
    return re.search(rf"Received PUBACK from {re.escape(client_id)} \(Mid: {mid}\b", log) is not None


# -- 1. a request that cannot be stored is not acknowledged, and not lost --------------------------
def test_request_not_stored_is_not_acknowledged_and_answered_once_stored(stack):
    dev = stack.devices(("du-lock-1", "pumpx"))["du-lock-1"]
    gw = stack.gateway
    topic = gwkit.req(dev.id, "simpleenroll")
    key, csr = dev.new_key_and_csr()
    lock = sqlite3.connect(db_path(stack), timeout=10, isolation_level=None)
    with dev.subscribe() as sub:
        lock.execute("BEGIN EXCLUSIVE")                       # the gateway can store nothing now
        try:
            broker_log_start = len(stack.broker.log())
            gw_log_start = len(gw.proc.stderr_text())
            dev.send("simpleenroll", dev.enroll_request("l-1", csr))
            line = gwkit.wait_until(
                lambda: next((ln for ln in gw.proc.stderr_text()[gw_log_start:].splitlines()
                              if "not stored, not acknowledged" in ln and "req=l-1" in ln), None),
                10, what="the gateway's log line about the failed store")
            assert f"device={dev.id}" in line and "op=simpleenroll" in line, line
            mid = gwkit.wait_until(lambda: sent_to_gateway(stack.broker.log()[broker_log_start:], gw.client_id,
                                                           topic), 5, what="mosquitto's PUBLISH to the gateway")
            # a second failed attempt (back-off) while still locked: still no PUBACK, still no answer
            gwkit.wait_until(lambda: gw.proc.stderr_text()[gw_log_start:].count("req=l-1") >= 2, 5,
                             what="a second attempt to store")
            assert not pubacked(stack.broker.log()[broker_log_start:], gw.client_id, mid), \
                "the gateway acknowledged a request it could not store"
            assert sub.with_id("l-1") == []
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        answer = sub.answer("l-1", timeout=20)               # stored after the lock went, then answered
        assert answer["status"] == "ok", answer
        gwkit.wait_until(lambda: pubacked(stack.broker.log()[broker_log_start:], gw.client_id, mid), 5,
                         what="the PUBACK once stored")
        sub.quiet_for(0.5)
    assert [a["status"] for a in sub.with_id("l-1")] == ["ok"], sub.with_id("l-1")
    cert = dev.adopt(answer, key)
    gwkit.openssl_verify(stack.home, cert)
    assert len(gwkit.certificates(stack.home, dev.id)) == 1
    assert dev.token not in gw.proc.stderr_text()            # the log says why, never with the token


# -- 2. the one-time token is gone from gateway.db once the CA has answered --------------------------
def test_token_is_not_kept_once_answered(stack):
    dev = stack.devices(("du-tok-1", "pumpx"))["du-tok-1"]
    key, csr = dev.new_key_and_csr()
    body = dev.enroll_request("t-1", csr)
    with dev.subscribe() as sub:
        dev.send("simpleenroll", body)
        answer = sub.answer("t-1")
    assert answer["status"] == "ok", answer
    token = dev.token.encode()
    # the answer is stored before it is published; the WAL frames that held the token go within a second
    gwkit.wait_until(lambda: token not in stored_bytes(stack), 10, what="the token gone from gateway.db and its WAL")
    [(req_id, op, state, payload, digest, stored_answer)] = rows(stack, dev.id)
    assert (req_id, op, state) == ("t-1", "simpleenroll", "answered")
    assert payload == b"" and token not in (stored_answer or b"")
    assert digest == hashlib.sha256(json.dumps(body).encode()).digest()
    assert json.loads(stored_answer)["cert"] == answer["cert"]


# -- 3. a request id reused: same payload, same answer; other payload, bad_request ------------------
def test_reused_request_id_same_payload_repeats_other_payload_is_bad_request(stack):
    dev = stack.devices(("du-idem-1", "pumpx"))["du-idem-1"]
    _, csr = dev.new_key_and_csr()
    body = dev.enroll_request("r-1", csr)
    with dev.subscribe() as sub:
        dev.send("simpleenroll", body)
        first = sub.answer("r-1")
        assert first["status"] == "ok", first
        dev.send("simpleenroll", body)                       # the same request again: the stored answer
        sub.wait_count(lambda m: m.json().get("id") == "r-1", 2, 10, "the repeated answer")
        _, other_csr = dev.new_key_and_csr()                 # a rebooted device reusing its id
        dev.send("simpleenroll", dev.enroll_request("r-1", other_csr))
        third = sub.wait_count(lambda m: m.json().get("id") == "r-1", 3, 10, "the answer to the other payload")[2]
        assert third.topic == resp(dev.id, "simpleenroll")
        sub.quiet_for(0.3)
    answers = sub.with_id("r-1")
    assert answers[:2] == [first, first]
    assert answers[2]["status"] == "error" and answers[2]["error"]["code"] == "bad_request", answers[2]
    assert "cert" not in answers[2] and len(answers) == 3
    assert len(gwkit.certificates(stack.home, dev.id)) == 1


# -- 4. the migration scrubs rows answered before it --------------------------------------------
def test_migration_scrubs_payloads_of_answered_requests(tmp_path):
    path = tmp_path / "gateway.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for script in durable_mod.SCHEMA[:2]:                     # a gateway.db as the previous release left it
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    now = to_rfc3339(utc_now())
    answered = b'{"id":"a","csr":"Q1NS","token":"SECRET-TOKEN-ANSWERED"}'
    pending = b'{"id":"p","csr":"Q1NS","token":"SECRET-TOKEN-PENDING"}'
    conn.execute("INSERT INTO requests (device_id, req_id, op, payload, received_at, state, answer, answered_at) "
                 "VALUES ('d', 'a', 'simpleenroll', ?, ?, 'answered', ?, ?)",
                 (answered, now, b'{"id":"a","status":"error"}', now))
    conn.execute("INSERT INTO requests (device_id, req_id, op, payload, received_at) "
                 "VALUES ('d', 'p', 'simpleenroll', ?, ?)", (pending, now))
    conn.close()

    async def reopen():
        db = await durable_mod.Durable.open(path, "gw-test")
        try:
            again = await db.receive("d", "a", "simpleenroll", answered, utc_now(), timedelta(hours=24))
            claimed = await db.claim_next(utc_now())
        finally:
            await db.close()
        return again, claimed

    again, claimed = asyncio.run(reopen())
    assert again.payload == b"" and again.digest == hashlib.sha256(answered).digest()
    assert claimed.req_id == "p" and claimed.payload == pending   # still needed to forward it
    data = path.read_bytes() + (path.with_name("gateway.db-wal").read_bytes()
                                if path.with_name("gateway.db-wal").exists() else b"")
    assert b"SECRET-TOKEN-ANSWERED" not in data
    assert b"SECRET-TOKEN-PENDING" in data
