"""Key files: encrypted PKCS#8 private keys (mode 0600), atomic writes, file locks, secrets read
from the environment or a 0600 file. Used by the CA for its keys and by the gateway for its own."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .errors import ConfigError

# The passphrase of the gateway's RA key (else the file private/gateway-passphrase): the gateway's
# own, never the CA's.
GATEWAY_PASSPHRASE_ENV = "IOMTCA_GATEWAY_PASSPHRASE"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temporary file with `mode`, fsync it, rename it into place and fsync the
    directory (so the new name survives a power cut, not only the new bytes)."""
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
    _fsync_dir(path.parent)  # the rename itself is durable only once the directory is


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock_sync(path: Path, *, shared: bool = False):
    """flock on `path` (created 0600): exclusive for writers of a key/certificate pair, shared for
    readers that must not see a new key with an old certificate. Released on exit."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.asynccontextmanager
async def file_lock(path: Path, *, shared: bool = False):
    """`file_lock_sync` for coroutines: the wait for the lock happens in a thread, not on the loop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def new_passphrase() -> bytes:
    return secrets.token_urlsafe(32).encode()


def passphrase_or_new(env: str, path: Path, what: str = "passphrase") -> tuple[bytes, Path | None]:
    """For `init`: the passphrase from `env` if set (nothing written, None); else the one in the
    0600 file `path`, which is made with a new passphrase if it does not exist yet (an init that
    stopped half-way keeps the one it made)."""
    value = os.environ.get(env)
    if value:
        return value.encode(), None
    if not path.exists():
        write_atomic(path, new_passphrase() + b"\n", mode=0o600)
    return read_secret(env, path, what), path


def toml_str(value: str) -> str:
    """A TOML basic string (for the config files `init` writes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_secret(env: str, path: Path | None, what: str) -> bytes:
    """A secret: the environment variable `env` if set, else the 0600 file `path`."""
    value = os.environ.get(env)
    if value:
        return value.encode()
    if path is None:
        raise ConfigError(f"no {what}: set {env} or a file for it in the config")
    try:
        check_private(path)
        data = path.read_bytes().strip()
    except FileNotFoundError as exc:
        raise ConfigError(f"no {what}: set {env} or create {path}") from exc
    if not data:
        raise ConfigError(f"{what} file {path} is empty")
    return data
