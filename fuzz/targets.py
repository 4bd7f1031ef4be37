"""Fuzz targets: every byte parser an unauthenticated party can reach, each followed by what the CA
or the gateway does next with what it parsed.

A target takes bytes and either returns or raises one of its `EXPECTED` exceptions (for the server
side: `CAError`, which the edges turn into a 4xx or a protocol error code). Anything else escaping
a target is a finding: at an edge it would be a 500, a traceback, or a gateway task restarting.

The targets are pure (no I/O, no event loop): the same functions the handlers call, on the same
inputs, so a finding here is a finding there. `fuzz/run.py` runs them under atheris; tests/fuzz
replays the regression corpus and runs a short smoke of each.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from types import SimpleNamespace
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from ca import cms, idevid, issuance, ocsp, policy, profiles
from ca.codec import b64decode_strict, load_csr, posture_json
from ca.errors import CAError
from ca.model import CertStatus, Device, DeviceStatus
from ca.signer import KeySigner, generate_key
from common.ids import check_id
from enroll import codec as est_codec
from enroll import est, identity, idevid_crl, ra
from gateway import codec as mqtt_codec

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
TRUST_DOMAIN = "hospital.test"
DEVICE = Device(id="pump-0001", model="infusion-pump", owner="icu", status=DeviceStatus.ACTIVE, created_at=NOW)


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    what: str
    expected: tuple[type[BaseException], ...] = (CAError,)


class _PKI:
    """A throwaway issuing CA and OCSP responder, made on first use (keys take a moment)."""

    @cached_property
    def issuer(self) -> issuance.IssuerContext:
        key = generate_key("ec-p256")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fuzz Issuing CA")])
        cert = issuance.build_certificate(public_key=key.public_key(), subject=name, sans=[],
                                          profile=profiles.ROOT_CA, issuer=None, serial=issuance.new_serial(),
                                          now=NOW, signer=KeySigner(key))
        return issuance.IssuerContext(cert, KeySigner(key), (cert,), crl_url="http://ca.test/crl",
                                      ocsp_url="http://ca.test/ocsp")

    @cached_property
    def idevid(self) -> x509.Certificate:
        """An IEEE 802.1AR IDevID as the throwaway CA, playing a manufacturer, would issue it."""
        key = generate_key("ec-p256")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fuzz Pump"),
                          x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0001")])
        return (x509.CertificateBuilder().subject_name(name).issuer_name(self.issuer.certificate.subject)
                .public_key(key.public_key()).serial_number(4242).not_valid_before(NOW - timedelta(days=1))
                .not_valid_after(NOW + timedelta(days=3650))
                .sign(self.issuer.signer.private_key, hashes.SHA256()))


PKI = _PKI()


def examine_csr(csr: x509.CertificateSigningRequest) -> None:
    """What issuance does with a CSR from a device: every check, then build and sign."""
    est._serverkeygen_type(csr)
    key = issuance.proven_key(csr)
    try:   # the challengePassword a channel-bound profile reads (RFC 7030 3.5)
        policy.channel_bound(csr, "fuzz-binding")
    except CAError:
        pass
    issuance.issue_device_certificate(csr, DEVICE, profiles.DEVICE, PKI.issuer, trust_domain=TRUST_DOMAIN,
                                      serial=issuance.new_serial(), now=NOW, checked_key=key)


def est_csr_body(data: bytes) -> None:
    """The body of POST /.well-known/est/simpleenroll|serverkeygen (base64 DER, or PEM)."""
    examine_csr(est_codec.decode_csr_body(data))


def csr_der(data: bytes) -> None:
    """A DER or PEM PKCS#10 request as the RA API and the MQTT contract carry it (after base64)."""
    examine_csr(load_csr(data))


def certs_only(data: bytes) -> None:
    """A base64 certs-only PKCS#7 (what EST answers; the simulator and the gateway read it)."""
    for cert in est_codec.decode_certs_only(data):
        cert.subject.rfc4514_string()
        cert.serial_number


def cms_request(data: bytes) -> None:
    """A CMS SignedData renewal or posture request (EST re-enrollment over MQTT, signed posture)."""
    signed = cms.verify_signed_request(data)
    signed.signer.subject.rfc4514_string()
    if signed.csr_der is not None:
        try:
            examine_csr(load_csr(signed.csr_der))
        except CAError:
            posture_json(signed.csr_der)   # a posture's content is JSON, not a CSR


def ocsp_request(data: bytes) -> None:
    """A DER OCSP request (POST /ocsp), answered as the responder answers it."""
    query = ocsp.parse_request(data)
    ocsp.is_for_issuer(query, PKI.issuer.certificate)
    ocsp.build_response(serial=query.serial, answer=ocsp.OCSPAnswer(CertStatus.GOOD),
                        issuer_cert=PKI.issuer.certificate, responder_cert=PKI.issuer.certificate,
                        responder_signer=PKI.issuer.signer, this_update=NOW, next_update=NOW + timedelta(hours=1),
                        hash_algorithm=query.hash_algorithm, nonce=query.nonce)


