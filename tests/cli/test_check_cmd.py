"""`iomtca check` as an engineer runs it: the real command on a CA directory made by `init_ca` (with
the real clock: the session template of tests/conftest.py is made at T0, so its 7-day OCSP
responder expires a week after T0) and filled by `iomtca device import`, then broken one way at a time."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ca import profiles
from ca.bootstrap import init_ca
from ca.store.sqlite_check import SCHEMA_VERSION
from ca.codec import cert_pem
from ca.config import CAPaths
from ca.issuance import IssuerContext, build_certificate, new_serial, server_names
from ca.keystore import load_cert, load_private_key, write_atomic, write_private_key
from ca.signer import KeySigner, generate_key
from ca.store.sqlite_schema import MIGRATIONS

IOMTCA = str(Path(sys.executable).with_name("iomtca"))
DEVICES = 300   # enough rows that the devices table spans many pages


def check(home: Path, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("IOMTCA_PASSPHRASE", "IOMTCA_HOME")}
    proc = subprocess.run([IOMTCA, "check", "--dir", str(home), *extra], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def lines(proc, label: str) -> list[str]:
    return [ln for ln in proc.stdout.splitlines() if ln.startswith(label)]


@pytest.fixture(scope="module")
def filled_template(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("check-template")
    home = base / "ca"
    asyncio.run(init_ca(home, trust_domain="hospital.test"))
    assets = base / "assets.csv"
    with open(assets, "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["device_id", "model", "owner", "location", "criticality", "firmware", "udi"])
        rows.writerows([f"pump-{i:04d}", "Alaris 8100", "ICU", f"ICU bed {i}", "medium", "12.1.2", ""]
                       for i in range(DEVICES))
    subprocess.run([IOMTCA, "device", "import", str(assets), "--tokens-out", str(base / "tokens.csv"),
                    "--dir", str(home)], check=True, capture_output=True, timeout=120)
    return home


@pytest.fixture
def home(filled_template, tmp_path) -> Path:
    target = tmp_path / "ca"
    shutil.copytree(filled_template, target)
    return target


def _passphrase(home: Path) -> bytes:
    return (home / "private" / "passphrase").read_bytes().strip()


def _sql(db: Path, statement: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(statement)
        conn.commit()


def _user_version(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def _server_cert_issued(home: Path, days_ago: int) -> None:
    """A new server.pem and server.key, signed by the issuing CA as if `days_ago` days ago."""
    paths, passphrase = CAPaths(home), _passphrase(home)
    issuing, root = load_cert(paths.issuing_cert), load_cert(paths.root_cert)
    issuer = IssuerContext(issuing, KeySigner(load_private_key(paths.issuing_key, passphrase)), (issuing, root))
    key = generate_key("ec-p256")
    subject, sans = server_names(["localhost", "127.0.0.1"])
    cert = build_certificate(public_key=key.public_key(), subject=subject, sans=sans, profile=profiles.SERVER,
                             issuer=issuer, serial=new_serial(),
                             now=datetime.now(timezone.utc) - timedelta(days=days_ago))
    write_private_key(paths.server_key, key, passphrase)
    write_atomic(paths.server_cert, cert_pem(cert) + cert_pem(issuing))


def _corrupt_a_table_page(db: Path) -> None:
    """Overwrite the first cells of a leaf page of the devices table (a page in use, in the middle
    of the file: not free space that integrity_check would rightly ignore)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'devices'").fetchone()[0]
    data = bytearray(db.read_bytes())
    at = (root - 1) * size
    assert data[at] == 0x05, "the devices table should span several pages (an interior root)"
    count = int.from_bytes(data[at + 3:at + 5], "big")
    pointers = [int.from_bytes(data[at + 12 + 2 * i:at + 14 + 2 * i], "big") for i in range(count)]
    children = [int.from_bytes(data[at + p:at + p + 4], "big") for p in pointers]
    leaf = (children[len(children) // 2] - 1) * size
    assert data[leaf] == 0x0D   # a table leaf
    cells = leaf + int.from_bytes(data[leaf + 5:leaf + 7], "big")   # start of its cell content area
    data[cells:cells + 32] = random.Random(14).randbytes(32)
    db.write_bytes(data)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]


def test_a_fresh_ca_passes(home):
    proc = check(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *findings, summary = proc.stdout.splitlines()
    assert findings and all(ln.startswith("ok    ") for ln in findings), proc.stdout
    assert summary.startswith(f"check passed: {home}: {len(findings)} checks ok, 0 warning(s)")
    assert f"ok    config: {home / 'config.toml'}" in findings
    for expected in ("ok    key private/issuing.key: mode 0600, decrypts", "ok    cert server.pem: valid until",
                     "ok    cert ocsp.pem: valid until", "ok    cert issuing.pem: valid until",
                     "ok    database iomtca.db: integrity_check ok",
                     f"ok    database iomtca.db: schema {SCHEMA_VERSION}, current",
                     "ok    database iomtca.db: foreign_key_check ok", "ok    audit: chain intact: "):
        assert any(ln.startswith(expected) for ln in findings), (expected, proc.stdout)
    assert _passphrase(home).decode() not in proc.stdout + proc.stderr
    assert proc.stderr == ""
    report = json.loads(check(home, "--json").stdout)
    assert {r["check"] for r in report} == {"config", "key", "cert", "database", "audit"}
    assert all(set(r) == {"check", "status", "message"} and r["status"] == "ok" for r in report)
    entries = int(next(r["message"] for r in report if r["check"] == "audit").split(": ")[1].split()[0])
    assert entries > DEVICES   # one entry per imported device, at least


def _chmod_issuing_key(home):
    (home / "private" / "issuing.key").chmod(0o644)


def _open_private_dir(home):
    (home / "private").chmod(0o755)


def _random_database(home):
    (home / "iomtca.db").write_bytes(random.Random(1).randbytes(8192))


def _edit_audit_entry(home):
    _sql(home / "iomtca.db", "UPDATE audit_log SET actor = 'mallory' WHERE id = 2")


def _dangling_reference(home):
    _sql(home / "iomtca.db", "INSERT INTO tokens (device_id, digest, created_at, expires_at)"
                             " VALUES ('ghost', x'00', '2026-12-01T00:00:00Z', '2026-12-08T00:00:00Z')")


def _bad_ca_setting(home):
    config = home / "config.toml"
    text = config.read_text()
    assert 'token_ttl = "7d"' in text
    config.write_text(text.replace('token_ttl = "7d"', 'token_ttl = "soon"'))


def _bad_enroll_setting(home):
    with open(home / "config.toml", "a") as fh:
        fh.write("\n[enroll]\nsource_failures = 0\n")


def _bad_console_setting(home):
    with open(home / "config.toml", "a") as fh:
        fh.write('\n[console]\nsession_idle = "10s"\n')


def _newer_schema(home):
    _sql(home / "iomtca.db", f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


def _wrong_passphrase(home):
    (home / "private" / "passphrase").write_text("not-the-passphrase\n")   # keeps its mode 0600


def _truncated_key(home):
    key = home / "private" / "issuing.key"
    key.write_bytes(key.read_bytes()[:120])


def _expired_server_cert(home):
    _server_cert_issued(home, days_ago=100)   # 90-day profile: expired 10 days ago


def _no_directory(home):
    shutil.rmtree(home)


BREAKAGES = [
    (_chmod_issuing_key, "ERROR key private/issuing.key: mode 0644, must be 0600"),
    (_open_private_dir, "ERROR key private/: mode 0755, must be 0700"),
    (_corrupt_a_table_page, "ERROR database iomtca.db: integrity_check: "),
    (_random_database, "ERROR database iomtca.db: cannot read: file is not a database"),
    (_edit_audit_entry, "ERROR audit: chain broken: entry 2: content does not match its hash (modified)"),
    (_dangling_reference, "ERROR database iomtca.db: foreign_key_check: tokens row "),
    (_bad_ca_setting, "ERROR config: ca.token_ttl: invalid duration 'soon'"),
    (_bad_enroll_setting, "ERROR config: [enroll] source_failures must be a whole number"),
    (_bad_console_setting, "ERROR config: [console] session_idle must be at least 1m"),
    (_newer_schema, f"ERROR database iomtca.db: database schema {SCHEMA_VERSION + 1} is newer than this iomt-ca "
                    f"({SCHEMA_VERSION}); use a newer iomtca"),
    (_wrong_passphrase, "ERROR key passphrase: decrypts none of the 4 key files: wrong passphrase"),
    (_truncated_key, "ERROR key private/issuing.key: cannot decrypt: damaged, or encrypted with another passphrase"),
    (_expired_server_cert, "ERROR cert server.pem: expired at "),
    (_no_directory, "ERROR config: "),
]


@pytest.mark.parametrize("breakage, expected", BREAKAGES, ids=[b.__name__.lstrip("_") for b, _ in BREAKAGES])
def test_each_breakage_is_one_error_line(home, breakage, expected):
    passphrase = _passphrase(home).decode()
    if breakage is _corrupt_a_table_page:
        breakage(home / "iomtca.db")
    else:
        breakage(home)
    proc = check(home)
    assert proc.returncode == 1, proc.stdout
    errors = lines(proc, "ERROR")
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stdout
    assert proc.stderr.strip() == f"iomtca: error: {home}: 1 error(s), 0 warning(s)", proc.stderr
    assert passphrase not in proc.stdout + proc.stderr
    [error] = [r for r in json.loads(check(home, "--json").stdout) if r["status"] == "error"]
    assert errors[0] in (f"ERROR {error['check']} {error['message']}", f"ERROR {error['check']}: {error['message']}")


def test_a_service_certificate_in_its_last_third_warns(home):
    _server_cert_issued(home, days_ago=70)   # 20 of 90 days left, past its renewal point at day 60
    proc = check(home)
    assert proc.returncode == 0, proc.stdout
    assert lines(proc, "ERROR") == []
    [warning] = lines(proc, "warn")
    assert re.match(r"warn  cert server\.pem: expires in (19d23h|20d0h) \(\d{4}-", warning), warning
    assert "in the last third of its lifetime; its renewal by the EST server is overdue" in warning
    assert "check passed" in proc.stdout and "1 warning(s)" in proc.stdout
    strict = check(home, "--strict")
    assert strict.returncode == 1 and "0 error(s), 1 warning(s)" in strict.stderr


def _database_at_version(db: Path, version: int) -> None:
    """Replace the database with an empty one that has run only the first `version` migrations."""
    for leftover in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        leftover.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


def test_migrate_brings_an_older_schema_to_the_current_one(home):
    db, old = home / "iomtca.db", SCHEMA_VERSION - 4
    _database_at_version(db, old)
    proc = check(home)
    assert proc.returncode == 0, proc.stdout
    [warning] = lines(proc, "warn")
    assert warning == (f"warn  database iomtca.db: database schema {old} is older than this iomt-ca "
                       f"({SCHEMA_VERSION}), migrations pending; run iomtca serve or iomtca check --migrate "
                       "to migrate")
    assert _user_version(db) == old   # check alone never writes
    assert check(home, "--strict").returncode == 1
    migrated = check(home, "--migrate")
    assert migrated.returncode == 0, migrated.stdout
    assert f"ok    database iomtca.db: migrated schema {old} to {SCHEMA_VERSION}" in migrated.stdout
    assert lines(migrated, "warn") == [] and lines(migrated, "ERROR") == []
    assert _user_version(db) == SCHEMA_VERSION
    again = check(home, "--migrate")
    assert again.returncode == 0 and "migrated" not in again.stdout


def test_a_newer_schema_is_never_migrated(home):
    _newer_schema(home)
    proc = check(home, "--migrate")
    assert proc.returncode == 1 and "is newer than this iomt-ca" in proc.stdout
    assert _user_version(home / "iomtca.db") == SCHEMA_VERSION + 1


def test_a_gateway_ra_certificate_from_the_database_is_checked(home):
    from tests.cli.test_status import _gateway_enrolled_at   # registered and enrolled through the CA core
    asyncio.run(_gateway_enrolled_at(home, datetime.now(timezone.utc) - timedelta(days=80)))
    proc = check(home)
    assert proc.returncode == 0, proc.stdout
    [warning] = lines(proc, "warn")
    assert warning.startswith("warn  cert gateway ward-old RA: expires in ")
    assert warning.endswith("its renewal by gateway ward-old (over the RA API) is overdue")
