"""Fixtures for the enrollment server tests: a real `iomtca serve` subprocess per CA directory,
judged by the clients a device vendor would use (curl, openssl, GnuTLS).

Each test module asks `start_server(...)` (module scope) for a server on a CA directory of its
own, made by `iomtca init` and configured by editing config.toml before the server starts. The
server's ports are read from its one "listening" stdout line; its stderr goes to a file that is
attached to the report of any failing test that used it.

Helpers are methods of the objects the fixtures hand out (not importable functions), because
pytest runs with --import-mode=importlib, where a conftest is not an importable module.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.rakit import RACredential, enroll_ra

BIN = Path(sys.executable).parent
IOMTCA = BIN / "iomtca"
READY_RE = re.compile(r"^iomtca serve: listening est=(https://\S+) ocsp=(http://\S+)$")
CONSOLE_RE = re.compile(r"^iomtca serve: console=(https://\S+)$")
READY_TIMEOUT = 30.0
PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)
TRUST_DOMAIN = "iomt.local"
EST = "/.well-known/est"


def env() -> dict[str, str]:
    """Hermetic: the passphrase comes from the CA directory's file, the home from --dir."""
    e = {k: v for k, v in os.environ.items() if k not in ("IOMTCA_PASSPHRASE", "IOMTCA_HOME")}
    e["LC_ALL"] = "C"
    return e


