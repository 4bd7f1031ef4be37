"""Process and device helpers for the gateway tests: the real broker, server and gateway as
subprocesses, and devices driven with the tools a device vendor would use (openssl,
mosquitto_pub, mosquitto_sub).

Every wait is bounded; every process is stopped by its own pid (never by name). Each
process writes its stderr to a file; the conftest prints those files when a test fails.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp

from tests.procs import PROCESSES, Proc, env, free_port, run, wait_until  # noqa: F401 (re-exported)

BIN = Path(sys.executable).parent
IOMTCA = str(BIN / "iomtca")
ROOT = "iomt/v1"
# Everything started by these helpers, for the failure report and the final clean-up.
SUBSCRIBERS: list["Sub"] = []


def wait_listening(proc: Proc, ports: list[int], timeout: float = 10) -> None:
    """Until `proc` accepts TCP connections on every one of `ports` on 127.0.0.1 (bounded)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                pass
            if not proc.alive:
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.stderr_tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{proc.name} not accepting on {port} within {timeout}s")
            time.sleep(0.02)


class Broker:
    """mosquitto on a free port, with persistence, restartable on the same port."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        persist = work / "persist"
        persist.mkdir(exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence true",
                 f"persistence_location {persist}/", "set_tcp_nodelay true", "max_queued_messages 10000",
                 "log_dest stderr", "log_type all", "connection_messages true"]
        if os.geteuid() == 0:
            # run as root mosquitto drops to user "mosquitto", which cannot write the persistence file here
            lines.append("user root")
        self.conf = work / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = Proc("mosquitto", ["mosquitto", "-c", self.conf], work)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> None:
        self.proc.start()
        wait_listening(self.proc, [self.port], timeout)

    def stop(self) -> None:
        self.proc.stop(grace=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.proc.stderr_text()


class SecureBroker(Broker):
    """Broker as a hospital runs it (docs/GATEWAY.md "An authenticated broker"): TLS only, no
    anonymous client, a password file and an ACL. Accounts: the gateway's (the whole contract),
    the test tools' (`tester`, acting for any device, registered in CLIENT_OPTIONS for this port),
    and the device pattern (user name = device id: its own subtree, the PKI publications read-only)."""

    GATEWAY_USER, TESTER = "iomtca-gateway", "tester"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        from tests.gateway.tlskit import broker_tls
        self.tls = broker_tls(work / "tls")
        self.gateway_password, tester_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        passwd = work / "passwd"
        passwd.write_text(f"{self.GATEWAY_USER}:{self.gateway_password}\n{self.TESTER}:{tester_password}\n")
        passwd.chmod(0o600)
        run(["mosquitto_passwd", "-U", passwd])          # plain -> hashed, in place
        acl = work / "acl"
        acl.write_text(f"user {self.GATEWAY_USER}\ntopic readwrite {ROOT}/#\n\n"
                       f"user {self.TESTER}\ntopic readwrite {ROOT}/#\n\n"
                       f"pattern readwrite {ROOT}/dev/%u/#\npattern read {ROOT}/pki/#\n")
        self.password_file = work / "gateway-broker-password"
        self.password_file.write_text(self.gateway_password + "\n")
        self.password_file.chmod(0o600)
        text = self.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
        text = text.replace(f"listener {self.port} 127.0.0.1\n", "")
        text += (f"password_file {passwd}\nacl_file {acl}\n"
                 f"listener {self.port} 127.0.0.1\ncertfile {self.tls.server_cert}\nkeyfile {self.tls.server_key}\n"
                 "tls_version tlsv1.2\n")
        self.conf.write_text(text)
        CLIENT_OPTIONS[self.port] = ["--cafile", str(self.tls.ca), "-u", self.TESTER, "-P", tester_password]

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def gateway_args(self) -> list:
        """`gateway run` flags for this broker: its CA, the gateway's user, the 0600 password file."""
        return ["--broker-ca", self.tls.ca, "--broker-username", self.GATEWAY_USER,
                "--broker-password-file", self.password_file]


SERVE_READY = re.compile(r"iomtca serve: listening est=(https://127\.0\.0\.1:(\d+)) ocsp=(http://\S+)")
GATEWAY_READY = re.compile(r"iomtca gateway: connected broker=\S+ ca=\S+ client_id=(\S+)")


