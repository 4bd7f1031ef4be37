"""The auditor's evidence export: one document listing every device identity (owner, current
certificate, status, proven contact and posture), every revocation, the audit log's head and
whether its chain verifies, and the lifetimes and grace periods that apply; as JSON and CSV,
each signed by a detached CMS signature (RFC 5652 5.2: no eContent) of the evidence signer, a
service certificate of the issuing CA with keyUsage digitalSignature and extendedKeyUsage
id-kp-documentSigning (RFC 9336). docs/EVIDENCE.md says how an auditor checks it with openssl.

Building the document is pure (`build_document`, `document_bytes`, `csv_bytes`); `export` reads
the store, signs, and writes the `evidence_exported` audit entry, which keeps the signature: so
`signature_for(sha256)` finds, in any server process, the signature of bytes handed out earlier.
"""
from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Callable

from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from . import cms, service_certs, views
from .audit import AuditRow, verify_chain
from .config import CAConfig, ModelPolicy
from .errors import BadRequestError, NotFoundError, UnauthorizedError
from .issuance import service_names
from .model import AuditEvent, CertRecord, CertStatus, Device, serial_hex
from .profiles import DOCUMENT_SIGNING
from .signer import hash_for
from .timefmt import format_duration

if TYPE_CHECKING:
    from .authority import Authority

log = logging.getLogger(__name__)

FORMAT = "iomt-ca evidence 1"
ACTION = "evidence_exported"
PROFILE = "evidence"
SIGNER_ACTOR = "system:evidence-renewal"
SIGNED_FORMATS = ("json", "csv")
# device_json fields that unsigned MQTT messages reported: claims, shown as reported, never verified
UNVERIFIED_FIELDS = ("reported_online", "reported_online_at", "reported_firmware", "reported_posture_at")
NOTES = {
    "unverified_fields": "reported_* fields come from unsigned MQTT presence and posture messages: what the "
                         "device claimed, not verified by any key",
    "firmware": "firmware is what the device proved with its current key (signed posture, mutual TLS) or an "
                "operator set; posture_signed_at is the signingTime of the newest signed posture accepted",
    "last_proven_contact": "the last renewal, signed posture or mutual-TLS request made with the device's "
                           "current key",
    "current_certificate": "the newest certificate issued to the device, whatever its status; identity_valid "
                           "says whether it is good and within its validity at generated_at",
    "audit": "head is the newest entry's hash, read after the devices and certificates (every change listed "
             "has its entry at or before it); intact is the verification of the whole hash chain",
    "policy": "a model's setting wins over its criticality's, which wins over the [ca] default; durations in "
              "the configuration's syntax (72h, 7d, 1d12h)",
}
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")


# -- the document (pure) ------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    devices: list[Device]
    certificates: list[CertRecord]
    audit: list[AuditRow]


def _duration(value: timedelta | None) -> str | None:
    return None if value is None else format_duration(value)


def _class_json(policy: ModelPolicy) -> dict:
    return {"lifetime": _duration(policy.lifetime), "renewal_grace": _duration(policy.renewal_grace),
            "non_attendance": _duration(policy.non_attendance), "min_firmware": policy.min_firmware}


def effective_policy(config: CAConfig, device: Device, profile: str = "device") -> dict:
    """The lifetime, renewal grace, non-attendance period and firmware floor that apply to `device`."""
    return {"lifetime": _duration(config.device_lifetime(device, profile)),
            "renewal_grace": _duration(config.renewal_grace_for(device)),
            "non_attendance": _duration(config.non_attendance_for(device)),
            "min_firmware": config.min_firmware_for(device)}


