"""Verifying a device's CMS SignedData renewal request (MQTT `simplereenroll`): who signed which CSR."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timezone

from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from . import der
from .codec import fully_parsed
from .errors import BadRequestError, CAError, UnauthorizedError

# A CSR (at most 64 KiB, see codec.MAX_CSR_BYTES) plus a certificate or two.
MAX_CMS_BYTES = 128 * 1024

_SIGNED_DATA = "1.2.840.113549.1.7.2"
_DATA = "1.2.840.113549.1.7.1"
_ATTR_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_ATTR_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_ATTR_SIGNING_TIME = "1.2.840.113549.1.9.5"

_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}

# signatureAlgorithm OID -> (family, OID of the hash it names, if any).
_SIGNATURES: dict[str, tuple[str, str | None]] = {
    "1.2.840.10045.2.1": ("ecdsa", None),  # id-ecPublicKey, as some signers label ECDSA
    "1.2.840.10045.4.3.2": ("ecdsa", "2.16.840.1.101.3.4.2.1"),
    "1.2.840.10045.4.3.3": ("ecdsa", "2.16.840.1.101.3.4.2.2"),
    "1.2.840.10045.4.3.4": ("ecdsa", "2.16.840.1.101.3.4.2.3"),
    "1.2.840.113549.1.1.1": ("rsa", None),  # rsaEncryption, what openssl writes for PKCS#1 v1.5
    "1.2.840.113549.1.1.11": ("rsa", "2.16.840.1.101.3.4.2.1"),
    "1.2.840.113549.1.1.12": ("rsa", "2.16.840.1.101.3.4.2.2"),
    "1.2.840.113549.1.1.13": ("rsa", "2.16.840.1.101.3.4.2.3"),
    "1.2.840.113549.1.1.10": ("rsa-pss", None),  # hash is in the parameters
    "1.3.101.112": ("ed25519", None),  # RFC 8419: signs the signed attributes directly
}

_KEY_TYPES: dict[str, type] = {
    "ecdsa": ec.EllipticCurvePublicKey,
    "rsa": rsa.RSAPublicKey,
    "rsa-pss": rsa.RSAPublicKey,
    "ed25519": ed25519.Ed25519PublicKey,
}

# What asn1crypto (often lazily) and cryptography raise on malformed input.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                 UnsupportedAlgorithm, x509.InvalidVersion)


@dataclass(frozen=True)
class SignedRequest:
    """A renewal request whose signature verified with the key of `signer`.

    Only the signature is proven: the signer certificate's issuer, validity and
    revocation, the freshness of `signing_time` and the CSR's own contents are
    the caller's to check.
    """

    csr_der: bytes  # the encapsulated content (the new CSR, DER), exactly as carried
    signer: x509.Certificate  # the certificate that signed, from the CMS certificates set
    signing_time: datetime | None  # aware UTC, from the signingTime signed attribute


def verify_signed_request(data: bytes) -> SignedRequest:
    """Parse a CMS ContentInfo (SignedData, attached content, one signer) and verify its signature.

    DER as the contract says; the indefinite-length BER of `openssl cms -stream` is accepted too.

    Raises BadRequestError when the input is not such a CMS (malformed DER, wrong
    content type, detached content, signer certificate missing, unsupported
    algorithm) and UnauthorizedError when the messageDigest or the signature does
    not verify.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequestError("CMS must be bytes")
    if not data:
        raise BadRequestError("CMS is empty")
    if len(data) > MAX_CMS_BYTES:
        raise BadRequestError(f"CMS is {len(data)} bytes, over the {MAX_CMS_BYTES}-byte limit")
    try:
        return _verify(bytes(data))
    except CAError:
        raise
    except _PARSE_ERRORS as exc:
        raise BadRequestError(f"CMS is malformed: {exc}") from exc


