"""The evidence export end to end: a real `iomtca serve`, an auditor's API token made by the real
CLI, curl as the client and the real `openssl cms -verify` as the judge of the signature."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re

from tests.console.test_console_api import api, enrolled, srv, tokens  # noqa: F401 (fixtures)
from tests.enroll.conftest import run

AUDITOR = "operator:op-auditor:auditor"


def verify(srv, document, signature, *extra: str, trust=None):
    """The command docs/EVIDENCE.md gives the auditor; the files as curl saved them."""
    content, sig = srv.ca.write("evidence.json", document), srv.ca.write("evidence.json.sig", signature)
    return run(["openssl", "cms", "-verify", "-binary", "-content", content, "-inform", "DER", "-in", sig,
                "-CAfile", trust or srv.ca.root, "-purpose", "any", "-out", "/dev/null", *extra], check=False)


def fetch_pair(srv, token):
    """The document, then its signature by the SHA-256 of the bytes received."""
    document = api(srv, "/api/v1/evidence", token=token)
    assert document.status == 200, document
    digest = hashlib.sha256(document.body).hexdigest()
    signature = api(srv, f"/api/v1/evidence.sig?sha256={digest}", token=token)
    assert signature.status == 200, signature
    return document, signature, digest


def exports(ca) -> int:
    return len(ca.audit("evidence_exported"))


def test_an_auditor_downloads_the_export_and_its_signature_and_openssl_accepts_only_the_unedited_copy(
        srv, tokens, tools):
    ca = srv.ca
    device, serial, _ = enrolled(srv, ca, "pump")
    gone, gone_serial, _ = enrolled(srv, ca, "monitor")
    ca.revoke(gone_serial, "keyCompromise")

    document, signature, digest = fetch_pair(srv, tokens["auditor"])
    assert document.header("content-type").startswith("application/json"), document
    assert signature.header("content-type") == "application/pkcs7-signature", signature
    assert re.fullmatch(r"sha-256=:[A-Za-z0-9+/]+=*:", document.header("repr-digest") or ""), document

    ok = verify(srv, document.body, signature.body)
    assert ok.returncode == 0 and "Verification successful" in ok.stderr, ok.stderr
    edited = document.body.replace(f'"serial": "{serial}"'.encode(), f'"serial": "{gone_serial}"'.encode(), 1)
    assert edited != document.body
    bad = verify(srv, edited, signature.body)
    assert bad.returncode != 0 and "Verification failure" in bad.stderr, bad.stderr

    # the signer is revocable and not revoked: the CRL from the responder listener, with -crl_check
    crl = srv.plain("/crl")
    assert crl.status == 200, crl
    crl_pem = tools.run(["openssl", "crl", "-inform", "DER", "-in", ca.write("crl.der", crl.body)]).stdout
    trust = ca.write("root-and-crl.pem", ca.root.read_bytes() + crl_pem.encode())
    checked = verify(srv, document.body, signature.body, "-crl_check", trust=trust)
    assert checked.returncode == 0, checked.stderr

    doc = json.loads(document.body)
    devices = {d["device_id"]: d for d in doc["devices"]}
    assert devices[device]["current_certificate"]["serial"] == serial
    assert devices[device]["current_certificate"]["status"] == "good" and devices[device]["identity_valid"]
    assert devices[gone]["current_certificate"]["status"] == "revoked"
    [revocation] = [r for r in doc["revocations"] if r["serial"] == gone_serial]
    assert revocation["reason"] == "keyCompromise" and revocation["device_id"] == gone and revocation["revoked_at"]
    assert doc["audit"]["intact"] is True and re.fullmatch(r"[0-9a-f]{64}", doc["audit"]["head"])
    assert doc["trust_domain"] == tools.TRUST_DOMAIN

    [entry] = [e for e in ca.audit("evidence_exported") if e["detail"]["sha256"] == digest]
    assert entry["actor"] == AUDITOR and entry["detail"]["devices"] == len(doc["devices"])


def test_the_csv_has_a_row_per_device_and_is_signed_too(srv, tokens, tools):
    enrolled(srv, srv.ca, "pump")
    token = tokens["engineer"]   # any role from auditor up may export
    reply = api(srv, "/api/v1/evidence?format=csv", token=token)
    assert reply.status == 200 and reply.header("content-type").startswith("text/csv"), reply
    assert re.search(r'filename="evidence-\d{8}T\d{6}Z\.csv"', reply.header("content-disposition") or ""), reply
    rows = list(csv.DictReader(io.StringIO(reply.text)))
    listed = json.loads(api(srv, "/api/v1/devices?limit=500", token=token).body)["devices"]
    assert sorted(r["device_id"] for r in rows) == sorted(d["device_id"] for d in listed) and rows
    assert {"current_certificate.serial", "current_certificate.not_after", "reported_firmware",
            "policy.renewal_grace"} <= set(rows[0])
    sig = api(srv, f"/api/v1/evidence.sig?sha256={hashlib.sha256(reply.body).hexdigest()}", token=token)
    assert sig.status == 200, sig
    assert verify(srv, reply.body, sig.body).returncode == 0


def test_the_printable_page_renders_the_devices_under_the_strict_csp(srv, tokens):
    device, serial, _ = enrolled(srv, srv.ca, "infusion")
    before = exports(srv.ca)
    page = api(srv, "/evidence", token=tokens["auditor"])
    assert page.status == 200 and page.header("content-type").startswith("text/html"), page
    assert "default-src 'none'" in (page.header("content-security-policy") or ""), page
    assert device in page.text and serial in page.text
    assert "Reported firmware (unverified)" in page.text
    assert "<script" not in page.text and "style=" not in page.text and "<style" not in page.text
    assert exports(srv.ca) == before + 1
    assert srv.ca.audit("evidence_exported")[-1]["detail"]["format"] == "html"


def test_nobody_gets_401_and_bad_requests_get_a_reason(srv, tokens):
    before = exports(srv.ca)
    for path in ("/api/v1/evidence", "/api/v1/evidence?format=csv", "/api/v1/evidence.sig?sha256=" + "0" * 64):
        reply = api(srv, path)
        assert reply.status == 401 and json.loads(reply.body)["code"] == "unauthorized", reply
    page = srv.curl(srv.console + "/evidence", "--cacert", srv.ca.root)
    assert page.status == 303 and page.header("location") == "/login", page
    assert exports(srv.ca) == before   # nothing left the CA

    token = tokens["auditor"]
    for path, status in (("/api/v1/evidence?format=xml", 400), ("/api/v1/evidence.sig?sha256=abc", 400),
                         ("/api/v1/evidence.sig", 400), ("/api/v1/evidence.sig?sha256=" + "0" * 64, 404)):
        reply = api(srv, path, token=token)
        assert reply.status == status and json.loads(reply.body)["message"], reply