class CAServer:
    def __init__(self, home: Path, logs: Path) -> None:
        self.home = home
        self.proc = Proc("serve", [IOMTCA, "serve", "--dir", home, "--listen", "127.0.0.1:0",
                                   "--http-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0"], logs)
        self.est_url = ""
        self.est_port = 0
        self.http_url = ""   # the OCSP/CRL listener

    def start(self, port: int | None = None) -> None:
        port = port if port is not None else 0
        self.proc.argv[self.proc.argv.index("--listen") + 1] = f"127.0.0.1:{port}"
        match = self.proc.start(SERVE_READY, timeout=30)
        self.est_url, self.est_port = match.group(1), int(match.group(2))
        self.http_url = match.group(3).rstrip("/")

    def restart_same_port(self) -> None:
        self.start(self.est_port)

    def stop(self, grace: float = 2) -> float:
        return self.proc.stop(grace=grace)


class Gateway:
    """A gateway set up as an operator would: `iomtca gateway add NAME` on the CA, `iomtca gateway
    init` into its own directory (GWDIR, beside the CA directory) with the token on stdin, then
    `iomtca gateway run --dir GWDIR`. The gateway's name is its client id. `enroll_url` is the CA
    the gateway enrolls with when `ca_url` (what it runs against) is a stand-in; `[gateway]`
    settings given to `configure()` go into its gateway.toml."""

    def __init__(self, home: Path, broker: Broker, ca_url: str, client_id: str, logs: Path, *,
                 publish_pki: bool = True, enroll_url: str | None = None, extra_args=()) -> None:
        self.client_id = client_id
        self.home = home.parent / f"gateway-{client_id}"
        if not (self.home / "gateway.toml").exists():
            setup_gateway(home, self.home, client_id, enroll_url or ca_url)
        argv = [IOMTCA, "gateway", "run", "--dir", self.home, "--broker", broker.url, "--ca", ca_url,
                "--client-id", client_id, *extra_args]
        if not publish_pki:
            argv.append("--no-publish-pki")
        self.proc = Proc(f"gateway-{client_id}", argv, logs)

    def start(self) -> None:
        match = self.proc.start(GATEWAY_READY, timeout=30)
        assert match.group(1) == self.client_id

    def stop(self) -> float:
        return self.proc.stop(grace=5)

    def kill(self) -> None:
        self.proc.kill()


def setup_gateway(ca_home: Path, gwdir: Path, name: str, ca_url: str) -> dict:
    """`gateway add` at the CA and `gateway init` on the "gateway host" (the token on stdin);
    returns what `gateway add --json` printed."""
    added = json.loads(iomtca(ca_home, "gateway", "add", name, "--json").stdout)
    run([IOMTCA, "gateway", "init", "--dir", gwdir, "--ca", ca_url, "--root", ca_home / "root.pem",
         "--name", name, "--token", "-"], input=(added["token"] + "\n").encode(), timeout=60)
    settings = gateway_settings(ca_home)
    if settings:
        with open(gwdir / "gateway.toml", "a") as fh:   # [gateway] is the file's last table
            fh.write(settings.strip() + "\n")
    return added


def gateway_settings(ca_home: Path) -> str:
    path = ca_home.parent / "gateway-settings.toml"
    return path.read_text() if path.exists() else ""


# -- CA directory ----------------------------------------------------------------------
def init_ca(home: Path) -> None:
    run([IOMTCA, "init", "--dir", home], timeout=60)


def configure(home: Path, *, ca_tables: str = "", gateway: str = "") -> None:
    """Put `[ca.*]` tables before the [storage] line (so they belong to [ca]); keep `[gateway]`
    settings beside the CA directory for the gateways `Gateway` sets up (in their gateway.toml)."""
    path = home / "config.toml"
    text = path.read_text()
    if ca_tables:
        assert "\n[storage]" in text
        text = text.replace("\n[storage]", "\n" + ca_tables.strip() + "\n\n[storage]", 1)
    path.write_text(text)
    if gateway:
        (home.parent / "gateway-settings.toml").write_text(gateway.strip() + "\n")


