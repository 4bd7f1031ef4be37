"""Who signs: a `Signer` protocol and the file-backed key implementation.

Issuance asks a signer for the key object cryptography's builders need, the
hash to use, and raw signatures for what we encode ourselves (CRLs). An HSM
(PKCS#11) signer would implement the same protocol.
"""
from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from common.keys import KEY_TYPES, generate_key, hash_for  # noqa: F401 (re-exported)

from . import der

def algorithm_identifier(private_key) -> bytes:
    """DER AlgorithmIdentifier of the signatures `sign()` makes (RFC 5758, 8410, 4055)."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return der.sequence(der.oid("1.3.101.112"))
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        suffix = "3" if isinstance(hash_for(private_key), hashes.SHA384) else "2"
        return der.sequence(der.oid("1.2.840.10045.4.3." + suffix))
    if isinstance(private_key, rsa.RSAPrivateKey):
        return der.sequence(der.oid("1.2.840.113549.1.1.11"), der.null())
    raise TypeError(f"unsupported signing key {type(private_key).__name__}")


class Signer(Protocol):
    @property
    def private_key(self): ...

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm | None: ...

    @property
    def algorithm_identifier(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...

    @property
    def slow(self) -> bool:
        """Signatures take milliseconds (RSA, a remote HSM): sign in a worker thread, not on the loop."""


class KeySigner:
    """A signer over a private key held in memory (loaded from an encrypted file)."""

    def __init__(self, private_key) -> None:
        self._key = private_key
        self._hash = hash_for(private_key)
        self._alg = algorithm_identifier(private_key)

    @property
    def private_key(self):
        return self._key

    @property
    def slow(self) -> bool:
        # an EC or Ed25519 signature takes tens of microseconds, less than a hop to a thread
        return isinstance(self._key, rsa.RSAPrivateKey)

    @property
    def hash_algorithm(self):
        return self._hash

    @property
    def algorithm_identifier(self) -> bytes:
        return self._alg

    def sign(self, data: bytes) -> bytes:
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(self._hash))
        return key.sign(data, padding.PKCS1v15(), self._hash)
