"""`iomtca init`: create a CA directory with its hierarchy and service certificates.

Root CA (long-lived, its key only used here and for future issuing-CA
rotation), online issuing CA (pathLen 0), delegated OCSP responder, TLS server
certificate for the enrollment server, and config.toml. No gateway credential:
each gateway makes its own key on its own host and enrolls with a one-time token
(`iomtca gateway add`, `iomtca gateway init`, `ca/gateways.py`). Private keys are encrypted with the CA passphrase, mode 0600.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from common.keyfiles import passphrase_or_new

from . import profiles
from .authority import Authority
from .codec import cert_pem
from .config import CAConfig, CAPaths, render_config
from .errors import ConfigError
from .issuance import IssuerContext, build_certificate, new_serial, server_names
from .keystore import PASSPHRASE_ENV, write_atomic, write_private_key
from .model import check_trust_domain
from .ocsp_signer import rotate_responder
from .signer import KEY_TYPES, KeySigner, generate_key
from .timefmt import Clock, utc_now

ACTOR = "system:init"


@dataclass(frozen=True)
class InitResult:
    paths: CAPaths
    passphrase_file: Path | None   # None when the passphrase came from the environment
    replaced: Path | None          # where an existing CA directory was moved by --force


def _ca_name(trust_domain: str, role: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iomt-ca"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} {role}"),
    ])


async def init_ca(home: Path, *, trust_domain: str = "iomt.local", key_type: str = "ec-p256",
                  extra_server_names: tuple[str, ...] = (), base_url: str | None = None,
                  force: bool = False, clock: Clock = utc_now) -> InitResult:
    check_trust_domain(trust_domain)
    if key_type not in KEY_TYPES:
        raise ConfigError(f"unknown key type {key_type!r}; one of {', '.join(KEY_TYPES)}")
    paths = CAPaths(Path(home))
    replaced = None
    if paths.config.exists() or paths.root_cert.exists():
        if not force:
            raise ConfigError(f"{paths.home} already holds a CA; use --force to move it aside and start anew")
        replaced = paths.home.with_name(f"{paths.home.name}.replaced-{clock().strftime('%Y%m%dT%H%M%S')}")
        paths.home.rename(replaced)
    paths.home.mkdir(parents=True, exist_ok=True)
    paths.private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(paths.private, 0o700)

    passphrase, passphrase_file = passphrase_or_new(PASSPHRASE_ENV, paths.passphrase)

    names = tuple(dict.fromkeys(CAConfig().server_names + tuple(extra_server_names)))
    config = CAConfig(trust_domain=trust_domain, key_type=key_type, server_names=names,
                      **({"base_url": base_url} if base_url else {}))
    rel_passphrase = str(passphrase_file.relative_to(paths.home)) if passphrase_file else None
    write_atomic(paths.config, render_config(config, passphrase_file=rel_passphrase).encode())

    now = clock()
    root_key = generate_key(key_type)
    root_signer = KeySigner(root_key)
    root = build_certificate(public_key=root_key.public_key(), subject=_ca_name(trust_domain, "Root CA"),
                             sans=[], profile=profiles.ROOT_CA, issuer=None, serial=new_serial(), now=now,
                             signer=root_signer)
    issuing_key = generate_key(key_type)
    issuing = build_certificate(public_key=issuing_key.public_key(),
                                subject=_ca_name(trust_domain, "Issuing CA 1"), sans=[],
                                profile=profiles.ISSUING_CA,
                                issuer=IssuerContext(root, root_signer, (root,)), serial=new_serial(), now=now)
    write_private_key(paths.root_key, root_key, passphrase)
    write_private_key(paths.issuing_key, issuing_key, passphrase)
    write_atomic(paths.root_cert, cert_pem(root))
    write_atomic(paths.issuing_cert, cert_pem(issuing))
    write_atomic(paths.chain, cert_pem(issuing) + cert_pem(root))

    async with await Authority.open(paths.home, clock=clock, passphrase=passphrase) as authority:
        await authority.record_ca_certificate(root, profiles.ROOT_CA.name, actor=ACTOR)
        await authority.record_ca_certificate(issuing, profiles.ISSUING_CA.name, actor=ACTOR)

        server_key = generate_key(key_type)
        subject, sans = server_names(list(names))
        server = await authority.issue_service(server_key.public_key(), "server", subject, sans, actor=ACTOR)
        write_private_key(paths.server_key, server_key, passphrase)
        write_atomic(paths.server_cert, cert_pem(server.certificate) + cert_pem(issuing))

        await rotate_responder(authority, actor=ACTOR)
    return InitResult(paths, passphrase_file, replaced)