def iomtca(home: Path, *args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return run([IOMTCA, *args, "--dir", home], check=check, timeout=timeout)


def register(home: Path, devices: list[tuple], work: Path) -> dict[str, str]:
    """Register (device_id, model[, firmware[, criticality]]) rows with `iomtca device import`;
    returns device id -> one-time token."""
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"devices-{time.monotonic_ns()}.csv"
    tokens_path = csv_path.with_suffix(".tokens.csv")
    rows = ["device_id,model,owner,firmware,criticality"]
    for dev in devices:
        device_id, model, firmware, criticality = (list(dev) + ["", "", ""])[:4]
        rows.append(f"{device_id},{model},icu,{firmware},{criticality or 'medium'}")
    csv_path.write_text("\n".join(rows) + "\n")
    iomtca(home, "device", "import", csv_path, "--tokens-out", tokens_path)
    tokens = {}
    for line in tokens_path.read_text().splitlines()[1:]:
        device_id, token, _ = line.split(",")
        tokens[device_id] = token
    return tokens


def device_show(home: Path, device_id: str) -> dict:
    return json.loads(iomtca(home, "device", "show", device_id, "--json").stdout)


def certificates(home: Path, device_id: str | None = None) -> list[dict]:
    args = ["cert", "list", "--json"]
    if device_id:
        args += ["--device", device_id]
    return json.loads(iomtca(home, *args).stdout)


def device_certs(home: Path, prefix: str) -> dict[str, list[dict]]:
    by_device: dict[str, list[dict]] = {}
    for row in certificates(home):
        if row["device_id"] and row["device_id"].startswith(prefix):
            by_device.setdefault(row["device_id"], []).append(row)
    return by_device


# -- MQTT with the mosquitto clients -----------------------------------------------------
# Extra mosquitto_pub/sub options for a broker port: a SecureBroker registers its CA file and the
# test tools' login here, so every helper below talks TLS with a password to it.
CLIENT_OPTIONS: dict[int, list[str]] = {}


def connect_args(port: int) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(port), *CLIENT_OPTIONS.get(int(port), [])]


def pub(port: int, topic: str, message: str | bytes | None = None, *, file: Path | None = None,
        retain: bool = False, qos: int = 1) -> None:
    argv = ["mosquitto_pub", *connect_args(port), "-q", qos, "-t", topic]
    if retain:
        argv.append("-r")
    if file is not None:
        argv += ["-f", file]
    elif isinstance(message, bytes):
        argv += ["-s"]
    else:
        argv += ["-m", message]
    run(argv, timeout=15, input=message if isinstance(message, bytes) else None)


def pub_json(port: int, topic: str, body: dict) -> None:
    pub(port, topic, json.dumps(body))


def retained(port: int, topic: str, wait_s: int = 2) -> bytes | None:
    """One retained read (raw bytes), None if the topic holds nothing."""
    proc = run(["mosquitto_sub", *connect_args(port), "-q", "1", "-t", topic, "-C", "1",
                "-W", wait_s, "-N", "--retained-only"], check=False, timeout=wait_s + 10)
    return proc.stdout if proc.returncode == 0 and proc.stdout else None


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: str
    at: float

    def json(self) -> dict:
        return json.loads(self.payload)


class Sub:
    """mosquitto_sub in the background (-d -v); ready once the broker acknowledged SUBSCRIBE.

    JSON payloads only (one line each): lines starting with the topic root are messages.
    """

    def __init__(self, port: int | None, *topics: str, count: int | None = None, wait_s: int = 60,
                 client_id: str | None = None, persistent: bool = False, conn: list[str] | None = None) -> None:
        # stdbuf: -d lines go through stdio, fully buffered on a pipe; the SUBACK line must arrive now
        # conn: connection options of its own (a device's login) instead of the port's
        conn = conn if conn is not None else connect_args(port)
        argv = ["stdbuf", "-oL", "mosquitto_sub", "-d", "-v", *conn, "-q", "1", "-W", str(wait_s)]
        for topic in topics:
            argv += ["-t", topic]
        if count is not None:
            argv += ["-C", str(count)]
        if client_id:
            argv += ["-i", client_id]
        if persistent:
            argv.append("-c")
        self.argv = argv
        self.messages: list[Msg] = []
        self._new = threading.Condition()
        self._ready = threading.Event()
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env(),
                                      start_new_session=True)
        SUBSCRIBERS.append(self)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(10):
            self.close()
            raise AssertionError(f"mosquitto_sub did not get its SUBACK within 10s: {' '.join(argv)}")

    def _pump(self) -> None:
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("Subscribed (mid"):
                self._ready.set()
            elif line.startswith(ROOT + "/") and " " in line:
                topic, payload = line.split(" ", 1)
                with self._new:
                    self.messages.append(Msg(topic, payload, time.monotonic()))
                    self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for(self, predicate, timeout: float, what: str = "a message") -> Msg:
        """The first message (already received or still to come) for which predicate(msg) holds."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for msg in self.messages:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"  {m.topic} {m.payload[:160]}" for m in self.messages[-20:])
                    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; "
                                         f"received so far:\n{seen or '  (nothing)'}")
                self._new.wait(min(left, 0.2))

    def wait_count(self, predicate, n: int, timeout: float, what: str = "messages") -> list[Msg]:
        """Wait until at least n received messages satisfy predicate; return them."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= n:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {n} x {what}; got {len(found)}")
                self._new.wait(min(left, 0.2))

    def answer(self, req_id: str, timeout: float = 15, *, final: bool = True, topic: str | None = None) -> dict:
        """The answer with this id (the final one, i.e. not `queued`, unless final=False)."""
        def match(m: Msg) -> bool:
            if topic is not None and m.topic != topic:
                return False
            try:
                body = m.json()
            except ValueError:
                return False
            return body.get("id") == req_id and (not final or body.get("status") != "queued")
        return self.wait_for(match, timeout, f"answer to {req_id!r}").json()

    def quiet_for(self, seconds: float, predicate=lambda m: True) -> list[Msg]:
        """Wait `seconds` and return the matching messages that arrived meanwhile."""
        start = len(self.messages)
        time.sleep(seconds)
        with self._new:
            return [m for m in self.messages[start:] if predicate(m)]

    def with_id(self, req_id: str) -> list[dict]:
        return self.bodies(lambda m: m.json().get("id") == req_id)

    def bodies(self, predicate=lambda m: True) -> list[dict]:
        with self._new:
            return [m.json() for m in self.messages if predicate(m)]

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def __enter__(self) -> "Sub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resp(device_id: str, op: str = "#") -> str:
    return f"{ROOT}/dev/{device_id}/resp/{op}"