def policy_json(config: CAConfig, devices: list[Device]) -> dict:
    """What is configured (profiles, [ca] defaults, per model and per criticality) and what applies
    to each (model, criticality) class of the fleet."""
    classes = Counter((d.model, d.criticality.value) for d in devices)
    example = {(d.model, d.criticality.value): d for d in devices}
    return {
        "profiles": {name: {"lifetime": _duration(p.lifetime), "key_usage": sorted(p.key_usage),
                            "extended_key_usage": [o.dotted_string for o in p.extended_key_usage]}
                     for name, p in sorted(config.profiles.items())},
        "renewal_grace": _duration(config.renewal_grace),
        "token_ttl": _duration(config.token_ttl),
        "ocsp_validity": _duration(config.ocsp_validity),
        "crl_next_update": _duration(config.crl_next_update),
        "models": {model: _class_json(p) for model, p in sorted(config.models.items())},
        "criticality": {level: _class_json(p) for level, p in sorted(config.criticality.items())},
        "attendance": {"hold_high_criticality": config.attendance.hold_high_criticality,
                       "release_on_return": config.attendance.release_on_return},
        "approval": {"criticality": sorted(config.approval.criticality), "models": sorted(config.approval.models)},
        "classes": [{"model": model, "criticality": level, "devices": count,
                     **effective_policy(config, example[(model, level)])}
                    for (model, level), count in sorted(classes.items())],
    }


def _ca_json(cert: x509.Certificate) -> dict:
    return {"subject": cert.subject.rfc4514_string(), "serial": serial_hex(cert.serial_number),
            "not_after": views.ts(cert.not_valid_after_utc),
            "sha256": cert.fingerprint(hashes.SHA256()).hex()}


def device_entry(device: Device, certs: list[CertRecord], config: CAConfig, now: datetime) -> dict:
    """device_json, with the device's current (newest) certificate, whether it is a valid identity
    now, and the policy that applies. `certs`: the device's certificates, oldest first."""
    current = certs[-1] if certs else None
    good = [c.not_after for c in certs if c.status is CertStatus.GOOD]
    valid = (current is not None and current.status is CertStatus.GOOD
             and current.not_before <= now < current.not_after)
    return {**views.device_json(device, max(good, default=None)),
            "current_certificate": views.cert_json(current) if current else None,
            "identity_valid": valid, "certificate_count": len(certs),
            "policy": effective_policy(config, device, current.profile if current else "device")}


def build_document(snap: Snapshot, config: CAConfig, chain: tuple[x509.Certificate, ...], now: datetime) -> dict:
    """The evidence document of `snap`; `chain`: the issuing CA certificate first, the root last."""
    by_device: dict[str, list[CertRecord]] = {}
    for record in snap.certificates:   # oldest first, as the store lists them
        if record.device_id:
            by_device.setdefault(record.device_id, []).append(record)
    devices = [device_entry(d, by_device.get(d.id, []), config, now) for d in snap.devices]
    revoked = sorted((c for c in snap.certificates if c.status is not CertStatus.GOOD),
                     key=lambda c: (c.revoked_at or now, c.serial))
    device_certs = [c for c in snap.certificates if c.device_id]
    problems = verify_chain(snap.audit)
    return {
        "format": FORMAT,
        "generated_at": views.ts(now),
        "trust_domain": config.trust_domain,
        "issuing_ca": _ca_json(chain[0]),
        "root_ca": _ca_json(chain[-1]),
        "counts": {
            "devices": len(devices),
            "devices_by_status": dict(sorted(Counter(d["status"] for d in devices).items())),
            "devices_with_valid_identity": sum(1 for d in devices if d["identity_valid"]),
            "device_certificates": len(device_certs),
            "device_certificates_by_status": dict(sorted(Counter(c.status.value for c in device_certs).items())),
            "revocations": len(revoked),
        },
        "devices": devices,
        "revocations": [views.cert_json(c) for c in revoked],
        "audit": {"entries": len(snap.audit), "head": snap.audit[-1].hash if snap.audit else None,
                  "intact": not problems, "problems": problems[:10]},
        "policy": policy_json(config, snap.devices),
        "unverified_fields": list(UNVERIFIED_FIELDS),
        "notes": NOTES,
    }