def _verify(data: bytes) -> SignedRequest:
    try:
        info = asn1_cms.ContentInfo.load(data, strict=True)
        content_type = info["content_type"].dotted
    except _PARSE_ERRORS as exc:
        raise BadRequestError(f"CMS is not a DER ContentInfo: {exc}") from exc
    if content_type != _SIGNED_DATA:
        raise BadRequestError(f"CMS content type is {_name(info['content_type'])}, expected signed-data")
    signed = info["content"]
    if not isinstance(signed, asn1_cms.SignedData):
        raise BadRequestError("CMS signed-data content is missing")

    content, econtent_type = _encapsulated_content(signed)

    signer_infos = signed["signer_infos"]
    if len(signer_infos) != 1:
        raise BadRequestError(f"CMS has {len(signer_infos)} SignerInfos, expected exactly one")
    signer_info = signer_infos[0]

    digest_oid = signer_info["digest_algorithm"]["algorithm"].dotted
    if digest_oid not in _DIGESTS:
        raise BadRequestError(
            f"unsupported CMS digest algorithm {_name(signer_info['digest_algorithm']['algorithm'])}")
    digest = _DIGESTS[digest_oid]

    cert = _signer_certificate(signed, signer_info["sid"])
    try:
        public_key = cert.public_key()
    except _PARSE_ERRORS as exc:
        raise BadRequestError(f"CMS signer certificate has an unusable public key: {exc}") from exc
    family, sig_params = _signature_algorithm(signer_info["signature_algorithm"], digest_oid)
    if not isinstance(public_key, _KEY_TYPES[family]):
        raise BadRequestError(
            f"CMS signatureAlgorithm is {family} but the signer certificate holds {_key_kind(public_key)}")

    signed_attrs = signer_info["signed_attrs"]
    if isinstance(signed_attrs, asn1_core.Void):
        if econtent_type != _DATA:
            raise BadRequestError("CMS without signed attributes must carry content of type data")
        message, signing_time = content, None
    else:
        signing_time = _check_signed_attributes(signed_attrs, econtent_type, content, digest)
        # RFC 5652 5.4: the signature covers the attributes' DER with the SET OF tag, not [0].
        message = der.tlv(0x31, signed_attrs.contents)

    signature = signer_info["signature"].native
    if not isinstance(signature, bytes) or not signature:
        raise BadRequestError("CMS signature is empty")
    _verify_signature(public_key, family, sig_params, digest, signature, message)
    return SignedRequest(csr_der=content, signer=cert, signing_time=signing_time)


def _encapsulated_content(signed: asn1_cms.SignedData) -> tuple[bytes, str]:
    encap = signed["encap_content_info"]
    econtent_type = encap["content_type"].dotted
    econtent = encap["content"]
    if isinstance(econtent, asn1_core.Void):
        raise BadRequestError("CMS is detached: the CSR is not encapsulated (sign with -nodetach)")
    content = econtent.native
    if isinstance(content, asn1_core.Asn1Value):  # a ParsableOctetString that parsed itself
        content = econtent.__bytes__()
    if not isinstance(content, bytes):
        raise BadRequestError("CMS encapsulated content is not an OCTET STRING")
    if not content:
        raise BadRequestError("CMS encapsulated content is empty")
    return content, econtent_type


def _signer_certificate(signed: asn1_cms.SignedData, sid: asn1_cms.SignerIdentifier) -> x509.Certificate:
    certificates = signed["certificates"]
    if isinstance(certificates, asn1_core.Void) or len(certificates) == 0:
        raise BadRequestError("CMS carries no certificates: the signer certificate must be included")
    kind = sid.name
    matches: dict[bytes, asn1_cms.Certificate] = {}
    for choice in certificates:
        if choice.name != "certificate":
            continue
        candidate = choice.chosen
        if kind == "issuer_and_serial_number":
            wanted = sid.chosen
            hit = (candidate.serial_number == wanted["serial_number"].native
                   and candidate.issuer == wanted["issuer"])
        elif kind == "subject_key_identifier":
            hit = candidate.key_identifier is not None and candidate.key_identifier == sid.chosen.native
        else:
            raise BadRequestError(f"unsupported CMS signer identifier {kind}")
        if hit:
            matches[candidate.dump()] = candidate
    if not matches:
        what = "issuer and serial number" if kind == "issuer_and_serial_number" else "subject key identifier"
        raise BadRequestError(f"no certificate in the CMS matches the signer's {what}")
    if len(matches) > 1:
        raise BadRequestError(f"{len(matches)} different certificates in the CMS match the signer identifier")
    ((encoded, chosen),) = matches.items()
    if chosen.serial_number <= 0:  # cryptography only warns about these, for now
        raise BadRequestError("CMS signer certificate has a serial number that is not positive")
    try:
        cert = x509.load_der_x509_certificate(encoded)
    except (ValueError, x509.InvalidVersion) as exc:
        raise BadRequestError(f"CMS signer certificate is not a valid X.509 certificate: {exc}") from exc
    return fully_parsed(cert, "CMS signer certificate")