def ocsp_get_path(data: bytes) -> None:
    """The GET form: the last path segment, base64 of the DER request (RFC 6960 A.1)."""
    ocsp_request(b64decode_strict(data.decode("latin-1"), "OCSP request"))


def serverkeygen_multipart(data: bytes) -> None:
    """The multipart serverkeygen answer as a device reads it: the first line is its Content-Type."""
    content_type, _, body = data.partition(b"\n")
    key, cert = est_codec.decode_serverkeygen(body, content_type.decode("latin-1"))
    cert.serial_number


_OPS = ("simpleenroll", "simplereenroll", "posture", "cacerts", "csrattrs", "bogus")


def mqtt_request(data: bytes) -> None:
    """A request payload on iomt/v1/dev/<id>/req/<op>: the first byte picks the op. What the gateway
    parses, then what the CA does with its fields (base64, CSR, CMS)."""
    if not data:
        return
    op, payload = _OPS[data[0] % len(_OPS)], data[1:]
    mqtt_codec.read_id(payload)
    request = mqtt_codec.parse_request(DEVICE.id, op, payload)
    if op == "simpleenroll":
        examine_csr(load_csr(b64decode_strict(request.fields["csr"], "csr")))
    elif op in ("simplereenroll", "posture"):
        cms_request(b64decode_strict(request.fields["cms"], "cms"))


def mqtt_report(data: bytes) -> None:
    """An unsigned posture report (iomt/v1/dev/<id>/posture): JSON, stored as reported."""
    posture_json(data)


def ra_json(data: bytes) -> None:
    """A JSON body of the RA API (single calls and the batch envelope), parsed as the handlers do."""
    body = ra.parse_json(data)
    items = body.get("requests")
    for item in items if isinstance(items, list) else [body]:
        if not isinstance(item, dict):
            continue
        try:
            check_id(str(item.get("device_id", DEVICE.id)))
            ra._request_id(item)
            examine_csr(load_csr(b64decode_strict(ra.string_field(item, "csr"), "csr")))
        except CAError:
            pass
        if isinstance(item.get("cms"), str):
            cms_request(b64decode_strict(item["cms"], "cms"))


def basic_header(data: bytes) -> None:
    """The Authorization header of an EST request, as aiohttp hands it over (UTF-8, surrogate-escaped)."""
    value = data.decode("utf-8", "surrogateescape")
    if "\r" in value or "\n" in value:   # no HTTP parser lets these through into a header value
        return
    identity.basic_credentials(SimpleNamespace(headers={"Authorization": value}))   # all it reads


def manufacturer_crl(data: bytes) -> None:
    """A manufacturer's CRL as `[[enroll.idevid]] crl_url` fetches it (over plain HTTP, anyone on
    the path can answer): accepted or refused as the server does, then an IDevID checked against it."""
    crl = idevid_crl._accept(data, [PKI.issuer.certificate])
    idevid.check_revocation(PKI.idevid, PKI.issuer.certificate, [PKI.issuer.certificate], [crl], NOW, "Fuzz Maker")


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("est_csr_body", est_csr_body, "EST simpleenroll/serverkeygen body: base64 DER or PEM PKCS#10"),
    Target("csr_der", csr_der, "DER/PEM PKCS#10 as the RA API and MQTT carry it"),
    Target("certs_only", certs_only, "base64 certs-only PKCS#7"),
    Target("cms_request", cms_request, "CMS SignedData renewal and posture requests"),
    Target("ocsp_request", ocsp_request, "DER OCSP request (POST)"),
    Target("ocsp_get_path", ocsp_get_path, "OCSP GET path form (base64 of the DER request)"),
    Target("serverkeygen_multipart", serverkeygen_multipart, "serverkeygen multipart answer, as a device reads it"),
    Target("mqtt_request", mqtt_request, "MQTT request payloads of every operation, and their fields"),
    Target("mqtt_report", mqtt_report, "MQTT unsigned posture report"),
    Target("ra_json", ra_json, "RA API JSON bodies, single and batch"),
    Target("basic_header", basic_header, "EST HTTP Basic Authorization header"),
    Target("manufacturer_crl", manufacturer_crl, "a manufacturer CRL fetched from crl_url (PEM or DER)",
           expected=(CAError, idevid.CRLError)),
]}


def check(target: Target, data: bytes) -> None:
    """Run one input; an exception that is not `expected` propagates (a finding)."""
    try:
        target.run(data)
    except target.expected:
        pass
