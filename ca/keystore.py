"""The CA's key and certificate files: the CA passphrase and certificate loading. The file
primitives (encrypted keys, 0600, atomic writes, locks) are `common/keyfiles.py`, shared with the
gateway, which has its own key and passphrase.

Private keys are PKCS#8 PEM encrypted with the CA passphrase (AES-256-CBC with
a scrypt/PBKDF2 KDF as chosen by cryptography's BestAvailableEncryption).
"""
from __future__ import annotations

from pathlib import Path

from cryptography import x509

from common.keyfiles import (check_private, encrypt_key, file_lock, file_lock_sync,  # noqa: F401 (re-exported)
                             load_private_key, load_private_key_pem, new_passphrase, read_secret, write_atomic,
                             write_private_key)

from .errors import ConfigError

PASSPHRASE_ENV = "IOMTCA_PASSPHRASE"


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"certificate {path} is missing") from exc
    except ValueError as exc:
        raise ConfigError(f"certificate {path} is damaged: {exc}") from exc


def read_passphrase(passphrase_file: Path | None) -> bytes:
    """The CA passphrase: $IOMTCA_PASSPHRASE if set, else the passphrase file."""
    return read_secret(PASSPHRASE_ENV, passphrase_file, "passphrase")
