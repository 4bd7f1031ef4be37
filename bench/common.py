"""Shared pieces of the benchmarks: a CA to measure, timing, processes on free ports."""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

IOMTCA = str(Path(sys.executable).with_name("iomtca"))


@dataclass
class Figure:
    number: int
    name: str
    ours: float | None
    baseline: float | None
    unit: str
    baseline_name: str
    bar: str
    met: bool | None
    command: str
    notes: str = ""
    # when the bar is missed: where the time goes (from a profile) and what would move it
    miss: str = ""
    runs: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline in (None, 0):
            return None
        return self.ours / self.baseline

    def to_json(self) -> dict:
        data = asdict(self)
        data["ratio"] = None if self.ratio is None else round(self.ratio, 3)
        return data


def median_of(runs: int, measure) -> tuple[float, list[float]]:
    values = [measure() for _ in range(runs)]
    return statistics.median(values), values


async def amedian_of(runs: int, measure) -> tuple[float, list[float]]:
    values = [await measure() for _ in range(runs)]
    return statistics.median(values), values


def make_csr():
    """A device's CSR (EC P-256); key generation is not part of what is measured."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "bench")])).sign(key, hashes.SHA256())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ca(home: Path, **config_extra) -> Path:
    subprocess.run([IOMTCA, "init", "--dir", str(home), "--base-url", config_extra.pop("base_url", "http://127.0.0.1:8080")],
                   check=True, stdout=subprocess.DEVNULL)
    return home


class Service:
    """A long-running command, ready once its first line on stdout contains `ready`; stopped by its pid."""

    ready = ""

    def __init__(self, argv: list[str], log_path: Path, what: str) -> None:
        self.argv, self.log_path, self.what = argv, log_path, what
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = readline(self.proc, 60)
        if self.ready not in line:
            self.__exit__()
            raise RuntimeError(f"{self.what} did not start: {line!r}; see {self.log_path}")
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)
        self.log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid


class Server(Service):
    """`iomtca serve` on free loopback ports (with `workers`, that many worker processes)."""

    ready = "listening"

    def __init__(self, home: Path, http_port: int | None = None, workers: int | None = None) -> None:
        self.home = home
        self.est_port = free_port()
        self.http_port = http_port or free_port()
        argv = [IOMTCA, "serve", "--dir", str(home), "--listen", f"127.0.0.1:{self.est_port}",
                "--http-listen", f"127.0.0.1:{self.http_port}", "--console-listen", "127.0.0.1:0"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        super().__init__(argv, home / "bench-serve.log", "iomtca serve")


class Listener:
    """A server whose output says nothing useful (cfssl, mosquitto) on a free loopback port: ready
    once the port accepts a TCP connection, stopped by its pid."""

    scheme = "http"
    timeout = 15.0

    def __init__(self, argv: list[str], port: int, log_path: Path, what: str) -> None:
        self.argv, self.port, self.log_path, self.what = argv, port, log_path, what
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"{self.what} did not start: {self.log_path.read_text()[-500:]}") from None
                time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        stop(self.proc)
        self.log.close()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


def readline(proc: subprocess.Popen, timeout: float) -> str:
    """The process's next stdout line, or "" after `timeout` seconds."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def env_passphrase(home: Path) -> bytes:
    return os.environ.get("IOMTCA_PASSPHRASE", "").encode() or (home / "private" / "passphrase").read_bytes().strip()
