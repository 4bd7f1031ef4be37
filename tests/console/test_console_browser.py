"""The console in a real browser: Playwright driving Debian's chromium (never a downloaded
browser) against a real `iomtca serve`. One walk through what the issue asks for: log in, onboard a
device and read its token, import a CSV with one bad row and see the error, enroll the device over
EST, see it with its certificate, revoke it as `security` and see OCSP say revoked, an auditor
without a revoke button (and 403 from the API), the evidence page and its signature checked by
openssl. No page may trip the Content-Security-Policy.

Screenshots of every page are taken on the way; `IOMTCA_SCREENSHOTS=DIR` keeps them there (`make
screenshots` writes docs/console/), otherwise they go to the test's scratch directory.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.console.test_console_api import PASSWORD, api, ocsp_status, tokens  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed "
                                "(make deps installs it)")
playwright = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("console-browser")


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


@pytest.fixture(scope="module")
def shots(srv) -> Path:
    target = Path(os.environ.get("IOMTCA_SCREENSHOTS") or srv.ca.work / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def spki_hash(cert_pem: Path) -> str:
    """What chromium's --ignore-certificate-errors-spki-list takes: only our server's key is let
    through (the browser has no way to be told about our root without touching the system's)."""
    cert = x509.load_pem_x509_certificates(cert_pem.read_bytes())[0]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def browser(srv):
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic",
            f"--ignore-certificate-errors-spki-list={spki_hash(srv.ca.home / 'server.pem')}"])
        yield b
        b.close()


