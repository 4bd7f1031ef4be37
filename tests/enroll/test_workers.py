"""`iomtca serve --workers N`: several processes on the same listening sockets.

Real subprocesses: one server with `[enroll] workers = 2` for the module (concurrent enrollments
from several clients, both workers serving, every certificate in the database), and servers of
their own (`--workers 2` on the command line) for stopping and for a worker that dies.
"""
from __future__ import annotations

import base64
import csv
import os
import re
import signal
import ssl
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from tests.procs import Proc, run, wait_until

IOMTCA = Path(sys.executable).parent / "iomtca"
READY_RE = re.compile(r"^iomtca serve: listening est=(https://\S+) ocsp=(http://\S+)$")
EST = "/.well-known/est"


def worker_pids(parent: int) -> list[int]:
    """Children of `parent` that are enrollment-server workers, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"enroll.server" in cmdline and b"--worker" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def register(home: Path, work: Path, count: int, prefix: str) -> list[tuple[str, str]]:
    assets = work / f"{prefix}.csv"
    assets.write_text("device_id,model,owner\n" + "".join(f"{prefix}-{i:03d},pump,icu\n" for i in range(count)))
    tokens = work / f"{prefix}-tokens.csv"
    run([IOMTCA, "device", "import", assets, "--tokens-out", tokens, "--dir", home])
    return [(row["device_id"], row["token"]) for row in csv.DictReader(tokens.open())]


def enroll(est: str, root: Path, device: str, token: str) -> tuple[int, x509.Certificate | None]:
    """One simpleenroll on a new connection (urllib opens one per request)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device)])).sign(key, hashes.SHA256())
    req = urllib.request.Request(
        est + f"{EST}/simpleenroll", method="POST",
        data=base64.b64encode(csr.public_bytes(serialization.Encoding.DER)),
        headers={"Content-Type": "application/pkcs10",
                 "Authorization": "Basic " + base64.b64encode(f"{device}:{token}".encode()).decode()})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(root)), timeout=30) as r:
            return r.status, pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.read()))[0]
    except urllib.error.HTTPError as exc:
        return exc.code, None


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("workers", enroll="workers = 2")


def test_two_workers_share_the_listener_and_every_certificate_is_stored(server):
    ca = server.ca
    pids = worker_pids(server.proc.pid)
    assert len(pids) == 2, f"expected 2 worker processes under {server.proc.pid}, found {pids}"
    devices = register(ca.home, ca.work, 48, "multi")
    served_by: set[str] = set()
    issued: dict[str, x509.Certificate] = {}
    # rounds of 16 concurrent clients until both workers have issued (each round new devices)
    for round_ in range(3):
        batch = devices[16 * round_:16 * (round_ + 1)]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda d: enroll(server.est, ca.root, *d), batch))
        assert [status for status, _ in answers] == [200] * len(batch), answers
        issued.update({d: cert for (d, _), (_, cert) in zip(batch, answers)})
        log = server.log_text()
        served_by = {m.group(1) for d, _ in batch
                     for m in re.finditer(rf"worker-(\d+) ca\.authority certificate_issued device={d} ", log)}
        if served_by == {"0", "1"}:
            break
    assert served_by == {"0", "1"}, f"issued only by worker(s) {served_by}:\n{server.log_tail()}"
    # every answer is a distinct certificate on file, for the device that asked
    on_file = {c["serial"]: c for c in ca.certificates()}
    for device, cert in issued.items():
        record = on_file.get(format(cert.serial_number, "x"))
        assert record is not None and record["device_id"] == device, (device, record)
    assert len({c.serial_number for c in issued.values()}) == len(issued)
    assert "database is locked" not in server.log_text()
    ca.audit_verify()
    # the ready line came once, from the supervisor, after both workers were listening
    assert worker_pids(server.proc.pid) == pids


def start(home: Path, work: Path, name: str) -> tuple[Proc, list[int]]:
    proc = Proc(name, [IOMTCA, "serve", "--dir", home, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                       "--console-listen", "127.0.0.1:0", "--workers", "2"], work)
    proc.start(READY_RE, timeout=30)
    pids = worker_pids(proc.pid)
    assert len(pids) == 2, pids
    return proc, pids


@pytest.fixture
def own_ca(tmp_path):
    home = tmp_path / "ca"
    run([IOMTCA, "init", "--dir", home])
    return home, tmp_path


def test_sigterm_stops_every_worker(own_ca):
    home, work = own_ca
    proc, pids = start(home, work, "serve-stop")
    try:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr_tail()
        for pid in pids:
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), 5, what=f"worker {pid} to be gone")
        # the supervisor's two lines, once (not once per worker): listening, then the console
        assert len(proc.stdout_text) == 2 and READY_RE.match(proc.stdout_text[0]), proc.stdout_text
        assert proc.stdout_text[1].startswith("iomtca serve: console=https://127.0.0.1:"), proc.stdout_text
        assert "Traceback" not in proc.stderr_text(), proc.stderr_tail()
    finally:
        proc.stop()


def test_a_worker_that_dies_stops_the_server_with_an_error(own_ca):
    home, work = own_ca
    proc, pids = start(home, work, "serve-die")
    try:
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(20) == 1, proc.stderr_tail()
        assert f"worker 1 (pid {pids[1]}) exited with status -9" in proc.stderr_text()
        wait_until(lambda: not Path(f"/proc/{pids[0]}").exists(), 5, what="the other worker to be gone")
    finally:
        proc.stop()
