"""`iomtca backup` and `iomtca restore` (ca/backup.py): a backup taken while devices enroll holds
every certificate handed out before it started and every revocation made before it, and a server
on the restored directory answers for them (OCSP and the CRL, read with openssl); a damaged,
truncated, padded or foreign archive is refused with one line and nothing restored."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.enroll.conftest import CA, IOMTCA, Server, run


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("backup")


def test_a_backup_under_enrollment_load_restores_every_certificate_and_revocation(srv, tmp_path, tools):
    ca = srv.ca
    handed_out, revoked, stop = [], [], threading.Event()

    def load(n: int) -> None:
        while not stop.is_set():
            device = ca.unique(f"load{n}")
            issued = srv.enroll(device, ca.add_device(device))
            handed_out.append((time.monotonic(), issued))
    workers = [threading.Thread(target=load, args=(n,)) for n in range(2)]
    for w in workers:
        w.start()
    try:
        while len(handed_out) < 6:
            time.sleep(0.1)
        for _, issued in handed_out[:3]:
            ca.revoke(issued.serial_hex)
            revoked.append(issued)
        started = time.monotonic()
        archive = tmp_path / "ca.backup"
        out = run([IOMTCA, "backup", "--dir", ca.home, "--out", archive])
        assert out.stdout.startswith(f"backup {archive}: "), out.stdout
    finally:
        stop.set()
        for w in workers:
            w.join()
    before = [issued for at, issued in handed_out if at < started]
    assert len(handed_out) > len(before) >= 6   # enrollments went on during and after the backup
    assert archive.stat().st_mode & 0o777 == 0o600

    restored = tmp_path / "restored"
    out = run([IOMTCA, "restore", archive, "--dir", restored])
    assert out.stdout.startswith(f"restored {restored}: "), out.stdout
    assert not (restored / "private" / "passphrase").exists()   # kept apart unless asked for
    shutil.copy(ca.home / "private" / "passphrase", restored / "private" / "passphrase")
    (restored / "private" / "passphrase").chmod(0o600)
    run([IOMTCA, "check", "--dir", restored])

    copy = CA(restored, tmp_path / "work")
    copy.work.mkdir()
    serials = {c["serial"] for c in copy.certificates()}
    assert {i.serial_hex for i in before} <= serials
    second = Server(copy).start()
    try:
        crl = x509.load_der_x509_crl(second.plain("/crl").body)
        listed = {format(e.serial_number, "x") for e in crl}
        for issued in revoked:
            assert issued.serial_hex in listed
            status = tools.run(["openssl", "ocsp", "-issuer", copy.issuing, "-cert", issued.cert_path, "-url",
                                f"{second.http}/ocsp", "-VAfile", copy.ocsp_cert, "-CAfile", copy.chain]).stdout
            assert f"{issued.cert_path}: revoked" in status, status
        good = before[-1]
        status = tools.run(["openssl", "ocsp", "-issuer", copy.issuing, "-cert", good.cert_path, "-url",
                            f"{second.http}/ocsp", "-VAfile", copy.ocsp_cert, "-CAfile", copy.chain]).stdout
        assert f"{good.cert_path}: good" in status, status
    finally:
        assert second.stop() in (0, None)


def _archive(srv, tmp_path) -> Path:
    archive = tmp_path / "good.backup"
    if not archive.exists():
        run([IOMTCA, "backup", "--dir", srv.ca.home, "--out", archive])
    return archive


def _rewritten(src: Path, dest: Path, change) -> Path:
    """A copy of archive `src` with its members passed through `change(name, data) -> [(name, data)]`."""
    with tarfile.open(src) as tar, tarfile.open(dest, "w") as out:
        for member in tar:
            for name, data in change(member.name, tar.extractfile(member).read()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return dest


def _flip(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 1]) + data[101:]


BROKEN = {
    "damaged key": (lambda n, d: [(n, _flip(d) if n == "private/issuing.key" else d)], "damaged"),
    "extra member": (lambda n, d: [(n, d)] + ([("private/planted.key", b"x")] if n == "config.toml" else []),
                     "not in MANIFEST.json"),
    "escaping name": (lambda n, d: [("../outside.pem" if n == "root.pem" else n, d)], "leave the CA directory"),
    "missing member": (lambda n, d: [] if n == "config.toml" else [(n, d)], "config.toml"),
    "no manifest": (lambda n, d: [] if n == "MANIFEST.json" else [(n, d)], "MANIFEST.json"),
    "edited audit": (lambda n, d: [(n, d)], None),   # built below: a database whose chain differs
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_archive_is_refused_with_one_line_and_nothing_restored(srv, tmp_path, case):
    good = _archive(srv, tmp_path)
    change, expected = BROKEN[case]
    if case == "edited audit":
        import sqlite3
        work = tmp_path / "edit"
        work.mkdir()
        with tarfile.open(good) as tar:
            tar.extractall(work, filter="data")
        conn = sqlite3.connect(work / "iomtca.db")
        conn.execute("UPDATE audit_log SET actor = 'operator:nobody' WHERE id = 1")
        conn.commit()
        conn.close()
        manifest = json.loads((work / "MANIFEST.json").read_text())
        import hashlib
        data = (work / "iomtca.db").read_bytes()
        for m in manifest["members"]:
            if m["name"] == "iomtca.db":   # a forger who fixes the manifest too
                m["size"], m["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        (work / "MANIFEST.json").write_text(json.dumps(manifest))
        broken = tmp_path / "broken.backup"
        with tarfile.open(broken, "w") as out:
            for m in ["MANIFEST.json"] + [m["name"] for m in manifest["members"]]:
                out.add(work / m, arcname=m)
        expected = "fails its checks"
    else:
        broken = _rewritten(good, tmp_path / "broken.backup", change)
    target = tmp_path / "target"
    out = run([IOMTCA, "restore", broken, "--dir", target], check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out
    assert out.stderr.count("\n") == 1 and expected in out.stderr, out.stderr
    assert not target.exists() and not (tmp_path / "outside.pem").exists()


@pytest.mark.parametrize("cut", ["truncated", "padded with zeros", "not a tar", "empty"])
def test_a_truncated_or_foreign_file_is_refused(srv, tmp_path, cut):
    good = _archive(srv, tmp_path).read_bytes()
    data = {"truncated": good[:len(good) // 2], "padded with zeros": good[:4096] + bytes(20000),
            "not a tar": b"PK\x03\x04 a zip file, say", "empty": b""}[cut]
    broken = tmp_path / "broken.backup"
    broken.write_bytes(data)
    out = run([IOMTCA, "restore", broken, "--dir", tmp_path / "target"], check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stderr.startswith("iomtca: error: "), out
    assert not (tmp_path / "target").exists()


def test_backup_never_overwrites_and_restore_wants_a_new_directory(srv, tmp_path):
    good = _archive(srv, tmp_path)
    again = run([IOMTCA, "backup", "--dir", srv.ca.home, "--out", good], check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "something").write_text("x")
    out = run([IOMTCA, "restore", good, "--dir", occupied], check=False)
    assert out.returncode == 1 and "not empty" in out.stderr
