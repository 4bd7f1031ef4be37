"""Inspections of a CA directory for `iomtca check`: key file modes and owners, whether a key
belongs to a certificate and who signed a certificate. The database's own inspections (integrity,
foreign keys, schema version, audit chain, over one read-only connection) are the store's:
ca/store/sqlite_check.py."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


KEY_MODE = 0o600                   # a key or secret file: the owner reads (and writes) it, nobody else
DIR_MODE = 0o700                   # the directory that holds them

_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def permission_problems(path: Path, *, directory: bool = False) -> list[str]:
    """What is wrong with the mode and owner of a key file (0600 or stricter) or of the directory
    holding them (0700 or stricter), both owned by the user running this, as ssh insists."""
    st = path.stat()
    mode, allowed = stat.S_IMODE(st.st_mode), DIR_MODE if directory else KEY_MODE
    problems = []
    if mode & ~allowed:
        problems.append(f"mode {mode:04o}, must be {allowed:04o}")
    if st.st_uid != os.geteuid():
        problems.append(f"owned by uid {st.st_uid}, not by the current user (uid {os.geteuid()})")
    return problems


def key_matches(private_key, cert: x509.Certificate) -> bool:
    """The private key is the one whose public key `cert` certifies."""
    return private_key.public_key().public_bytes(*_SPKI) == cert.public_key().public_bytes(*_SPKI)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None when `issuer` issued and signed `cert`, else why not."""
    try:
        cert.verify_directly_issued_by(issuer)
    except ValueError as exc:   # names or signature algorithm do not fit
        return str(exc)
    except Exception as exc:    # InvalidSignature, or a key type that cannot sign certificates (TypeError)
        return f"signature does not verify ({type(exc).__name__})"
    return None
