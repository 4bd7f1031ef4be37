"""A simulated device's folder: key.pem, cert.pem (current), state.json; new pair files while renewing."""
from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.keystore import write_atomic

from .device import DeviceRecord


class DeviceFolder:
    def __init__(self, root: Path, device_id: str) -> None:
        self.path = root / device_id
        self.key = self.path / "key.pem"
        self.cert = self.path / "cert.pem"
        self.new_key = self.path / "new-key.pem"
        self.new_cert = self.path / "new-cert.pem"
        self.state = self.path / "state.json"

    def exists(self) -> bool:
        return self.state.exists()

    def load(self) -> DeviceRecord:
        return DeviceRecord.from_json(self.state.read_text())

    def save(self, record: DeviceRecord) -> None:
        write_atomic(self.state, record.to_json().encode(), mode=0o600)

    def write_key(self, key, *, new: bool = False) -> None:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        write_atomic(self.new_key if new else self.key, pem, mode=0o600)

    def load_key(self, *, new: bool = False):
        return serialization.load_pem_private_key((self.new_key if new else self.key).read_bytes(), None)

    def write_cert(self, cert: x509.Certificate, *, new: bool = False) -> None:
        write_atomic(self.new_cert if new else self.cert, cert.public_bytes(serialization.Encoding.PEM))

    def load_cert(self) -> x509.Certificate | None:
        return x509.load_pem_x509_certificate(self.cert.read_bytes()) if self.cert.exists() else None

    def promote(self) -> None:
        """The renewed pair worked once: it becomes the current pair (key first, then certificate)."""
        self.new_key.replace(self.key)
        self.new_cert.replace(self.cert)

    def discard_new(self) -> None:
        self.new_key.unlink(missing_ok=True)
        self.new_cert.unlink(missing_ok=True)