def req(device_id: str, op: str) -> str:
    return f"{ROOT}/dev/{device_id}/req/{op}"


# -- a device made of openssl and mosquitto clients ----------------------------------------
class Device:
    def __init__(self, device_id: str, port: int, work: Path, token: str | None = None) -> None:
        self.id = device_id
        self.port = port
        self.dir = work / "devices" / device_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.key: Path | None = None        # the key of the current certificate
        self.cert: Path | None = None       # the current certificate (PEM)
        self._n = 0

    # files made with openssl
    def new_key_and_csr(self) -> tuple[Path, Path]:
        self._n += 1
        key, csr = self.dir / f"key{self._n}.pem", self.dir / f"csr{self._n}.der"
        run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-subj", f"/CN={self.id}", "-outform", "DER", "-out", csr])
        return key, csr

    def cms(self, csr: Path, signer_cert: Path | None = None, signer_key: Path | None = None) -> Path:
        """`openssl cms -sign` over any content (a CSR, a posture JSON): attached, with signingTime."""
        out = csr.with_suffix(".cms")
        run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-in", csr, "-signer", signer_cert or self.cert,
             "-inkey", signer_key or self.key, "-outform", "DER", "-out", out])
        return out

    # requests
    def enroll_request(self, req_id: str, csr: Path, token: str | None = None) -> dict:
        return {"id": req_id, "csr": b64(csr.read_bytes()), "token": token or self.token}

    def reenroll_request(self, req_id: str, cms: Path) -> dict:
        return {"id": req_id, "cms": b64(cms.read_bytes())}

    def posture_request(self, req_id: str, posture: dict, signer_cert: Path | None = None,
                        signer_key: Path | None = None) -> dict:
        """A signed `req/posture`, as a vendor makes it: posture.json -> openssl cms -sign -> base64."""
        self._n += 1
        path = self.dir / f"posture{self._n}.json"
        path.write_text(json.dumps(posture))
        return {"id": req_id, "cms": b64(self.cms(path, signer_cert, signer_key).read_bytes())}

    def send(self, op: str, body: dict | str | bytes) -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        pub(self.port, req(self.id, op), body)

    def subscribe(self, **kw) -> Sub:
        return Sub(self.port, resp(self.id), **kw)

    def enroll(self, req_id: str, timeout: float = 15) -> dict:
        """simpleenroll with the token; on ok the new certificate and key become current."""
        key, csr = self.new_key_and_csr()
        with self.subscribe() as sub:
            self.send("simpleenroll", self.enroll_request(req_id, csr))
            answer = sub.answer(req_id, timeout)
        if answer["status"] == "ok":
            self.adopt(answer, key)
        return answer

    def reenroll(self, req_id: str, timeout: float = 15) -> dict:
        key, csr = self.new_key_and_csr()
        cms = self.cms(csr)
        with self.subscribe() as sub:
            self.send("simplereenroll", self.reenroll_request(req_id, cms))
            answer = sub.answer(req_id, timeout)
        if answer["status"] == "ok":
            self.adopt(answer, key)
        return answer

    def prove_posture(self, req_id: str, posture: dict, timeout: float = 15, **signer) -> dict:
        """Publish a signed posture and return its answer on resp/posture."""
        with Sub(self.port, resp(self.id, "posture")) as sub:
            self.send("posture", self.posture_request(req_id, posture, **signer))
            return sub.answer(req_id, timeout)

    def report_posture(self, posture: dict) -> None:
        """The plain (unsigned) posture message anyone on the broker can publish."""
        pub(self.port, f"{ROOT}/dev/{self.id}/posture", json.dumps(posture))

    def report_presence(self, state: str = "online") -> None:
        pub(self.port, f"{ROOT}/dev/{self.id}/presence", state, retain=True)

    def adopt(self, answer: dict, key: Path) -> Path:
        self._n += 1
        cert = self.dir / f"cert{self._n}.pem"
        cert.write_bytes(der_to_pem(base64.b64decode(answer["cert"])))
        self.cert, self.key = cert, key
        return cert

    def write_cert(self, answer: dict, name: str) -> Path:
        path = self.dir / name
        path.write_bytes(der_to_pem(base64.b64decode(answer["cert"])))
        return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def der_to_pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)


