"""Key generation and the digest that goes with a key: for CA keys, service keys and devices alike."""
from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

# Key types `iomtca init --key-type` accepts for CA and service keys.
KEY_TYPES = ("ec-p256", "ec-p384", "ed25519", "rsa-2048", "rsa-3072")


def generate_key(key_type: str):
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}; one of {', '.join(KEY_TYPES)}")


def hash_for(private_key) -> hashes.HashAlgorithm | None:
    """The digest paired with a key in signatures (None: the algorithm hashes itself)."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()
