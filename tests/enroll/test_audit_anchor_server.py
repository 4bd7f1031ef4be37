"""The server's audit anchors (ca/audit_anchor.py, a duty of `iomtca serve`): a line every
`[audit] anchor_every` while the log's head moves, none while it stands still, and a last line
when the server stops. The real server, stopped with SIGTERM as an operator stops it."""
from __future__ import annotations

import sqlite3
import stat
import time

from ca.audit_anchor import read_anchors

WAIT_S = 20.0


def head(ca) -> tuple[int, str]:
    conn = sqlite3.connect(f"file:{ca.home / 'iomtca.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()


def anchors(ca) -> list[tuple[int, str]]:
    path = ca.home / "audit-anchors.jsonl"
    return [(a.id, a.hash) for a in read_anchors(path).anchors] if path.exists() else []


def wait_for_anchor(ca, want: tuple[int, str]) -> list[tuple[int, str]]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = anchors(ca)
        if found and found[-1] == want:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no anchor of {want} within {WAIT_S} s: {anchors(ca)}")


def test_an_anchor_every_period_while_the_head_moves_and_one_at_shutdown(start_server):
    server = start_server("anchors", ca_tables='[audit]\nanchor_every = "1s"')
    ca = server.ca
    ca.add_device("pump-1")
    first = wait_for_anchor(ca, head(ca))
    assert stat.S_IMODE((ca.home / "audit-anchors.jsonl").stat().st_mode) == 0o600
    time.sleep(2.5)   # over two periods with nothing new: no new line
    assert anchors(ca) == first or head(ca) != first[-1]
    ca.add_device("pump-2")
    wait_for_anchor(ca, head(ca))
    ca.add_device("pump-3")
    assert server.stop() == 0
    assert anchors(ca)[-1] == head(ca)
    out = ca.iomtca("audit", "verify")
    assert "(the configured [audit] anchor_file)" in out.stdout and "the log agrees with every one" in out.stdout


def test_the_last_anchor_is_written_when_the_server_stops(start_server):
    server = start_server("anchors-at-stop", ca_tables='[audit]\nanchor_every = "1h"')
    ca = server.ca
    ca.add_device("pump-1")
    assert anchors(ca) == []   # the first period has not passed
    assert server.stop() == 0
    assert anchors(ca) == [head(ca)]
    assert "audit anchor: entry" in server.log_text()
