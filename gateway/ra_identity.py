"""The gateway's RA credential: its key and certificate files, the client TLS context made from
them, and their renewal over the RA API with the current certificate (`POST /ra/v1/renew`).

Paths and the passphrase are explicit; `gateway run` takes them from GWDIR (`gateway/home.py`). Renewal happens at 2/3 of the time from issuance to notAfter (the
rule of `ca/service_certs.py`), and at start when the certificate is valid for longer than
`max_lifetime`, when one is given. Several gateways
sharing the files renew once: the renewal holds an exclusive lock on a file beside the key and
looks again under it; readers take the lock shared. The new key is written before the new
certificate, each atomically; then the RA client switches to a context with the new pair (requests
in flight finish on the old one).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from common.errors import CAError, ConfigError
from common.keyfiles import check_private, file_lock, file_lock_sync, write_atomic, write_private_key
from common.keys import generate_key, hash_for
from common.renewal import longer_than, read_cert, renew_at

if TYPE_CHECKING:
    from .home import GatewayHome
    from .ra_client import RAClient

log = logging.getLogger(__name__)

CHECK_MAX_S = 60.0        # wake at least this often (a file renewed by another gateway is seen)
RETRY_S = (2.0, 5.0, 15.0, 30.0, 60.0)   # after a failed renewal


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def client_context(cert_path: Path, key_path: Path, root_path: Path, passphrase: bytes) -> ssl.SSLContext:
    """TLS 1.2+ to the CA, trusting its root, presenting the RA certificate (key mode 0600)."""
    check_private(key_path)   # the same rule as the CA keys
    ctx = ssl.create_default_context(cafile=str(root_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path, password=passphrase)
    return ctx


class RAIdentity:
    """The RA certificate and key at `cert_path`/`key_path`, encrypted with `passphrase`."""

    def __init__(self, cert_path: Path, key_path: Path, root_path: Path, passphrase: bytes, *,
                 max_lifetime: timedelta | None = None, lock_path: Path | None = None) -> None:
        self.cert_path, self.key_path, self.root_path = Path(cert_path), Path(key_path), Path(root_path)
        self._passphrase = passphrase
        self.max_lifetime = max_lifetime
        self.lock_path = lock_path or self.key_path.with_name(f"{self.key_path.stem}-renewal.lock")
        self.certificate: x509.Certificate | None = None   # the one the client context presents

    @classmethod
    def in_home(cls, home: "GatewayHome", passphrase: bytes, **kw) -> "RAIdentity":
        return cls(home.ra_cert, home.ra_key, home.root_cert, passphrase, **kw)

    # -- loading ------------------------------------------------------------------------------

    def _load(self) -> tuple[x509.Certificate, ssl.SSLContext]:
        cert = read_cert(self.cert_path)
        if cert is None:
            raise ConfigError(f"RA certificate {self.cert_path} is missing or damaged")
        try:
            ctx = client_context(self.cert_path, self.key_path, self.root_path, self._passphrase)
        except FileNotFoundError as exc:
            raise ConfigError(f"RA credential incomplete: {exc}") from exc
        except ssl.SSLError as exc:
            raise ConfigError(f"RA key {self.key_path} does not load with {self.cert_path}: {exc}") from exc
        return cert, ctx

    def client_context(self) -> ssl.SSLContext:
        """Load the pair (under the shared lock: never a new key with an old certificate)."""
        with file_lock_sync(self.lock_path, shared=True):
            cert, ctx = self._load()
        self.certificate = cert
        return ctx

    # -- when ---------------------------------------------------------------------------------

    def renew_at(self) -> datetime:
        return renew_at(self.certificate)

    def due(self, now: datetime, cert: x509.Certificate | None = None, *, at_start: bool = False) -> bool:
        """Past the renewal point; `at_start`, also when longer-lived than `max_lifetime` allows."""
        cert = cert or self.certificate
        return now >= renew_at(cert) or (at_start and longer_than(cert, self.max_lifetime))

    # -- renewal ------------------------------------------------------------------------------

    async def renew(self, ra: "RAClient", *, at_start: bool = False) -> bool:
        """Renew if due (or switch to the pair another gateway renewed); True when `ra` switched."""
        async with file_lock(self.lock_path):
            on_disk = read_cert(self.cert_path)
            if (on_disk is not None and on_disk != self.certificate
                    and not self.due(_now(), on_disk, at_start=at_start)):
                cert, ctx = self._load()     # renewed by another gateway sharing the files
                await ra.use_context(ctx)
                self.certificate = cert
                log.info("using the RA certificate renewed by another gateway serial=%x not_after=%s",
                         cert.serial_number, cert.not_valid_after_utc.isoformat())
                return True
            if not self.due(_now(), at_start=at_start):
                return False
            if _now() >= self.certificate.not_valid_after_utc:
                raise ConfigError(f"the RA certificate expired at {self.certificate.not_valid_after_utc.isoformat()}; "
                                  "an expired RA certificate cannot renew itself: issue a new one at the CA")
            key = await asyncio.to_thread(generate_key, _key_type(self.certificate.public_key()))
            csr = (x509.CertificateSigningRequestBuilder().subject_name(self.certificate.subject)
                   .sign(key, hash_for(key)))
            der = csr.public_bytes(serialization.Encoding.DER)
            answer = await ra.renew(base64.b64encode(der).decode())
            cert, chain = check_answer(answer, key)
            write_private_key(self.key_path, key, self._passphrase)   # key first, then the certificate
            write_atomic(self.cert_path, _pem(cert) + b"".join(_pem(c) for c in chain))
            old = self.certificate
            cert, ctx = self._load()
            await ra.use_context(ctx)
            self.certificate = cert
        log.info("renewed the RA certificate serial=%x -> %x not_after=%s", old.serial_number, cert.serial_number,
                 cert.not_valid_after_utc.isoformat())
        return True

    async def run_renewal(self, ra: "RAClient") -> None:
        """Until cancelled: renew at each renewal point (and at once if due now)."""
        if self.certificate is None:
            raise RuntimeError("load the RA credential (client_context) before running its renewal")
        failures, at_start = 0, True
        while True:
            try:
                await self.renew(ra, at_start=at_start)
                failures, at_start = 0, False
                delay = (self.renew_at() - _now()).total_seconds()
            except CAError as exc:
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                log.error("RA certificate renewal failed (%s: %s); the current one expires at %s; retrying in %.0f s",
                          exc.code, exc, self.certificate.not_valid_after_utc.isoformat(), delay)
            except Exception:   # our bug, or the disk: logged, never the end of the gateway
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                log.exception("RA certificate renewal failed; retrying in %.0f s", delay)
            await asyncio.sleep(min(max(delay, 0.25), CHECK_MAX_S))


def _key_type(public_key) -> str:
    """A new key of the same kind as the current one."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa-3072" if public_key.key_size >= 3072 else "rsa-2048"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp384r1":
        return "ec-p384"
    return "ec-p256"


def check_answer(answer: dict, key) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The CA's answer must be a certificate for our new key, issued by the chain it sent."""
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(answer["cert"]))
        chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in answer.get("chain", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the CA's answer is malformed: {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError("the CA's RA certificate is not for the key we sent")
    if not chain:
        raise ConfigError("the CA's answer carries no issuing CA")
    try:
        cert.verify_directly_issued_by(chain[0])
    except Exception as exc:   # InvalidSignature, ValueError, TypeError
        raise ConfigError(f"the CA's RA certificate is not signed by its issuing CA: {exc}") from exc
    return cert, chain[:1]
