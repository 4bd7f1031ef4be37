"""The HTTPS listener's TLS context: TLS 1.2+, optional client certificates."""
from __future__ import annotations

import ssl

from ca.codec import cert_pem
from ca.config import CAPaths

from .config import EnrollConfig

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME. The handshake checks the chain and signatures
# of a client certificate, but not its validity period: an expired device certificate
# must still reach simplereenroll inside the renewal grace period, so time is checked
# by the application (ca.policy.renewal_allowed and enroll.identity), never skipped.
X509_V_FLAG_NO_CHECK_TIME = 0x200000

# TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"


def server_context(paths: CAPaths, config: EnrollConfig, passphrase: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(paths.server_cert, paths.server_key, password=passphrase)
    # Client certificates: optional at the TLS layer; our root for device and RA certificates,
    # configured manufacturer roots for IDevID onboarding.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=str(paths.chain))  # issuing CA too: devices send only their leaf
    extra = config.idevid_trust_files()
    if extra:
        ctx.load_verify_locations(cadata="".join(cert_pem(c).decode() for c in extra))
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx
