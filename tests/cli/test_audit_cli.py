"""`iomtca audit export` and `iomtca audit verify --anchors`, run as the security team runs them:
the real console script in a subprocess, the database tampered with by sqlite3 as someone with
write access to the file would."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from ca.audit import GENESIS, AuditRow, verify_chain
from ca.audit_anchor import append_anchor, record_row

IOMTCA = str(Path(sys.executable).with_name("iomtca"))


def run(*args, ok=True, home: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("IOMTCA_PASSPHRASE", "IOMTCA_HOME")}
    argv = [IOMTCA, *map(str, args)] + (["--dir", str(home)] if home else [])
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def add_devices(home: Path, n: int, stem: str = "pump") -> None:
    for i in range(n):
        run("device", "add", f"{stem}-{i}", "--model", "m", "--owner", "o", home=home)


def db_rows(home: Path) -> list[AuditRow]:
    conn = sqlite3.connect(f"file:{home / 'iomtca.db'}?mode=ro", uri=True)
    try:
        return [AuditRow(*r) for r in conn.execute(
            "SELECT id, at, actor, action, device_id, serial, detail, prev_hash, hash FROM audit_log ORDER BY id")]
    finally:
        conn.close()


def exported(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_export_jsonl_replays_to_the_same_chain(ca_home, tmp_path):
    add_devices(ca_home, 3)
    out = tmp_path / "audit.jsonl"
    out.write_text("an older export\n")
    out.chmod(0o644)
    done = run("audit", "export", "--out", out, home=ca_home)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = db_rows(ca_home)
    assert done.stderr.strip() == f"exported {len(rows)} audit entries (entries 1 to {rows[-1].id}) to {out} (mode 0600)"
    records = exported(out.read_text())
    assert list(records[0]) == ["id", "at", "actor", "action", "device_id", "serial", "detail", "prev_hash", "hash"]
    assert all(isinstance(r["detail"], dict) for r in records)
    replayed = [record_row(r) for r in records]
    assert replayed == rows
    assert verify_chain(replayed, prev=GENESIS) == []
    assert run("audit", "verify", home=ca_home).stdout.startswith(
        f"audit log intact: {len(rows)} entries, head {records[-1]['hash']}")
    # the same on stdout, and as one JSON array
    assert exported(run("audit", "export", home=ca_home).stdout) == records
    assert json.loads(run("audit", "export", "--format", "json", home=ca_home).stdout) == records
    # an edited export no longer replays
    records[1]["actor"] = "operator:someone-else"
    assert verify_chain([record_row(r) for r in records]) == ["entry 2: content does not match its hash (modified)"]


def test_export_since_and_after_id(ca_home):
    # the template CA's entries were written by a fake clock at 2026-11-22T12:00:00Z; these now
    template = len(db_rows(ca_home))
    add_devices(ca_home, 2)
    rows = db_rows(ca_home)
    recent = exported(run("audit", "export", "--since", "1h", home=ca_home).stdout)
    assert [r["id"] for r in recent] == [r.id for r in rows[template:]]
    assert verify_chain([record_row(r) for r in recent], prev=rows[template - 1].hash) == []
    at = rows[template + 1].at
    since = exported(run("audit", "export", "--since", at, home=ca_home).stdout)
    assert since[0]["id"] == min(r.id for r in rows if r.at >= at) and since[-1]["id"] == rows[-1].id
    assert [r["id"] for r in exported(run("audit", "export", "--after-id", 3, home=ca_home).stdout)] == \
        [r.id for r in rows[3:]]
    both = exported(run("audit", "export", "--since", "2000-01-01T00:00:00Z", "--after-id", len(rows) - 1,
                        home=ca_home).stdout)
    assert [r["id"] for r in both] == [rows[-1].id]
    assert run("audit", "export", "--since", "2999-01-01T00:00:00Z", home=ca_home).stdout == ""
    assert json.loads(run("audit", "export", "--after-id", 10_000, "--format", "json", home=ca_home).stdout) == []
    bad = run("audit", "export", "--since", "last tuesday", home=ca_home, ok=False)
    assert bad.returncode == 1 and bad.stderr.startswith("iomtca: error: --since 'last tuesday': give an RFC 3339")


def test_verify_anchors_catches_entries_cut_off_the_end(ca_home, tmp_path):
    add_devices(ca_home, 3)
    anchors = tmp_path / "anchors.jsonl"
    head = db_rows(ca_home)[-1]
    append_anchor(anchors, head, None)
    fine = run("audit", "verify", "--anchors", anchors, home=ca_home)
    assert fine.stdout.splitlines()[1].startswith(f"anchors: 1 in {anchors}, the newest at entry {head.id} (")
    assert fine.stdout.rstrip().endswith("the log agrees with every one")

    conn = sqlite3.connect(ca_home / "iomtca.db")
    conn.execute("DELETE FROM audit_log WHERE id > ?", (head.id - 2,))   # the newest two entries
    conn.commit()
    conn.close()
    plain = run("audit", "verify", home=ca_home)   # the chain that is left is whole
    assert plain.stdout.startswith(f"audit log intact: {head.id - 2} entries")
    caught = run("audit", "verify", "--anchors", anchors, home=ca_home, ok=False)
    assert caught.returncode == 1
    lines = caught.stderr.strip().splitlines()
    assert lines[0].startswith(f"audit anchors: entries cut off the end: line 1 anchored entry {head.id} at ")
    assert lines[0].endswith(f"but the log ends at entry {head.id - 2} (1 anchor(s) beyond the head)")
    assert lines[-1] == "iomtca: error: audit log is damaged: 1 contradiction(s) of its anchors"
    # the configured anchor file is used by default, and verify says so
    shutil.copy(anchors, ca_home / "audit-anchors.jsonl")
    default = run("audit", "verify", home=ca_home, ok=False)
    assert default.returncode == 1 and "audit anchors: entries cut off the end" in default.stderr
    assert f"anchors: 1 in {ca_home / 'audit-anchors.jsonl'} (the configured [audit] anchor_file)" in default.stderr


def test_verify_reports_chain_and_anchor_problems_together(ca_home, tmp_path):
    add_devices(ca_home, 2)
    anchors = tmp_path / "anchors.jsonl"
    rows = db_rows(ca_home)
    append_anchor(anchors, rows[-1], None)
    append_anchor(anchors, rows[2], None)    # ids going backwards: the file was edited
    with open(anchors, "ab") as f:
        f.write(b'{"at":"2026-')              # and a torn last line: reported, not held against anyone
    conn = sqlite3.connect(ca_home / "iomtca.db")
    conn.execute("UPDATE audit_log SET actor = 'operator:nobody' WHERE id = 2")
    conn.commit()
    conn.close()
    bad = run("audit", "verify", "--anchors", anchors, home=ca_home, ok=False)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert f"audit anchors: {anchors}: line 3: an incomplete anchor (a write cut short by a crash?); ignored" in lines
    assert "audit log: entry 2: content does not match its hash (modified)" in lines
    assert any(line.startswith("audit anchors: anchor file edited: line 2 anchors entry 3") for line in lines)
    assert lines[-1] == ("iomtca: error: audit log is damaged: 1 problem(s) in "
                         f"{len(rows)} entries, 1 contradiction(s) of its anchors")


def test_verify_refusals(ca_home, tmp_path):
    missing = run("audit", "verify", "--anchors", tmp_path / "nowhere.jsonl", home=ca_home, ok=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"iomtca: error: anchor file {tmp_path / 'nowhere.jsonl'} does not exist"
    config = ca_home / "config.toml"
    config.write_text(config.read_text() + '\n[audit]\nanchor_every = "0s"\n')
    refused = run("audit", "verify", home=ca_home, ok=False)
    assert refused.returncode == 1 and refused.stderr.strip() == "iomtca: error: audit.anchor_every must be positive"


def test_export_and_verify_read_the_log_a_page_at_a_time(ca_home, monkeypatch, capsys):
    """In-process with pages of 2 entries: the same export, and never a read of more than a page."""
    import argparse
    import asyncio

    from ca.store.sqlite import SQLiteTx
    from cli import audit_cmds

    add_devices(ca_home, 2)
    whole = run("audit", "export", home=ca_home).stdout
    limits = []
    original = SQLiteTx.audit_rows

    async def audit_rows(self, **kw):
        limits.append(kw.get("limit"))
        return await original(self, **kw)

    monkeypatch.setattr(SQLiteTx, "audit_rows", audit_rows)
    monkeypatch.setattr(audit_cmds, "PAGE", 2)
    args = argparse.Namespace(dir=ca_home, since=None, after_id=0, format="jsonl", out=None)
    assert asyncio.run(audit_cmds.audit_export(args)) == 0
    assert capsys.readouterr().out == whole
    assert asyncio.run(audit_cmds.audit_verify(argparse.Namespace(dir=ca_home, anchors=None))) == 0
    assert capsys.readouterr().out.startswith(f"audit log intact: {len(db_rows(ca_home))} entries")
    assert len(limits) > len(db_rows(ca_home)) // 2 and set(limits) == {2}