def cert_serial(answer: dict) -> str:
    return format(x509.load_der_x509_certificate(base64.b64decode(answer["cert"])).serial_number, "x")


# -- judges ------------------------------------------------------------------------------
def openssl_verify(home: Path, cert: Path) -> str:
    proc = run(["openssl", "verify", "-CAfile", home / "chain.pem", cert], check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0 and out.strip().endswith("OK"), f"openssl verify rejected {cert}:\n{out}"
    return out


def ocsp_status(der: bytes) -> str:
    """good / revoked / unknown, read with cryptography (fast, for polling loops)."""
    resp = x509_ocsp.load_der_ocsp_response(der)
    return resp.certificate_status.name.lower()


def openssl_ocsp(home: Path, der: bytes, cert: Path, work: Path) -> str:
    """Verify a retained OCSP response with openssl and return its text (status line included)."""
    path = work / f"ocsp-{time.monotonic_ns()}.der"
    path.write_bytes(der)
    proc = run(["openssl", "ocsp", "-respin", path, "-VAfile", home / "ocsp.pem", "-CAfile", home / "chain.pem",
                "-issuer", home / "issuing.pem", "-cert", cert, "-no_nonce"], check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0 and "Response verify OK" in out, f"openssl ocsp rejected the response:\n{out}"
    return out


def http_ocsp(home: Path, url: str, cert: Path, work: Path) -> str:
    """Ask the HTTP responder with `openssl ocsp -url` and verify its answer; the text it prints."""
    proc = run(["openssl", "ocsp", "-url", url, "-issuer", home / "issuing.pem", "-cert", cert,
                "-VAfile", home / "ocsp.pem", "-CAfile", home / "chain.pem", "-no_nonce"], check=False, timeout=20)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0 and "Response verify OK" in out, f"openssl ocsp rejected the response:\n{out}"
    return out


def crl_reasons(der: bytes, work: Path) -> dict[str, str]:
    """Serial (lowercase hex, no leading zeros) -> reason text ('' if none), as `openssl crl -text` shows."""
    path = work / f"crl-{time.monotonic_ns()}.der"
    path.write_bytes(der)
    text = run(["openssl", "crl", "-inform", "DER", "-in", path, "-noout", "-text"]).stdout.decode()
    entries: dict[str, str] = {}
    if "Revoked Certificates:" not in text:
        return entries
    body = text.split("Revoked Certificates:", 1)[1].split("Signature Algorithm:", 1)[0]
    for block in body.split("Serial Number:")[1:]:
        lines = [line.strip() for line in block.strip().splitlines()]
        reason = lines[lines.index("X509v3 CRL Reason Code:") + 1] if "X509v3 CRL Reason Code:" in lines else ""
        entries[lines[0].lower().lstrip("0")] = reason
    return entries


def crl_serials(der: bytes, work: Path) -> set[str]:
    """Serials listed in a DER CRL, read by `openssl crl -text` (lowercase hex, no leading zeros)."""
    path = work / f"crl-{time.monotonic_ns()}.der"
    path.write_bytes(der)
    text = run(["openssl", "crl", "-inform", "DER", "-in", path, "-noout", "-text"]).stdout.decode()
    return {m.lower().lstrip("0") for m in re.findall(r"Serial Number:\s*([0-9A-Fa-f]+)", text)}
