"""The HTTPS listener's TLS context: TLS 1.2+, optional client certificates; rebuilt when the
server certificate on disk is renewed."""
from __future__ import annotations

import logging
import os
import ssl

from ca.codec import cert_pem
from ca.config import CAPaths
from ca.errors import CAError
from ca.keystore import check_private
from common.renewal import read_cert, validity

from .config import EnrollConfig

log = logging.getLogger(__name__)

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME. The handshake checks the chain and signatures
# of a client certificate, but not its validity period: an expired device certificate
# must still reach simplereenroll inside the renewal grace period, so time is checked
# by the application (ca.policy.renewal_allowed and enroll.identity), never skipped.
X509_V_FLAG_NO_CHECK_TIME = 0x200000

# TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"


def server_context(paths: CAPaths, config: EnrollConfig, passphrase: bytes, *,
                   client_certs: bool = True) -> ssl.SSLContext:
    """`client_certs=False`: the console's listener, where people log in and no certificate is
    asked for (a browser would offer its own to choose from)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    check_private(paths.server_key)   # the same 0600 rule as the CA keys
    ctx.load_cert_chain(paths.server_cert, paths.server_key, password=passphrase)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if not client_certs:
        return ctx
    # Client certificates: optional at the TLS layer; our root for device and RA certificates,
    # configured manufacturer roots for IDevID onboarding.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=str(paths.chain))  # issuing CA too: devices send only their leaf
    extra = config.idevid_trust_files()
    if extra:
        ctx.load_verify_locations(cadata="".join(cert_pem(c).decode() for c in extra))
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    return ctx


def _stamp(paths: CAPaths) -> tuple:
    """What changes when server.pem or server.key is replaced (an atomic rename: a new inode)."""
    stamp = []
    for path in (paths.server_cert, paths.server_key):
        try:
            st = os.stat(path)
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            stamp.append(None)
    return tuple(stamp)


class ServerContext:
    """The listener's current SSL context, rebuilt when server.pem or server.key changes on disk.

    `reload()` is cheap when nothing changed (two stats). A load that fails (the renewer wrote
    the new key and not yet the certificate, a mode that is not 0600) keeps the current context,
    is logged, and is tried again at the next call.
    """

    def __init__(self, paths: CAPaths, config: EnrollConfig, passphrase: bytes, *, client_certs: bool = True) -> None:
        self._paths, self._config, self._passphrase = paths, config, passphrase
        self._client_certs = client_certs
        self._stamp = _stamp(paths)
        self.context = server_context(paths, config, passphrase, client_certs=client_certs)
        self._failed_stamp: tuple | None = None
        self._note_certificate()

    def _note_certificate(self) -> None:
        """The loaded certificate's serial and validity, read once per load (not at every poll)."""
        cert = read_cert(self._paths.server_cert)
        self.serial = cert.serial_number if cert is not None else None
        self._validity = validity(cert).total_seconds() if cert is not None else None

    def poll_interval(self, longest: float = 5.0, shortest: float = 0.25) -> float:
        """Every few seconds, or 1/10 of the certificate's validity when that is shorter."""
        tenth = self._validity / 10 if self._validity is not None else longest
        return max(shortest, min(longest, tenth))

    def reload(self) -> ssl.SSLContext | None:
        """A new context when the files changed and load cleanly; None otherwise."""
        stamp = _stamp(self._paths)
        if stamp == self._stamp:
            return None
        try:
            context = server_context(self._paths, self._config, self._passphrase, client_certs=self._client_certs)
        except (ssl.SSLError, OSError, CAError) as exc:
            if stamp != self._failed_stamp:   # once per state of the files, not at every poll
                log.warning("server certificate changed on disk but does not load yet (%s); "
                            "keeping the current one and retrying", exc)
                self._failed_stamp = stamp
            return None
        self._stamp, self.context, self._failed_stamp = stamp, context, None
        self._note_certificate()
        return context