def document_bytes(document: dict) -> bytes:
    """Deterministic JSON: sorted keys, UTF-8, two-space indent, one final newline."""
    return (json.dumps(document, sort_keys=True, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _flatten(value: dict, prefix: str = "") -> dict:
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flatten(item, f"{prefix}{key}."))
        else:
            out[prefix + key] = item
    return out


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # a spreadsheet runs a cell that starts like a formula (CSV injection): make it text
    return "'" + text if text.startswith(_CSV_FORMULA) else text


def csv_columns(config: CAConfig, now: datetime) -> list[str]:
    """The CSV header: the device entry's fields, nested ones as `current_certificate.serial`."""
    placeholder = CertRecord(serial=1, device_id="x", profile="device", not_before=now, not_after=now, der=b"")
    return list(_flatten(device_entry(Device(id="x", model="x", owner="x"), [placeholder], config, now)))


def csv_bytes(document: dict, columns: list[str]) -> bytes:
    """One row per device (RFC 4180, UTF-8, CRLF), the fields of `devices[]` flattened."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for entry in document["devices"]:
        flat = _flatten({**entry, "current_certificate": entry["current_certificate"] or {}})
        writer.writerow([_cell(flat.get(c)) for c in columns])
    return out.getvalue().encode("utf-8")


# -- signing and verifying (pure) ----------------------------------------------------------------

def sign(data: bytes, signer: service_certs.KeyedCert, issuing: x509.Certificate) -> bytes:
    """A detached CMS SignedData (DER) over exactly `data`, carrying the signer's certificate and
    the issuing CA's, so a verifier needs only the root. Signed attributes: contentType,
    signingTime, messageDigest, SMIMECapabilities (cryptography's PKCS7SignatureBuilder)."""
    return (pkcs7.PKCS7SignatureBuilder().set_data(data)
            .add_signer(signer.certificate, signer.key, hash_for(signer.key))
            .add_certificate(issuing)
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]))


def verify(data: bytes, signature: bytes, issuing: x509.Certificate) -> x509.Certificate:
    """The evidence signer certificate, once `signature` verifies over `data`, its signer was
    issued by `issuing` for document signing, and it was valid at the signing time. Revocation is
    not checked here (the CRL and OCSP say it). UnauthorizedError or BadRequestError otherwise."""
    try:
        info = asn1_cms.ContentInfo.load(bytes(signature), strict=True)
        if info["content_type"].dotted != "1.2.840.113549.1.7.2":
            raise ValueError(f"content type {info['content_type'].dotted}")
        info["content"]["encap_content_info"]["content"] = bytes(data)
        attached = info.dump(force=True)
        # ca/cms.py checks one signer, the signer certificate in the set, contentType and
        # messageDigest of the (re-attached) content, and the signature; its size limit is for
        # renewal requests, not for documents, hence _verify
        signed = cms._verify(attached)
    except UnauthorizedError:
        raise UnauthorizedError("the signature does not verify over these bytes: the document was changed, or "
                                "the signature is of another one") from None
    except cms._PARSE_ERRORS as exc:
        raise BadRequestError(f"the signature is not a CMS SignedData: {exc}") from exc
    cert = signed.signer
    try:
        cert.verify_directly_issued_by(issuing)
    except (ValueError, TypeError, InvalidSignature):
        raise UnauthorizedError("the signer certificate was not issued by this CA's issuing CA") from None
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = []
    if DOCUMENT_SIGNING not in usages:
        raise UnauthorizedError("the signer certificate is not for document signing (RFC 9336)")
    when = signed.signing_time
    if when is not None and not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise UnauthorizedError(f"signed at {when.isoformat()}, outside the signer certificate's validity")
    return cert


# -- the export: read, sign, audit ---------------------------------------------------------------

