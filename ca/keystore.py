"""Key and certificate files: encrypted private keys, mode 0600, atomic writes.

Private keys are PKCS#8 PEM encrypted with the CA passphrase (AES-256-CBC with
a scrypt/PBKDF2 KDF as chosen by cryptography's BestAvailableEncryption).
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import ConfigError

PASSPHRASE_ENV = "IOMTCA_PASSPHRASE"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temporary file with `mode`, fsync it and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # umask may have narrowed or the caller may widen
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encrypt_key(key, passphrase: bytes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def write_private_key(path: Path, key, passphrase: bytes) -> None:
    write_atomic(path, encrypt_key(key, passphrase), mode=0o600)


def check_private(path: Path) -> None:
    """Refuse key files that others can read, as ssh does."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is accessible by group or others (mode {oct(mode & 0o777)}); run chmod 600 {path}")


def load_private_key(path: Path, passphrase: bytes):
    try:
        check_private(path)
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"private key {path} is missing") from exc
    return load_private_key_pem(data, passphrase, str(path))


def load_private_key_pem(data: bytes, passphrase: bytes, what: str):
    try:
        return serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot decrypt {what}: wrong passphrase or damaged file") from exc


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"certificate {path} is missing") from exc
    except ValueError as exc:
        raise ConfigError(f"certificate {path} is damaged: {exc}") from exc


def new_passphrase() -> bytes:
    return secrets.token_urlsafe(32).encode()


def read_passphrase(passphrase_file: Path | None) -> bytes:
    """The CA passphrase: $IOMTCA_PASSPHRASE if set, else the passphrase file."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if passphrase_file is None:
        raise ConfigError(f"no passphrase: set {PASSPHRASE_ENV} or passphrase_file in the config")
    try:
        check_private(passphrase_file)
        value = passphrase_file.read_bytes().strip()
    except FileNotFoundError as exc:
        raise ConfigError(f"no passphrase: set {PASSPHRASE_ENV} or create {passphrase_file}") from exc
    if not value:
        raise ConfigError(f"passphrase file {passphrase_file} is empty")
    return value
