"""Fixtures for the interop tests: real CA directories made by `iomtca init`.

What the CA emits (certificates, CRLs, OCSP responses) is judged by independent
implementations: the openssl and GnuTLS command line tools and pkilint. The CA
side is driven the way an operator drives it, through the `iomtca` CLI: `init`
and the tests that are about the CLI run the installed executable in a
subprocess; the many other calls run the same `cli.main.main(argv)` in-process
to keep the folder fast. OCSP requests are answered in-process by
`Authority.ocsp`, which is what the HTTP listener calls.

Helpers are handed out as fixtures (not imported) because pytest runs with
--import-mode=importlib, where a conftest is not an importable module.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import Authority

BIN = Path(sys.executable).parent
IOMTCA = BIN / "iomtca"
# Trust domain of the per-key-type CAs; the shared CA keeps the default (iomt.local).
OTHER_TRUST_DOMAIN = "ward-3.hospital.example"
PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)


# Hermetic: the passphrase comes from the CA directory's file, the home from --dir.
UNSET_ENV = ("IOMTCA_PASSPHRASE", "IOMTCA_HOME")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
    env["LC_ALL"] = "C"
    return env


@contextlib.contextmanager
def _without_env(names):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run(args, *, check: bool = True, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command, capture text output; with check, fail the test showing both streams."""
    argv = [str(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", cwd=cwd, env=_env(),
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                    f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


_cli_lock = threading.Lock()


def run_cli_in_process(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    """`iomtca argv` in-process: cli.main.main in a worker thread (it calls asyncio.run, which
    cannot run inside the test's event loop), stdout/stderr captured."""
    from cli.main import main as cli_main

    def call():
        out, err = io.StringIO(), io.StringIO()
        with _cli_lock, _without_env(UNSET_ENV), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main(argv)
            except SystemExit as exc:   # argparse errors
                rc = exc.code if isinstance(exc.code, int) else 2
        return subprocess.CompletedProcess(["iomtca", *argv], rc, out.getvalue(), err.getvalue())

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        proc = pool.submit(call).result(timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"iomtca (in-process) failed ({proc.returncode}): iomtca {' '.join(argv)}\n"
                    f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def first_cert_pem(path: Path) -> bytes:
    """The first certificate of a PEM bundle (server.pem and ra.pem hold cert + issuing CA)."""
    match = PEM_CERT_RE.search(path.read_bytes())
    assert match is not None, f"{path} holds no PEM certificate"
    return match.group(0)


@dataclass(frozen=True)
class DeviceCert:
    device_id: str
    key: Path         # device private key (PEM, unencrypted; made by openssl)
    csr: Path
    bundle: Path      # what `iomtca cert issue --out` wrote: device cert + issuing CA (PEM)
    leaf: Path        # device certificate alone (PEM)
    leaf_der: Path
    cert: x509.Certificate

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


@dataclass(frozen=True)
class CRLFile:
    der: Path
    pem: Path
    crl: x509.CertificateRevocationList


class CA:
    """A CA directory made by `iomtca init`, plus a scratch directory for what tests make."""

    _counter = itertools.count(1)

    def __init__(self, home: Path, work: Path, *, key_type: str, trust_domain: str) -> None:
        self.home = home
        self.work = work
        self.key_type = key_type
        self.trust_domain = trust_domain

    # files written by init
    root = property(lambda self: self.home / "root.pem")
    issuing = property(lambda self: self.home / "issuing.pem")
    chain = property(lambda self: self.home / "chain.pem")
    ocsp_cert = property(lambda self: self.home / "ocsp.pem")
    server = property(lambda self: self.home / "server.pem")

    @property
    def ra(self) -> Path:
        """ra.pem of a registered, enrolled gateway (made on first use)."""
        if getattr(self, "_ra", None) is None:
            from tests.rakit import enroll_ra
            self._ra = enroll_ra(self.home, self.work / "gateway", "interop-gw")
        return self._ra.cert

    @property
    def passphrase(self) -> bytes:
        return (self.home / "private" / "passphrase").read_bytes().strip()

    @property
    def issuing_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.issuing.read_bytes())

    def unique(self, stem: str) -> str:
        return f"{stem}-{next(self._counter)}"

    def iomtca(self, *args, check: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
        """Run an `iomtca` command against this CA.

        With subprocess_ the installed executable runs in a subprocess; otherwise the same
        `cli.main.main(argv)` runs in a worker thread of this process, which saves the
        ~0.15 s interpreter start of every call.
        """
        argv = [str(a) for a in (*args, "--dir", self.home)]
        if subprocess_:
            return run([IOMTCA, *argv], check=check)
        return run_cli_in_process(argv, check=check)

    def add_device(self, device_id: str, *, model: str = "infusion-pump", owner: str = "icu",
                   subprocess_: bool = False) -> dict:
        out = self.iomtca("device", "add", device_id, "--model", model, "--owner", owner, "--json",
                          subprocess_=subprocess_)
        info = json.loads(out.stdout)
        assert info["device_id"] == device_id
        return info

    def make_csr(self, name: str, *, key: str = "ec", subject: str | None = None, der: bool = False
                 ) -> tuple[Path, Path]:
        """A device key and CSR made by `openssl req` (the device side, not our code)."""
        key_path = self.work / f"{name}.key"
        csr_path = self.work / f"{name}.csr"
        newkey = {"ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
                  "rsa": ["-newkey", "rsa:2048"], "ed25519": ["-newkey", "ed25519"]}[key]
        run(["openssl", "req", "-new", *newkey, "-nodes", "-keyout", key_path, "-subj", subject or f"/CN={name}",
             "-outform", "DER" if der else "PEM", "-out", csr_path])
        return key_path, csr_path

    def new_device_cert(self, stem: str = "dev", *, key: str = "ec", der_csr: bool = False,
                        subprocess_: bool = False) -> DeviceCert:
        """Register a fresh device and issue its certificate through `iomtca cert issue`."""
        device_id = self.unique(stem)
        self.add_device(device_id, subprocess_=subprocess_)
        key_path, csr_path = self.make_csr(device_id, key=key, der=der_csr)
        bundle = self.work / f"{device_id}.bundle.pem"
        self.iomtca("cert", "issue", device_id, "--csr", csr_path, "--out", bundle, subprocess_=subprocess_)
        leaf_pem = first_cert_pem(bundle)
        cert = x509.load_pem_x509_certificate(leaf_pem)
        leaf = self.work / f"{device_id}.pem"
        leaf.write_bytes(leaf_pem)
        leaf_der = self.work / f"{device_id}.der"
        leaf_der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        return DeviceCert(device_id, key_path, csr_path, bundle, leaf, leaf_der, cert)

    def revoke(self, dev: DeviceCert, reason: str | None = None, *, subprocess_: bool = False) -> None:
        out = self.iomtca("cert", "revoke", dev.serial_hex, *(["--reason", reason] if reason else []),
                          subprocess_=subprocess_)
        assert out.stdout.startswith(f"revoked {dev.serial_hex} ("), out.stdout

    def hold(self, dev: DeviceCert, *, subprocess_: bool = False) -> None:
        self.iomtca("cert", "hold", dev.serial_hex, subprocess_=subprocess_)

    def release(self, dev: DeviceCert, *, subprocess_: bool = False) -> None:
        self.iomtca("cert", "release", dev.serial_hex, subprocess_=subprocess_)

    def crl(self, *, subprocess_: bool = False) -> CRLFile:
        """`iomtca crl --out` (DER) and its PEM form made by `openssl crl`."""
        stem = self.unique("crl")
        der = self.work / f"{stem}.der"
        pem = self.work / f"{stem}.pem"
        self.iomtca("crl", "--out", der, subprocess_=subprocess_)
        run(["openssl", "crl", "-inform", "DER", "-in", der, "-out", pem])
        return CRLFile(der, pem, x509.load_der_x509_crl(der.read_bytes()))

    async def open(self) -> Authority:
        return await Authority.open(self.home, passphrase=self.passphrase)

    async def ocsp(self, request_der: bytes) -> bytes:
        """Answer an OCSP request the way the HTTP listener does."""
        async with await self.open() as authority:
            return await authority.ocsp(request_der)

    def ocsp_request(self, target: DeviceCert | int, *, nonce: bool = True, extra: tuple = ()) -> Path:
        """An OCSP request made by `openssl ocsp -reqout` for a device cert or a bare serial."""
        out = self.work / f"{self.unique('ocsp-req')}.der"
        what = ["-cert", target.leaf] if isinstance(target, DeviceCert) else ["-serial", hex(target)]
        # `extra` goes first: openssl applies a digest option (-sha256) to the -cert/-serial after it.
        run(["openssl", "ocsp", *extra, "-issuer", self.issuing, *what, *([] if nonce else ["-no_nonce"]),
             "-reqout", out])
        return out

    async def ocsp_roundtrip(self, target: DeviceCert | int, *, nonce: bool = True, extra: tuple = ()
                             ) -> tuple[Path, Path]:
        req = self.ocsp_request(target, nonce=nonce, extra=extra)
        resp = req.with_name(req.name.replace("ocsp-req", "ocsp-resp"))
        resp.write_bytes(await self.ocsp(req.read_bytes()))
        return req, resp


def _init_ca(base: Path, key_type: str, trust_domain: str) -> CA:
    home = base / "ca"
    work = base / "work"
    work.mkdir()
    run([IOMTCA, "init", "--dir", home, "--key-type", key_type, "--trust-domain", trust_domain])
    return CA(home, work, key_type=key_type, trust_domain=trust_domain)


@pytest.fixture(scope="session")
def sh():
    """`sh([...], check=True)`: run a command, capture its text output (see `run`)."""
    return run


@pytest.fixture(scope="session")
def pem_first():
    return first_cert_pem


@pytest.fixture(scope="session")
def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("the openssl command is not installed (Debian package openssl)")
    return path


@pytest.fixture(scope="session")
def ca(tmp_path_factory, openssl) -> CA:
    """The shared CA: default key type (ec-p256) and trust domain (iomt.local)."""
    return _init_ca(tmp_path_factory.mktemp("ca-shared"), "ec-p256", "iomt.local")


@pytest.fixture(scope="session")
def ca_for_key_type(tmp_path_factory, openssl):
    """`ca_for_key_type("rsa-3072")`: a CA of that key type, made once per session."""
    made: dict[str, CA] = {}

    def get(key_type: str) -> CA:
        if key_type not in made:
            made[key_type] = _init_ca(tmp_path_factory.mktemp(f"ca-{key_type}"), key_type, OTHER_TRUST_DOMAIN)
        return made[key_type]

    return get


@pytest.fixture
def fresh_ca(tmp_path, openssl) -> CA:
    """A CA of its own for tests that need a pristine state (an empty CRL)."""
    return _init_ca(tmp_path, "ec-p256", "iomt.local")


@pytest.fixture(scope="session")
def foreign_ca(tmp_path_factory, openssl) -> tuple[Path, Path]:
    """A throwaway CA made by openssl alone: (ca.pem, device.pem) issued by it."""
    d = tmp_path_factory.mktemp("foreign-ca")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", d / "ca.key", "-subj", "/CN=Foreign CA", "-days", "2", "-out", d / "ca.pem",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", d / "dev.key", "-subj", "/CN=foreign-device", "-out", d / "dev.csr"])
    run(["openssl", "x509", "-req", "-in", d / "dev.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
         "-set_serial", "0x1234abcd", "-days", "1", "-out", d / "dev.pem"])
    return d / "ca.pem", d / "dev.pem"