@dataclass(frozen=True)
class Export:
    document: dict
    body: bytes                     # exactly what is handed out
    sha256: str                     # of `body`, hex
    signature: bytes | None         # detached CMS (DER) over `body`, for the signed formats
    signer: x509.Certificate | None


async def signing_certificate(authority: "Authority", now: datetime | None = None) -> service_certs.KeyedCert:
    """The evidence signer (private/evidence-signer.pem), made on first use and renewed when due
    (ca/service_certs.py keyed_certificate). CMS signing in cryptography takes RSA and EC keys: a
    CA of Ed25519 keys gets an EC P-256 evidence signer."""
    config = authority.config
    key_type = "ec-p256" if config.key_type == "ed25519" else config.key_type
    names = service_names(f"{config.trust_domain} evidence signer", config.trust_domain, "ca/evidence")
    return await service_certs.keyed_certificate(authority, authority.paths.evidence_signer, PROFILE, names,
                                                 key_type=key_type, actor=SIGNER_ACTOR, now=now)


async def snapshot(authority: "Authority") -> Snapshot:
    async with authority.store.read() as tx:
        devices = await tx.list_devices()
        certificates = await tx.list_certificates()
        rows = await tx.audit_rows()   # last: every change read above has its entry in these
    return Snapshot(devices, certificates, rows)


async def export(authority: "Authority", *, actor: str, fmt: str = "json",
                 encode: Callable[[dict], bytes] | None = None) -> Export:
    """Build the document now and hand it out as `fmt`: "json" and "csv" are encoded here and
    signed; any other format (the console's printable page) needs `encode` and is not signed.
    Every export is audited (`evidence_exported`: format, SHA-256, device count, and for the
    signed ones the signature and its signer) before it is returned."""
    if fmt not in SIGNED_FORMATS and encode is None:
        raise BadRequestError(f"unknown evidence format {fmt!r}; one of {', '.join(SIGNED_FORMATS)}")
    now = authority.now()
    snap = await snapshot(authority)
    document = await asyncio.to_thread(build_document, snap, authority.config, authority.issuer.chain, now)
    if fmt == "json":
        body = await asyncio.to_thread(document_bytes, document)
    elif fmt == "csv":
        body = await asyncio.to_thread(csv_bytes, document, csv_columns(authority.config, now))
    else:
        body = encode(document)
    digest = hashlib.sha256(body).hexdigest()
    detail = {"format": fmt, "sha256": digest, "devices": len(document["devices"])}
    signature = signer = None
    if fmt in SIGNED_FORMATS:
        keyed = await signing_certificate(authority, now)
        signature = await asyncio.to_thread(sign, body, keyed, authority.issuer.certificate)
        signer = keyed.certificate
        detail.update(signer=serial_hex(signer.serial_number), signature=base64.b64encode(signature).decode())
    async with authority.store.write() as tx:
        await tx.append_audit(AuditEvent(ACTION, actor, detail=detail), now)
    log.info("evidence exported format=%s sha256=%s devices=%d actor=%s", fmt, digest, detail["devices"], actor)
    return Export(document, body, digest, signature, signer)


async def signature_for(authority: "Authority", sha256: str) -> bytes:
    """The detached signature of the export whose bytes have this SHA-256 (hex), from its audit entry."""
    wanted = (sha256 or "").strip().lower()
    if not _SHA256_RE.fullmatch(wanted):
        raise BadRequestError("sha256 must be the 64 hex digits of the exported file's SHA-256 "
                              "(sha256sum evidence.json)")
    async with authority.store.read() as tx:
        rows = await tx.audit_rows(actions=(ACTION,))
    for row in reversed(rows):
        detail = json.loads(row.detail) if row.detail else {}
        if detail.get("sha256") == wanted and detail.get("signature"):
            return base64.b64decode(detail["signature"])
    raise NotFoundError(f"no signed evidence export has SHA-256 {wanted}")