class Session:
    """One operator's browser context, collecting every console message (CSP violations land there)."""

    def __init__(self, browser, srv, shots: Path, role: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.messages: list[str] = []
        self.page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        self.srv, self.shots, self.role = srv, shots, role

    def go(self, path: str):
        response = self.page.goto(self.srv.console + path)
        assert response is not None
        return response

    def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5000, path   # a rendered page, not a blank one

    def login(self) -> None:
        self.go("/login")
        self.page.get_by_label("Operator name").fill(f"op-{self.role}")
        self.page.get_by_label("Password").fill(PASSWORD)
        self.page.get_by_role("button", name="Log in").click()
        self.page.wait_for_url(self.srv.console + "/")
        assert self.page.get_by_role("heading", name="Overview").is_visible()

    def close(self) -> None:
        csp = [m for m in self.messages if "Content Security Policy" in m or "Refused to" in m]
        self.context.close()
        assert csp == [], csp


def test_the_console_walk_through(srv, ca, browser, tokens, shots, tools):
    engineer = Session(browser, srv, shots, "engineer")
    engineer.go("/login")
    engineer.shot("login")
    engineer.login()

    # onboard one device: its token, shown once, with a QR code
    device = ca.unique("pump")
    engineer.go("/onboard")
    engineer.page.get_by_label("Device id (required)").fill(device)
    engineer.page.get_by_label("Model (required)").fill("infusion-pump")
    engineer.page.get_by_label("Owner (required)").fill("icu")
    engineer.page.get_by_label("Location").fill("ICU bed 9")
    engineer.shot("onboard")
    engineer.page.get_by_role("button", name="Register and make a one-time token").click()
    token = engineer.page.locator("code.token").inner_text()
    qr = engineer.page.get_by_role("img", name=re.compile("QR code"))
    assert qr.is_visible() and qr.evaluate("img => img.naturalWidth") > 0
    engineer.shot("token")

    # a CSV with one bad row: the error by its line, nothing imported
    bad = ca.unique("mon")
    engineer.go("/import")
    engineer.page.get_by_label("or paste it here").fill(
        f"device_id,model,owner\n{ca.unique('mon')},monitor,ward-1\n{bad},monitor,\n")
    engineer.page.get_by_role("button", name="Check the list").click()
    assert "line 3: owner is required" in engineer.page.locator("li.error").all_inner_texts()
    engineer.shot("import-errors")
    assert api(srv, f"/api/v1/devices/{bad}", token=tokens["auditor"]).status == 404

    # the device enrolls over EST with the token the page showed, and the console shows the certificate
    issued = srv.enroll(device, token)
    engineer.go(f"/devices/{device}")
    assert engineer.page.get_by_text(issued.serial_hex, exact=True).is_visible()
    engineer.go(f"/devices?q={device}")
    assert engineer.page.get_by_role("link", name=device).is_visible()
    engineer.shot("devices")
    engineer.close()

    # security revokes it, with a reason and a confirmation; OCSP says revoked
    security = Session(browser, srv, shots, "security")
    security.login()
    security.go(f"/devices/{device}")
    security.shot("device")
    security.page.get_by_role("link", name="Revoke").click()
    security.page.get_by_label("Reason").select_option("keyCompromise")
    security.page.get_by_label("I confirm").check()
    security.shot("revoke-confirm")
    security.page.get_by_role("button", name="Revoke").click()
    security.page.wait_for_url(srv.console + f"/devices/{device}")
    assert security.page.locator("td", has_text="keyCompromise").is_visible()
    assert ": revoked" in ocsp_status(srv, ca, tools, issued)
    security.go("/approvals")
    security.shot("approvals")
    security.close()

    # an auditor: no revoke button, 403 from the API; the audit page and the evidence
    auditor = Session(browser, srv, shots, "auditor")
    auditor.login()
    other = ca.unique("ct")
    other_cert = srv.enroll(other, ca.add_device(other))
    auditor.go(f"/devices/{other}")
    assert auditor.page.get_by_role("link", name="Revoke").count() == 0
    assert auditor.page.get_by_role("link", name="Operators").count() == 0   # accounts are the admin's
    denied = api(srv, f"/api/v1/certificates/{other_cert.serial_hex}/revoke", "-X", "POST", "-H",
                 "Content-Type: application/json", "--data-binary", '{"reason": "keyCompromise"}', token=tokens["auditor"])
    assert denied.status == 403
    auditor.go("/")
    assert auditor.page.get_by_role("img", name="Enrollments and renewals per hour, last 7 days").is_visible()
    auditor.shot("overview")   # with the walk's devices and certificates in it
    auditor.go("/audit")
    assert auditor.page.get_by_text("Hash chain: intact").is_visible()
    auditor.shot("audit")
    auditor.go("/evidence")
    assert auditor.page.get_by_text(device).first.is_visible()
    auditor.shot("evidence")
    auditor.page.emulate_media(media="print")   # printed, the page is the evidence, not the console around it
    assert auditor.page.locator("header nav").is_hidden() and auditor.page.get_by_text(device).first.is_visible()
    auditor.page.emulate_media(media="screen")
    auditor.close()

    # an admin adds an account: the generated password, shown once, logs in
    admin = Session(browser, srv, shots, "admin")
    admin.login()
    admin.page.get_by_role("link", name="Operators").click()
    newcomer = ca.unique("nurse").lower()
    admin.page.get_by_label("Name (lowercase letters, digits, '.', '_', '-')").fill(newcomer)
    admin.page.get_by_label("Role").select_option("engineer")
    admin.shot("operators")
    admin.page.get_by_role("button", name="Add operator").click()
    password = admin.page.locator("code.token").inner_text()
    admin.go(f"/operators/{newcomer}")
    assert admin.page.get_by_role("heading", name=f"Operator {newcomer}").is_visible()
    admin.shot("operator")
    admin.close()
    first = Session(browser, srv, shots, "engineer")
    first.go("/login")
    first.page.get_by_label("Operator name").fill(newcomer)
    first.page.get_by_label("Password").fill(password)
    first.page.get_by_role("button", name="Log in").click()
    first.page.wait_for_url(srv.console + "/")
    first.page.get_by_role("link", name=re.compile(f"{newcomer} \\(engineer\\)")).click()
    assert first.page.get_by_role("heading", name="Your account").is_visible()
    first.close()

    document = api(srv, "/api/v1/evidence", token=tokens["auditor"])
    assert document.status == 200 and any(d["device_id"] == device for d in json.loads(document.body)["devices"])
    digest = hashlib.sha256(document.body).hexdigest()
    signature = api(srv, f"/api/v1/evidence.sig?sha256={digest}", token=tokens["auditor"])
    doc_path, sig_path = ca.work / "evidence.json", ca.work / "evidence.json.sig"
    doc_path.write_bytes(document.body)
    sig_path.write_bytes(signature.body)
    tools.run(["openssl", "cms", "-verify", "-binary", "-content", doc_path, "-inform", "DER", "-in", sig_path,
               "-CAfile", ca.root, "-purpose", "any", "-out", "/dev/null"])