def run(args, *, check: bool = True, timeout: float = 60, input: bytes | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command; stdout/stderr as text. With check, fail the test showing both streams."""
    argv = [str(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, input=input, env=env(), timeout=timeout)
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                    f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


@dataclass
class Reply:
    """One HTTP answer as curl saw it (the last one, after any 100 Continue)."""

    status: int
    headers: dict[str, str]     # lower-case names
    raw_headers: str
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers!r}, {self.body[:300]!r})"


_counter = itertools.count(1)


def curl(url: str, *args, scratch: Path, allow_5xx: tuple[int, ...] = ()) -> Reply:
    """`curl URL args...` with headers and body captured. A 5xx other than `allow_5xx`
    fails the test at once: whatever a client sends, the server must never answer 500."""
    n = next(_counter)
    head, body = scratch / f"curl-{n}.head", scratch / f"curl-{n}.body"
    proc = run(["curl", "-sS", "--max-time", "30", "-D", head, "-o", body, "-w", "%{http_code}", *args, url],
               check=False)
    if proc.returncode != 0:
        pytest.fail(f"curl failed ({proc.returncode}) for {url}: {proc.stderr}")
    raw = head.read_text("latin-1")
    blocks = [b for b in re.split(r"\r?\n\r?\n", raw) if b.strip()]
    last = blocks[-1] if blocks else ""
    headers = {}
    for line in last.splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    reply = Reply(int(proc.stdout.strip() or 0), headers, last, body.read_bytes() if body.exists() else b"")
    if reply.status >= 500 and reply.status not in allow_5xx:
        pytest.fail(f"server answered {reply.status} to {url} {' '.join(map(str, args))}: {reply!r}")
    return reply


def first_cert_pem(data: bytes) -> bytes:
    match = PEM_CERT_RE.search(data)
    assert match is not None, f"no PEM certificate in {data[:200]!r}"
    return match.group(0)


def b64_body(der: bytes, style: str = "oneline") -> bytes:
    """Base64 the way different EST clients send it."""
    text = base64.b64encode(der)
    if style == "oneline":
        return text
    if style == "lf64":
        return b"\n".join(text[i:i + 64] for i in range(0, len(text), 64)) + b"\n"
    if style == "crlf76":
        return b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + b"\r\n"
    raise ValueError(style)


@dataclass(frozen=True)
class DeviceCert:
    """A device certificate the server issued, with the key the device made (files by openssl)."""

    device_id: str
    key: Path          # PEM private key
    cert_path: Path    # PEM certificate (leaf only)
    cert: x509.Certificate

    @property
    def serial_hex(self) -> str:
        return format(self.cert.serial_number, "x")


class CA:
    """A CA directory made by `iomtca init` and a scratch directory; the admin CLI in subprocesses."""

    def __init__(self, home: Path, work: Path) -> None:
        self.home = home
        self.work = work

    root = property(lambda self: self.home / "root.pem")
    chain = property(lambda self: self.home / "chain.pem")
    issuing = property(lambda self: self.home / "issuing.pem")
    ocsp_cert = property(lambda self: self.home / "ocsp.pem")
    ra_cert = property(lambda self: self.ra.cert)
    ra_key = property(lambda self: self.ra.key)

    @property
    def ra(self) -> RACredential:
        """A registered, enrolled gateway's RA credential (made on first use)."""
        if getattr(self, "_ra", None) is None:
            self._ra = enroll_ra(self.home, self.work / f"gateway-{next(_counter)}", self.unique("test-gw"))
        return self._ra

    @property
    def passphrase(self) -> str:
        return (self.home / "private" / "passphrase").read_text().strip()

    @property
    def ra_passphrase(self) -> str:
        """The gateway's own passphrase, which encrypts ra.key (never the CA's)."""
        return self.ra.passphrase

    def unique(self, stem: str) -> str:
        return f"{stem}-{next(_counter)}"

    def iomtca(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return run([IOMTCA, *args, "--dir", self.home], check=check)

    def add_device(self, device_id: str, *, model: str = "infusion-pump", owner: str = "icu",
                   criticality: str = "medium") -> str:
        """Register a device; its one-time token."""
        info = json.loads(self.iomtca("device", "add", device_id, "--model", model, "--owner", owner,
                                      "--criticality", criticality, "--json").stdout)
        assert info["device_id"] == device_id and info["token"]
        return info["token"]

    def device(self, device_id: str) -> dict:
        return json.loads(self.iomtca("device", "show", device_id, "--json").stdout)

    def certificates(self) -> list[dict]:
        return json.loads(self.iomtca("cert", "list", "--json").stdout)

    def cert_count(self) -> int:
        return len(self.certificates())

    @contextlib.contextmanager
    def no_new_certificates(self):
        before = self.cert_count()
        yield
        after = self.cert_count()
        assert after == before, f"a refused request changed the number of certificates: {before} -> {after}"

    def revoke(self, serial_hex: str, reason: str = "keyCompromise") -> None:
        out = self.iomtca("cert", "revoke", serial_hex, "--reason", reason)
        assert out.stdout.startswith(f"revoked {serial_hex} ({reason})"), out.stdout

    def audit_verify(self) -> str:
        out = self.iomtca("audit", "verify")
        assert out.stdout.startswith("audit log intact:"), out.stdout
        return out.stdout

    def audit(self, action: str | None = None, device_id: str | None = None) -> list[dict]:
        """Audit rows read straight from the database (read-only): there is no CLI listing."""
        conn = sqlite3.connect(f"file:{self.home / 'iomtca.db'}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("SELECT id, action, actor, device_id, detail, serial FROM audit_log "
                                "ORDER BY id").fetchall()
        finally:
            conn.close()
        out = [{"id": r[0], "action": r[1], "actor": r[2], "device_id": r[3], "detail": json.loads(r[4]),
                "serial": r[5]} for r in rows]
        return [r for r in out if (action is None or r["action"] == action)
                and (device_id is None or r["device_id"] == device_id)]

    def make_key(self, name: str, key: str = "ec") -> Path:
        path = self.work / f"{self.unique(name)}.key"   # never overwrite a key a test still holds
        spec = {"ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                "rsa1024": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
                "rsa2048": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]}[key]
        run(["openssl", "genpkey", *spec, "-out", path])
        return path

    def make_csr(self, name: str, *, key: Path | None = None, key_type: str = "ec", subject: str | None = None,
                 addext: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """(key, DER CSR) made by `openssl req`, as the device would."""
        key = key or self.make_key(name, key_type)
        csr = self.work / f"{self.unique(name)}.csr.der"
        extra = [a for ext in addext for a in ("-addext", ext)]
        run(["openssl", "req", "-new", "-key", key, "-subj", subject or f"/CN={name}", *extra,
             "-outform", "DER", "-out", csr])
        return key, csr

    def pem_certs_from_pkcs7(self, b64_body: bytes) -> list[bytes]:
        """Decode an EST certs-only body with `openssl pkcs7 -print_certs`; PEM certificates."""
        stem = self.unique("p7")
        der = self.work / f"{stem}.p7.der"
        der.write_bytes(base64.b64decode(b"".join(b64_body.split()), validate=True))
        out = run(["openssl", "pkcs7", "-inform", "DER", "-in", der, "-print_certs"]).stdout.encode()
        return PEM_CERT_RE.findall(out)

    def write(self, name: str, data: bytes) -> Path:
        path = self.work / self.unique(name)
        path.write_bytes(data)
        return path

    def openssl_verify(self, cert_path: Path, *extra) -> None:
        out = run(["openssl", "verify", *extra, "-CAfile", self.chain, cert_path], check=False)
        assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out.stdout + out.stderr

    def pubkey_of_cert(self, cert_path: Path) -> str:
        return run(["openssl", "x509", "-in", cert_path, "-noout", "-pubkey"]).stdout

    def pubkey_of_key(self, key_path: Path, *inform) -> str:
        return run(["openssl", "pkey", *inform, "-in", key_path, "-pubout"]).stdout

    def configure(self, *, ca_tables: str = "", approval_criticality: list[str] | None = None,
                  enroll: str = "") -> None:
        """Edit config.toml before the server starts: extra [ca.*] tables go before [storage]."""
        text = self.home.joinpath("config.toml").read_text()
        if approval_criticality is not None:
            values = ", ".join(f'"{c}"' for c in approval_criticality)
            text, n = re.subn(r"^criticality = \[\].*$", f"criticality = [{values}]", text, flags=re.M)
            assert n == 1, "config.toml lacks the [ca.approval] criticality line"
        if ca_tables:
            assert "\n[storage]" in text
            text = text.replace("\n[storage]", "\n" + ca_tables.strip() + "\n\n[storage]", 1)
        if enroll:
            text += "\n[enroll]\n" + enroll.strip() + "\n"
        self.home.joinpath("config.toml").write_text(text)


class Server:
    """`iomtca serve` on ports the OS picks; stopped with SIGTERM."""

    def __init__(self, ca: CA) -> None:
        self.ca = ca
        self.log = ca.work / "serve.stderr"
        self.proc: subprocess.Popen | None = None
        self.est = self.http = self.console = ""
        self.allowed_500s = 0   # 500s a test asked to see (xfail tests of known bugs)

    def start(self) -> "Server":
        argv = [str(IOMTCA), "serve", "--dir", str(self.ca.home), "--listen", "127.0.0.1:0",
                "--http-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0"]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                         env=env())
        line, console = self._ready_lines()
        match, console_match = READY_RE.match(line), CONSOLE_RE.match(console)
        if match is None or console_match is None:
            self.stop()
            pytest.fail(f"unexpected stdout lines from iomtca serve: {line!r}, {console!r}\n{self.log_tail()}")
        self.est, self.http = match.group(1), match.group(2)
        self.console = console_match.group(1)
        return self

    def _ready_lines(self) -> tuple[str, str]:
        """The listening line and the console line that follows it."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        while buf.count(b"\n") < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                pytest.fail(f"iomtca serve did not report listening within {READY_TIMEOUT} s\n{self.log_tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.stop()
                    pytest.fail(f"iomtca serve exited before listening (rc={self.proc.returncode})\n"
                                f"{self.log_tail()}")
                buf += chunk
        first, second = buf.split(b"\n")[:2]
        return first.decode("utf-8", "replace"), second.decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "--- iomtca serve stderr (tail)\n" + "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP through curl --------------------------------------------------

    def curl(self, url: str, *args, allow_5xx: tuple[int, ...] = ()) -> Reply:
        reply = curl(url, *args, scratch=self.ca.work, allow_5xx=allow_5xx)
        if reply.status == 500:
            self.allowed_500s += 1
        return reply

    def unexpected_log_errors(self) -> str | None:
        """Tracebacks in the server log beyond the 500s the tests expected (follower failures...)."""
        log = self.log_text()
        tracebacks = log.count("Traceback (most recent call last)")
        internal = log.count("internal error on ")
        if tracebacks > self.allowed_500s or internal > self.allowed_500s:
            return (f"{tracebacks} traceback(s), {internal} internal error(s) logged, "
                    f"{self.allowed_500s} 500(s) expected by tests")
        return None

    def https(self, path: str, *args, **kw) -> Reply:
        """A request to the HTTPS listener; the server certificate is checked against root.pem."""
        return self.curl(self.est + path, "--cacert", self.ca.root, *args, **kw)

    def plain(self, path: str, *args, **kw) -> Reply:
        return self.curl(self.http + path, *args, **kw)

    def est_post(self, op: str, body: bytes | Path, *, user: tuple[str, str] | None = None,
                 cert: DeviceCert | None = None, label: str | None = None,
                 content_type: str | None = "application/pkcs10", headers: tuple[str, ...] = (),
                 allow_5xx: tuple[int, ...] = (), source: str | None = None) -> Reply:
        """POST an EST operation the way RFC 7030 appendix A does it with curl (from the loopback
        address `source`, e.g. 127.0.0.2, when given: another client as the server sees it)."""
        path = f"{EST}/{label}/{op}" if label else f"{EST}/{op}"
        if isinstance(body, bytes):
            body = self.ca.write("body", body)
        args = ["--data-binary", f"@{body}"]
        if content_type is not None:
            args += ["-H", f"Content-Type: {content_type}"]
        for h in headers:
            args += ["-H", h]
        if user:
            args += ["-u", f"{user[0]}:{user[1]}"]
        if cert:
            args += ["--cert", cert.cert_path, "--key", cert.key]
        if source:
            args += ["--interface", source]
        return self.https(path, *args, allow_5xx=allow_5xx)

    def enroll(self, device_id: str, token: str, *, key: Path | None = None, label: str | None = None,
               style: str = "oneline") -> DeviceCert:
        """simpleenroll with an openssl-made CSR; the issued certificate (decoded by openssl)."""
        key, csr = self.ca.make_csr(device_id, key=key)
        reply = self.est_post("simpleenroll", b64_body(csr.read_bytes(), style), user=(device_id, token),
                              label=label)
        assert reply.status == 200, reply
        return self.device_cert(device_id, key, reply)

    def reenroll(self, current: DeviceCert, *, new_key: bool = False) -> DeviceCert:
        key = self.ca.make_key(current.device_id) if new_key else current.key
        _, csr = self.ca.make_csr(current.device_id, key=key)
        reply = self.est_post("simplereenroll", b64_body(csr.read_bytes()), cert=current)
        assert reply.status == 200, reply
        return self.device_cert(current.device_id, key, reply)

    def device_cert(self, device_id: str, key: Path, reply: Reply) -> DeviceCert:
        assert reply.header("content-type") == "application/pkcs7-mime; smime-type=certs-only", reply
        pems = self.ca.pem_certs_from_pkcs7(reply.body)
        assert len(pems) == 1, pems
        path = self.ca.write(f"{device_id}.pem", pems[0])
        return DeviceCert(device_id, key, path, x509.load_pem_x509_certificate(pems[0]))


@pytest.fixture(scope="session")
def tools():
    """Tools of the conftest for the test modules: run, b64_body, first_cert_pem."""
    class Tools:
        pass
    t = Tools()
    t.run, t.b64_body, t.first_cert_pem, t.EST = run, b64_body, first_cert_pem, EST
    t.TRUST_DOMAIN = TRUST_DOMAIN
    return t


@pytest.fixture(scope="session")
def _judges():
    missing = [tool for tool in ("openssl", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"judges not installed: {', '.join(missing)} (Debian packages openssl, curl)")


@pytest.fixture(scope="module")
def start_server(tmp_path_factory, _judges):
    """`start_server(name, ca_tables=..., approval_criticality=..., enroll=...)`: a fresh CA
    directory (iomtca init), configured, with `iomtca serve` running on it for this module."""
    servers: list[Server] = []

    def start(name: str = "ca", **config) -> Server:
        base = tmp_path_factory.mktemp(name)
        home, work = base / "ca", base / "work"
        work.mkdir()
        run([IOMTCA, "init", "--dir", home])
        ca = CA(home, work)
        if config:
            ca.configure(**config)
        server = Server(ca)
        servers.append(server)
        return server.start()

    yield start
    problems = []
    for server in servers:
        rc = server.stop()
        problem = server.unexpected_log_errors()
        if problem:
            problems.append(f"{server.ca.home}: {problem}\n{server.log_tail(200)}")
        elif rc not in (0, None):
            problems.append(f"{server.ca.home}: iomtca serve exited with {rc} on SIGTERM\n{server.log_tail()}")
    if problems:
        pytest.fail("\n\n".join(problems))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a server gets the server's stderr in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seen = set()
        for value in getattr(item, "funcargs", {}).values():
            server = value if isinstance(value, Server) else getattr(value, "server", None)
            if isinstance(server, Server) and id(server) not in seen:
                seen.add(id(server))
                report.sections.append((f"iomtca serve stderr ({server.ca.home})", server.log_tail(120)))
