"""pkilint (DigiCert's RFC 5280 / RFC 6960 linter) judges what the CA emits.

Everything is linted through pkilint's own command line tools with JSON
output. Findings of severity INFO and NOTICE are fine. ERROR, WARNING and FATAL
fail the test, except two known false positives, each allowed only for the
exact value we expect (see `JUSTIFIED`):

* pkix.invalid_uri_syntax on our spiffe:// SANs. pkilint checks URIs with the
  `validators` package, whose URL pattern only accepts web-style schemes
  (http, https, ftp, ...); spiffe://trust-domain/path is a valid RFC 3986 URI
  and the SPIFFE X.509-SVID format requires it as the one URI SAN. We check it
  against RFC 3986 and the SPIFFE ID rules ourselves (`check_spiffe_id`).
* pkix.invalid_domain_name_syntax for "localhost" in the enrollment server
  certificate. pkilint wants a dotted public-style domain name; "localhost" is
  a valid DNS label (RFC 1123) and the server certificate must name it so
  clients on the same host can connect.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from ca.signer import KEY_TYPES

pytest.importorskip("pkilint", reason="pkilint is not installed (pip install -e '.[test]')")

BIN = Path(sys.executable).parent
BAD_SEVERITIES = {"FATAL", "ERROR", "WARNING"}

# RFC 3986 section 3, for a URI of the form scheme "://" reg-name path-abempty (no port,
# userinfo, query or fragment; SPIFFE forbids them anyway).
_UNRESERVED = r"A-Za-z0-9\-._~"
_SUB_DELIMS = r"!$&'()*+,;="
_PCT = r"%[0-9A-Fa-f]{2}"
RFC3986_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
RFC3986_REG_NAME = re.compile(rf"(?:[{_UNRESERVED}{_SUB_DELIMS}]|{_PCT})*")
RFC3986_PATH_ABEMPTY = re.compile(rf"(?:/(?:[{_UNRESERVED}{_SUB_DELIMS}:@]|{_PCT})*)*")
# SPIFFE ID (spiffe/standards SPIFFE-ID.md section 2): lowercase scheme "spiffe", trust domain of
# [a-z0-9.-_], path segments of [a-zA-Z0-9.-_], no empty, "." or ".." segments, no trailing "/".
SPIFFE_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def check_spiffe_id(uri: str, trust_domain: str) -> None:
    """Assert `uri` is an RFC 3986 URI and a SPIFFE ID in `trust_domain`."""
    scheme, sep, rest = uri.partition("://")
    assert sep == "://", uri
    assert RFC3986_SCHEME.fullmatch(scheme) and scheme == "spiffe", uri
    authority, slash, path = rest.partition("/")
    path = slash + path
    assert RFC3986_REG_NAME.fullmatch(authority), f"authority of {uri} is not an RFC 3986 reg-name"
    assert RFC3986_PATH_ABEMPTY.fullmatch(path), f"path of {uri} is not RFC 3986 path-abempty"
    assert SPIFFE_TRUST_DOMAIN.fullmatch(authority) and authority == trust_domain, uri
    assert path.startswith("/") and not path.endswith("/"), uri
    for segment in path[1:].split("/"):
        assert SPIFFE_SEGMENT.fullmatch(segment) and segment not in (".", ".."), uri
    assert len(uri.encode()) <= 2048


@dataclass(frozen=True)
class Finding:
    validator: str
    node_path: str
    severity: str
    code: str
    message: str | None


def _findings(proc) -> list[Finding]:
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pkilint gave no JSON report (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return [Finding(r["validator"], r["node_path"], f["severity"], f["code"], f["message"])
            for r in doc["results"] for f in r["finding_descriptions"]]


@dataclass
class _Proc:
    returncode: int
    stdout: str
    stderr: str


def lint(sh, tool: str, *args) -> list[Finding]:
    """Run pkilint's console script `tool` in-process (the same `main` the executable calls,
    without a 0.2 s interpreter start per document); the tests marked `_is_a_real_judge`/
    `_is_live` run the installed executables themselves."""
    module = importlib.import_module(f"pkilint.bin.{tool}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main(["lint", "-f", "JSON", "-s", "INFO", *[str(a) for a in args]])
    return _findings(_Proc(rc, out.getvalue(), err.getvalue()))


def lint_cert(sh, path: Path) -> list[Finding]:
    return lint(sh, "lint_pkix_cert", "--document-format", "DER", path)


def lint_chain(sh, issuer: Path, subject: Path) -> list[Finding]:
    return lint(sh, "lint_pkix_signer_signee_cert_chain", "--document-format", "DER", issuer, subject)


def lint_crl(sh, path: Path) -> list[Finding]:
    return lint(sh, "lint_crl", "-t", "CRL", "-p", "PKIX", "--document-format", "DER", path)


def lint_ocsp(sh, path: Path) -> list[Finding]:
    return lint(sh, "lint_ocsp_response", "--document-format", "DER", path)


def der_file(ca, pem_bytes: bytes, name: str) -> tuple[Path, x509.Certificate]:
    cert = x509.load_pem_x509_certificate(pem_bytes)
    path = ca.work / f"{ca.unique(name)}.der"
    path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return path, cert


def sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def san_index(node_path: str) -> int | None:
    match = re.search(r"\.subjectAltName\.(\d+)\.", node_path)
    return int(match.group(1)) if match else None


def unjustified(findings: list[Finding], cert: x509.Certificate | None = None, *,
                trust_domain: str | None = None, allow_localhost: bool = False) -> list[Finding]:
    """The ERROR/WARNING/FATAL findings that are not one of the two justified false positives.

    A justified finding must point at the SAN entry it names and flag exactly the value
    that entry holds: our SPIFFE ID (then checked against RFC 3986/SPIFFE here) or "localhost".
    """
    sans = sans_of(cert) if cert is not None else []
    left = []
    for f in findings:
        if f.severity not in BAD_SEVERITIES:
            continue
        i = san_index(f.node_path)
        target = sans[i] if i is not None and i < len(sans) else None
        if (f.code == "pkix.invalid_uri_syntax" and f.validator == "GeneralNameUriSyntaxValidator"
                and f.node_path.endswith(".uniformResourceIdentifier")
                and isinstance(target, x509.UniformResourceIdentifier)
                and target.value.startswith("spiffe://")
                and f.message == f'Invalid URI syntax: "{target.value}"'):
            check_spiffe_id(target.value, trust_domain)
            continue
        if (allow_localhost and f.code == "pkix.invalid_domain_name_syntax"
                and f.validator == "GeneralNameDnsNameSyntaxValidator" and f.node_path.endswith(".dNSName")
                and target == x509.DNSName("localhost")
                and f.message == 'Invalid domain name syntax: "localhost"'):
            continue
        left.append(f)
    return left


# -- the checker of the justification is itself checked --------------------------


@pytest.mark.parametrize("uri", [
    "spiffe://iomt.local/device/pump-1", "spiffe://ward-3.hospital.example/ca/ocsp",
    "spiffe://iomt.local/ra/gateway", "spiffe://a_b.c-d/x/Y.z_-",
])
def test_spiffe_checker_accepts_valid_ids(uri):
    check_spiffe_id(uri, uri.split("/")[2])


@pytest.mark.parametrize("uri", [
    "https://iomt.local/device/x", "spiffe://IOMT.local/device/x", "spiffe://iomt.local",
    "spiffe://iomt.local/", "spiffe://iomt.local/device/", "spiffe://iomt.local//x", "spiffe://iomt.local/a/../b",
    "spiffe://iomt.local/a b", "spiffe://iomt.local:8443/x", "spiffe://user@iomt.local/x",
    "spiffe://iomt.local/x?q=1", "spiffe://iomt.local/x#f", "spiffe://iomt.local/p%41th",
])
def test_spiffe_checker_rejects_invalid_ids(uri):
    with pytest.raises(AssertionError):
        check_spiffe_id(uri, "iomt.local")


def test_pkilint_is_a_real_judge(ca, sh, foreign_ca, pem_first):
    """Negative controls: pkilint reports a chain break and an undecodable document."""
    foreign_root, _ = foreign_ca
    issuer_der, _ = der_file(ca, foreign_root.read_bytes(), "foreign-root")
    dev = ca.new_device_cert()
    codes = {f.code for f in lint_chain(sh, issuer_der, dev.leaf_der)}
    assert "pkix.signature_verification_failed" in codes
    truncated = ca.work / f"{ca.unique('truncated')}.der"
    truncated.write_bytes(dev.leaf_der.read_bytes()[:-40])
    proc = sh([BIN / "lint_pkix_cert", "lint", "-f", "JSON", "--document-format", "DER", truncated], check=False)
    assert proc.returncode != 0


# -- certificates ------------------------------------------------------------------


def test_device_cert(ca, sh):
    dev = ca.new_device_cert()
    findings = lint_cert(sh, dev.leaf_der)
    assert unjustified(findings, dev.cert, trust_domain=ca.trust_domain) == []
    # Whatever pkilint thinks of it, the one SAN is our SPIFFE ID and passes our own check.
    (san,) = sans_of(dev.cert)
    assert san.value == f"spiffe://{ca.trust_domain}/device/{dev.device_id}"
    check_spiffe_id(san.value, ca.trust_domain)
    # If pkilint flags the URI at all, it flags exactly our SPIFFE ID and nothing else.
    uri_findings = [f for f in findings if f.code == "pkix.invalid_uri_syntax"]
    assert all(f.message == f'Invalid URI syntax: "{san.value}"' for f in uri_findings)
    assert len(uri_findings) <= 1
    issuing_der, _ = der_file(ca, ca.issuing.read_bytes(), "issuing")
    assert unjustified(lint_chain(sh, issuing_der, dev.leaf_der)) == []


@pytest.mark.parametrize("which", ["root", "issuing", "ocsp", "server", "ra"])
def test_ca_and_service_certs(ca, sh, pem_first, which):
    path = {"root": ca.root, "issuing": ca.issuing, "ocsp": ca.ocsp_cert, "server": ca.server, "ra": ca.ra}[which]
    der, cert = der_file(ca, pem_first(path), which)
    findings = lint_cert(sh, der)
    assert unjustified(findings, cert, trust_domain=ca.trust_domain, allow_localhost=which == "server") == []
    if which == "server":
        # The issue asks for localhost as a SAN: it must be there, as a DNS name.
        assert x509.DNSName("localhost") in sans_of(cert)
        dns_findings = [f for f in findings if f.code == "pkix.invalid_domain_name_syntax"]
        assert [f.message for f in dns_findings] in ([], ['Invalid domain name syntax: "localhost"'])
    if which in ("ocsp", "ra"):
        (san,) = sans_of(cert)
        check_spiffe_id(san.value, ca.trust_domain)
    # Each is also a correct signee of its issuer.
    issuer = ca.root if which in ("root", "issuing") else ca.issuing
    issuer_der, _ = der_file(ca, issuer.read_bytes(), "issuer")
    assert unjustified(lint_chain(sh, issuer_der, der)) == []


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_key_type(ca_for_key_type, sh, key_type):
    kca = ca_for_key_type(key_type)
    dev = kca.new_device_cert()
    root_der, _ = der_file(kca, kca.root.read_bytes(), "root")
    issuing_der, issuing = der_file(kca, kca.issuing.read_bytes(), "issuing")
    ocsp_der, ocsp_cert = der_file(kca, kca.ocsp_cert.read_bytes(), "ocsp")
    for der, cert in ((root_der, None), (issuing_der, issuing), (ocsp_der, ocsp_cert), (dev.leaf_der, dev.cert)):
        assert unjustified(lint_cert(sh, der), cert, trust_domain=kca.trust_domain) == [], der
    for issuer, subject in ((root_der, issuing_der), (issuing_der, dev.leaf_der), (issuing_der, ocsp_der)):
        assert unjustified(lint_chain(sh, issuer, subject)) == [], subject
    assert unjustified(lint_crl(sh, kca.crl().der)) == []


# -- CRLs --------------------------------------------------------------------------


def test_empty_crl(fresh_ca, sh):
    crl = fresh_ca.crl()
    assert len(crl.crl) == 0   # really the empty case: no revokedCertificates
    assert unjustified(lint_crl(sh, crl.der)) == []


def test_crl_with_entries(ca, sh):
    for reason in ("keyCompromise", None, "superseded"):
        ca.revoke(ca.new_device_cert(), reason)
    ca.hold(ca.new_device_cert())
    crl = ca.crl()
    assert len(crl.crl) >= 4
    assert unjustified(lint_crl(sh, crl.der)) == []


def test_crl_linter_is_live(ca, sh):
    crl = ca.crl()
    broken = ca.work / f"{ca.unique('broken-crl')}.der"
    broken.write_bytes(crl.der.read_bytes()[:-20])
    proc = sh([BIN / "lint_crl", "lint", "-t", "CRL", "-p", "PKIX", "-f", "JSON", "--document-format", "DER",
               broken], check=False)
    assert proc.returncode != 0


# -- OCSP responses ----------------------------------------------------------------


@pytest.mark.parametrize("state", ["good", "revoked", "hold", "unknown"])
async def test_ocsp_response(ca, sh, state):
    if state == "unknown":
        target = 0x5EED_0000_0000_0000_0001   # never issued: ours are 159-bit random draws
    else:
        target = ca.new_device_cert()
        if state == "revoked":
            ca.revoke(target, "keyCompromise")
        elif state == "hold":
            ca.hold(target)
    _, resp = await ca.ocsp_roundtrip(target)
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    expected = {"good": ocsp.OCSPCertStatus.GOOD, "unknown": ocsp.OCSPCertStatus.UNKNOWN}.get(
        state, ocsp.OCSPCertStatus.REVOKED)
    assert parsed.certificate_status is expected
    assert unjustified(lint_ocsp(sh, resp)) == []


async def test_ocsp_linter_is_live(ca, sh):
    """Negative control: an error status (malformedRequest) carrying a response body is flagged."""
    _, resp = await ca.ocsp_roundtrip(ca.new_device_cert())
    good = resp.read_bytes()
    status = bytes.fromhex("0a0100")        # responseStatus ENUMERATED successful(0)
    assert good.count(status) >= 1 and good.index(status) <= 4
    bogus = ca.work / f"{ca.unique('bogus-ocsp')}.der"
    bogus.write_bytes(good.replace(status, bytes.fromhex("0a0101"), 1))
    proc = sh([BIN / "lint_ocsp_response", "lint", "-f", "JSON", "--document-format", "DER", bogus], check=False)
    assert "pkix.ocsp_error_response_has_response_body" in {f.code for f in _findings(proc)}
    assert unjustified(lint_ocsp(sh, resp)) == []
