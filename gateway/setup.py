"""`iomtca gateway init`: set up a gateway's own directory on the gateway host.

1. Refuse a directory that holds a CA (keys, database, config) or a gateway already set up.
2. The gateway's passphrase: $IOMTCA_GATEWAY_PASSPHRASE, else a new one in private/passphrase (0600).
3. A new RA key, made here; a CSR for it (CN = the gateway's name).
4. Enroll over HTTPS, trusting only the root given with --root (TLS 1.2+):
   `POST /iomt/v1/gateways/NAME/enroll {token, csr}` (the one-time token of `iomtca gateway add`).
5. Check the answer: a certificate for our key, signed by the issuing CA sent with it, which the
   root signed. Then write the key (encrypted), ra.pem (certificate + issuing CA), root.pem, and
   last gateway.toml: a directory without gateway.toml is not a gateway directory, so an init
   that failed half-way is simply run again.
"""
from __future__ import annotations

import asyncio
import base64
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from common.errors import CAError, ConfigError
from common.ids import check_id
from common.keyfiles import GATEWAY_PASSPHRASE_ENV, passphrase_or_new, toml_str, write_atomic, write_private_key
from common.keys import generate_key, hash_for

from .home import GatewayHome
from .mqtt import parse_broker
from .ra_client import RemoteError
from .ra_identity import check_answer

TIMEOUT_S = 30


@dataclass(frozen=True)
class SetupResult:
    home: GatewayHome
    serial: int
    not_after: str
    passphrase_file: Path | None   # None: the passphrase came from the environment


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_root(path: Path) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--root {path}: not a PEM certificate ({exc})") from None
    root = certs[0]
    try:
        basic = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise ConfigError(f"--root {path} is not a CA certificate; give the CA's root.pem")
    return root


def _check_url(ca_url: str) -> str:
    parts = urlsplit(ca_url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"--ca {ca_url!r}: the CA's URL must be https://HOST:PORT")
    return ca_url.rstrip("/")


async def init_gateway(home: Path, *, ca_url: str, root: Path, name: str, token: str, broker: str | None = None,
                       key_type: str = "ec-p256") -> SetupResult:
    paths = GatewayHome(Path(home).absolute())
    paths.refuse_ca_directory()
    if paths.config.exists():
        raise ConfigError(f"{paths.home} already holds a gateway ({paths.config}); use a new directory")
    check_id(name, "gateway name")
    ca_url = _check_url(ca_url)
    if broker is not None:
        try:
            parse_broker(broker)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    root_cert = _load_root(root)
    if not token:
        raise ConfigError("no gateway token: give the one `iomtca gateway add` printed")

    paths.home.mkdir(parents=True, exist_ok=True)
    paths.private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(paths.private, 0o700)
    passphrase, passphrase_file = passphrase_or_new(GATEWAY_PASSPHRASE_ENV, paths.passphrase, "gateway passphrase")

    key = await asyncio.to_thread(generate_key, key_type)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hash_for(key)))
    answer = await _enroll(ca_url, root, name, token, csr.public_bytes(serialization.Encoding.DER))
    cert, chain = check_answer(answer, key)
    try:
        chain[0].verify_directly_issued_by(root_cert)
    except Exception as exc:   # InvalidSignature, ValueError, TypeError
        raise ConfigError(f"the CA's issuing certificate is not signed by --root {root}: {exc}") from None

    write_private_key(paths.ra_key, key, passphrase)
    write_atomic(paths.ra_cert, _pem(cert) + _pem(chain[0]))
    write_atomic(paths.root_cert, _pem(root_cert))
    lines = ["# written by `iomtca gateway init`; settings: docs/GATEWAY.md", "[gateway]",
             f"name = {toml_str(name)}", f"ca_url = {toml_str(ca_url)}"]
    if broker is not None:
        lines.append(f"broker = {toml_str(broker)}")
    write_atomic(paths.config, ("\n".join(lines) + "\n").encode(), mode=0o640)
    return SetupResult(paths, cert.serial_number, cert.not_valid_after_utc.isoformat(), passphrase_file)


async def _enroll(ca_url: str, root: Path, name: str, token: str, csr_der: bytes) -> dict:
    ctx = ssl.create_default_context(cafile=str(root))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    url = f"{ca_url}/iomt/v1/gateways/{quote(name, safe='')}/enroll"
    body = {"token": token, "csr": base64.b64encode(csr_der).decode()}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
            async with session.post(url, json=body, ssl=ctx) as resp:
                raw = await resp.read()
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if resp.status != 200:
                    if isinstance(data, dict) and isinstance(data.get("code"), str):
                        raise RemoteError(data["code"], str(data.get("message", "")))
                    raise RemoteError("internal", f"the CA answered HTTP {resp.status}: {raw[:200]!r}")
    except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot reach the CA at {ca_url}: {exc or type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise CAError("the CA's answer is not JSON")
    return data
