"""The delegated OCSP responder's key and certificate, rotated automatically.

The responder certificate is short-lived (`ocsp_signer_lifetime`, which is the
`ocsp` profile's lifetime, 7 days by default) and carries id-pkix-ocsp-nocheck, so it cannot itself be revoked:
rotation is what limits the harm of a leaked responder key. Certificate and
encrypted key live in one file, replaced atomically, so a reader never sees a
new certificate with an old key. Rotation holds an exclusive lock on a file
beside them, so of several processes serving one CA directory (server
workers, the CLI) that find the responder due at once, the first rotates and
the others load what it wrote.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509

from .codec import cert_pem
from .errors import ConfigError
from .issuance import service_names
from .keystore import check_private, encrypt_key, file_lock, load_private_key_pem, write_atomic
from .service_certs import renewal_due
from .signer import KeySigner, generate_key

if TYPE_CHECKING:
    from .authority import Authority

_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)


@dataclass(frozen=True)
class OCSPResponder:
    certificate: x509.Certificate
    signer: KeySigner

    def needs_rotation(self, now: datetime, lifetime: timedelta | None = None) -> bool:
        """Past 2/3 of the time from issuance to notAfter, or (given the `ocsp` profile's
        configured `lifetime`) valid for longer than that lifetime now allows."""
        return renewal_due(self.certificate, lifetime, now)


def _load(authority: "Authority") -> OCSPResponder | None:
    path = authority.paths.ocsp_signer
    if not path.exists():
        return None
    check_private(path)
    data = path.read_bytes()
    match = _CERT_RE.search(data)
    if match is None:
        raise ConfigError(f"{path} holds no certificate")
    cert = x509.load_pem_x509_certificate(match.group(0))
    key = load_private_key_pem(data[match.end():], authority.key_passphrase, str(path))
    return OCSPResponder(cert, KeySigner(key))


async def load_or_rotate_responder(authority: "Authority", now: datetime) -> OCSPResponder:
    """The responder on disk, or a new one when it is due: past 2/3 of its validity, or (at the
    first load, e.g. at start) longer-lived than `ocsp_signer_lifetime` now allows."""
    lifetime = authority.config.profile("ocsp").lifetime
    current = _load(authority)
    if current is not None and not current.needs_rotation(now, lifetime):
        return current
    async with file_lock(authority.paths.ocsp_signer.with_name("ocsp-rotation.lock")):
        current = _load(authority)  # another process may have rotated while we waited
        if current is not None and not current.needs_rotation(now, lifetime):
            return current
        return await rotate_responder(authority, actor="system:ocsp-rotation")


async def rotate_responder(authority: "Authority", *, actor: str) -> OCSPResponder:
    """Make a new responder key and certificate (recorded in the database first)."""
    config = authority.config
    key = generate_key(config.key_type)
    subject, sans = service_names(f"{config.trust_domain} OCSP responder", config.trust_domain, "ca/ocsp")
    issued = await authority.issue_service(key.public_key(), "ocsp", subject, sans, actor=actor)
    paths = authority.paths
    write_atomic(paths.ocsp_signer, cert_pem(issued.certificate) + encrypt_key(key, authority.key_passphrase),
                 mode=0o600)
    write_atomic(paths.ocsp_cert, cert_pem(issued.certificate))
    return OCSPResponder(issued.certificate, KeySigner(key))