def _signature_algorithm(algorithm, digest_oid: str) -> tuple[str, object]:
    """The signature family, and for RSA-PSS its (mgf1 hash, salt length); checks the hash agrees."""
    oid = algorithm["algorithm"].dotted
    if oid not in _SIGNATURES:
        raise BadRequestError(f"unsupported CMS signature algorithm {_name(algorithm['algorithm'])}")
    family, named_hash = _SIGNATURES[oid]
    params = None
    if family == "rsa-pss":
        pss = algorithm["parameters"]
        if not isinstance(pss, asn1_core.Sequence):
            raise BadRequestError("RSA-PSS signature algorithm has no parameters")
        named_hash = pss["hash_algorithm"]["algorithm"].dotted
        mgf = pss["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1":
            raise BadRequestError("RSA-PSS mask generation function is not MGF1")
        mgf_hash = mgf["parameters"]["algorithm"].dotted
        if mgf_hash not in _DIGESTS:
            raise BadRequestError(f"unsupported RSA-PSS MGF1 hash {mgf['parameters']['algorithm'].native}")
        if pss["trailer_field"].native != "trailer_field_bc":
            raise BadRequestError("RSA-PSS trailer field is not 1")
        salt_length = pss["salt_length"].native
        if not isinstance(salt_length, int) or not 0 <= salt_length <= 1024:
            raise BadRequestError(f"RSA-PSS salt length {salt_length} is out of range")
        params = (_DIGESTS[mgf_hash], salt_length)
    if named_hash is not None and named_hash != digest_oid:
        raise BadRequestError(
            f"CMS signatureAlgorithm {_name(algorithm['algorithm'])} uses a different hash than "
            f"digestAlgorithm {_DIGESTS[digest_oid].name}")
    return family, params


def _check_signed_attributes(attrs: asn1_cms.CMSAttributes, econtent_type: str, content: bytes,
                             digest: type[hashes.HashAlgorithm]) -> datetime | None:
    """Check contentType and messageDigest (RFC 5652 5.3, 11.1-11.3); the signingTime, if any."""
    if len(attrs) == 0:
        raise BadRequestError("CMS signed attributes are present but empty")
    found: dict[str, list] = {}
    for attr in attrs:
        oid = attr["type"].dotted
        if oid in (_ATTR_CONTENT_TYPE, _ATTR_MESSAGE_DIGEST, _ATTR_SIGNING_TIME):
            if oid in found:
                raise BadRequestError(f"CMS signed attribute {attr['type'].native} appears more than once")
            values = list(attr["values"])
            if len(values) != 1:
                raise BadRequestError(f"CMS signed attribute {attr['type'].native} must have exactly one value")
            found[oid] = values

    if _ATTR_CONTENT_TYPE not in found:
        raise BadRequestError("CMS signed attributes lack the contentType attribute")
    attr_type = found[_ATTR_CONTENT_TYPE][0]
    if not isinstance(attr_type, asn1_core.ObjectIdentifier) or attr_type.dotted != econtent_type:
        raise BadRequestError(
            f"CMS contentType attribute {_name(attr_type)} does not match eContentType {econtent_type}")

    if _ATTR_MESSAGE_DIGEST not in found:
        raise BadRequestError("CMS signed attributes lack the messageDigest attribute")
    claimed = found[_ATTR_MESSAGE_DIGEST][0].native
    if not isinstance(claimed, bytes):
        raise BadRequestError("CMS messageDigest attribute is not an OCTET STRING")
    actual = hashes.Hash(digest())
    actual.update(content)
    if not hmac.compare_digest(claimed, actual.finalize()):
        raise UnauthorizedError("CMS signature does not verify: messageDigest does not match the encapsulated CSR")

    if _ATTR_SIGNING_TIME not in found:
        return None
    when = found[_ATTR_SIGNING_TIME][0].native
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise BadRequestError(f"CMS signingTime attribute is not a valid time: {when!r}")
    return when.astimezone(timezone.utc)


def _verify_signature(public_key, family: str, params, digest: type[hashes.HashAlgorithm],
                      signature: bytes, message: bytes) -> None:
    try:
        if family == "ecdsa":
            public_key.verify(signature, message, ec.ECDSA(digest()))
        elif family == "rsa":
            public_key.verify(signature, message, padding.PKCS1v15(), digest())
        elif family == "rsa-pss":
            mgf_hash, salt_length = params
            public_key.verify(signature, message, padding.PSS(padding.MGF1(mgf_hash()), salt_length), digest())
        else:
            public_key.verify(signature, message)
    except InvalidSignature:
        raise UnauthorizedError(
            "CMS signature does not verify with the signer certificate's key") from None
    except _PARSE_ERRORS as exc:
        raise BadRequestError(f"CMS signature cannot be checked: {exc}") from exc


def _key_kind(public_key) -> str:
    for kind, key_type in (("an EC", ec.EllipticCurvePublicKey), ("an RSA", rsa.RSAPublicKey),
                           ("an Ed25519", ed25519.Ed25519PublicKey)):
        if isinstance(public_key, key_type):
            return f"{kind} key"
    return "an unsupported key type"


def _name(oid) -> str:
    """An OID as asn1crypto names it, else dotted; never raises."""
    try:
        native = oid.native
        dotted = oid.dotted
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "an unparsable value"
    return native if native == dotted else f"{native} ({dotted})"
