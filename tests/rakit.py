"""An RA credential for tests that call the RA API directly (curl, openssl, aiohttp clients):
the gateway registered and enrolled through the CA core in-process (`ca.gateways.register` and
`enroll`, the functions `iomtca gateway add` and `POST /iomt/v1/gateways/NAME/enroll` call), with
the files laid out as `iomtca gateway init` lays them out (gateway/home.py).

The gateway tests set their gateways up with the real commands (tests/gateway/gwkit.py
`setup_gateway`); this is for tests whose subject is the RA API, not the set-up.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca import gateways
from ca.authority import Authority
from common.keyfiles import write_atomic, write_private_key
from gateway.home import GatewayHome


@dataclass(frozen=True)
class RACredential:
    home: GatewayHome
    name: str
    passphrase: str

    @property
    def cert(self) -> Path:
        return self.home.ra_cert

    @property
    def key(self) -> Path:
        return self.home.ra_key


async def enroll_ra_async(ca_home: Path, gwdir: Path, name: str = "test-gw") -> RACredential:
    paths = GatewayHome(Path(gwdir))
    passphrase = secrets.token_urlsafe(24)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256()))
    async with await Authority.open(ca_home) as authority:
        token = await gateways.register(authority, name, actor="operator:test")
        issued = await gateways.enroll(authority, name, token.secret, csr)
    pem = serialization.Encoding.PEM
    paths.private.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.private, 0o700)
    write_private_key(paths.ra_key, key, passphrase.encode())
    write_atomic(paths.ra_cert, issued.certificate.public_bytes(pem) + issued.chain[0].public_bytes(pem))
    write_atomic(paths.root_cert, issued.chain[-1].public_bytes(pem))
    write_atomic(paths.passphrase, passphrase.encode() + b"\n", mode=0o600)
    write_atomic(paths.config, f'[gateway]\nname = "{name}"\n'.encode())
    return RACredential(paths, name, passphrase)


def enroll_ra(ca_home: Path, gwdir: Path, name: str = "test-gw") -> RACredential:
    """From sync code, or from inside a running event loop (in a thread of its own)."""
    result: list = []

    def work() -> None:
        result.append(asyncio.run(enroll_ra_async(ca_home, gwdir, name)))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(60)
    if not result:
        raise AssertionError(f"could not enroll an RA credential for {name} in {ca_home}")
    return result[0]
