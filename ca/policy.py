"""Small validators composed by issuance: each checks one rule and raises a typed error."""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import KeyPolicyError, PolicyViolationError, ProofOfPossessionError, RevokedError
from .model import Device, DeviceStatus, spiffe_id
from .profiles import Profile

_CURVES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}


def key_type(public_key) -> str:
    """Our name for a public key's type; raise KeyPolicyError for anything we do not know."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = _CURVES.get(public_key.curve.name)
        if name is None:
            raise KeyPolicyError(f"elliptic curve {public_key.curve.name} is not allowed; use P-256 or P-384")
        return name
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise KeyPolicyError(f"key type {type(public_key).__name__} is not allowed")


def key_allowed(public_key, profile: Profile) -> None:
    kind = key_type(public_key)
    if kind not in profile.key_types:
        allowed = ", ".join(sorted(profile.key_types))
        raise KeyPolicyError(f"{kind} keys are not allowed for profile {profile.name}; allowed: {allowed}")
    if kind == "rsa":
        numbers = public_key.public_numbers()
        if public_key.key_size < profile.min_rsa_bits:
            raise KeyPolicyError(
                f"RSA key of {public_key.key_size} bits is too weak; at least {profile.min_rsa_bits} required"
            )
        if numbers.e < 65537 or numbers.e % 2 == 0:
            raise KeyPolicyError(f"RSA public exponent {numbers.e} is not allowed; use 65537")


def proof_of_possession(csr: x509.CertificateSigningRequest) -> None:
    """The CSR must be signed by the key it carries (RFC 2986, RFC 7030 3.4)."""
    try:
        ok = csr.is_signature_valid
    except Exception as exc:  # unsupported algorithms surface here
        raise ProofOfPossessionError(f"CSR signature cannot be checked: {exc}") from exc
    if not ok:
        raise ProofOfPossessionError("CSR signature does not verify (no proof of possession of the key)")


def device_active(device: Device) -> None:
    if device.status is DeviceStatus.DECOMMISSIONED:
        raise RevokedError(f"device {device.id} is decommissioned")
    if device.status is not DeviceStatus.ACTIVE:
        raise PolicyViolationError(f"device {device.id} is {device.status.value}, not active")


def csr_names_this_device(csr: x509.CertificateSigningRequest, device: Device, trust_domain: str) -> None:
    """SANs a CSR asks for are ignored, but asking for another identity is refused.

    The certificate's names come from the registry; a CSR whose SANs name anything
    but this device (its id as a DNS name or its SPIFFE ID) is a sign of a
    misconfigured or malicious client, so it is refused rather than silently fixed.
    """
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise ProofOfPossessionError(f"CSR extensions are malformed: {exc}") from exc
    allowed = {spiffe_id(trust_domain, device.id).lower(), device.id.lower()}
    for name in ext.value:
        value = name.value if isinstance(name.value, str) else str(name.value)
        if isinstance(name, (x509.UniformResourceIdentifier, x509.DNSName)) and value.lower() in allowed:
            continue
        raise PolicyViolationError(
            f"CSR asks for subject alternative name {value!r}, which is not device {device.id}"
        )
