"""The console's forms against a real `iomtca serve`, driven with curl as a browser without
JavaScript would: onboarding shows the token once with its QR code and the token enrolls over EST;
a CSV import is previewed with its errors by line and written only when clean and confirmed;
revoke, hold and release go through a confirmation with a reason; a role that may not sees no
button and is refused by the server anyway."""
from __future__ import annotations

import re
import urllib.parse

import pytest

from tests.console.test_console_api import PASSWORD, Browser, api, ocsp_status, tokens  # noqa: F401


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("console-pages", approval_criticality=["high"])


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


@pytest.fixture(scope="module")
def logged_in(srv, tokens):
    """A logged-in browser per role."""
    out = {}
    for role in ("auditor", "engineer", "security"):
        b = Browser(srv, f"pages-{role}")
        assert b.login(f"op-{role}", PASSWORD).status == 303
        out[role] = b
    return out


def form_post(browser, path: str, **fields):
    args = []
    for name, value in {"csrf": browser.csrf(), **fields}.items():
        args += ["--data-urlencode", f"{name}={value}"]
    return browser.post(path, *args)


def device_count(srv, tokens) -> int:
    return api(srv, "/api/v1/devices", token=tokens["auditor"]).json()["total"]


def test_onboarding_shows_the_token_once_with_a_qr_code_and_the_token_enrolls(srv, ca, logged_in, tools):
    b = logged_in["engineer"]
    device = ca.unique("pump")
    page = form_post(b, "/onboard", device_id=device, model="infusion-pump", owner="icu", location="ICU bed 3",
                     criticality="medium")
    assert page.status == 200, page
    token = re.search(r'<code class="token">([^<]+)</code>', page.text).group(1)
    qr = re.search(r'<img src="data:image/svg\+xml;charset=utf-8,([^"]+)"', page.text).group(1)
    assert "<svg" in urllib.parse.unquote(qr)
    issued = srv.enroll(device, token)
    ca.openssl_verify(issued.cert_path)
    shown = b.get(f"/devices/{device}")
    assert issued.serial_hex in shown.text and "ICU bed 3" in shown.text
    assert token not in shown.text   # the token is shown once, on the page that made it


def test_a_bad_form_is_answered_with_its_reason_and_nothing_registered(srv, ca, logged_in, tokens):
    before = device_count(srv, tokens)
    page = form_post(logged_in["engineer"], "/onboard", device_id="bad id!", model="x", owner="y")
    assert page.status == 400 and "device id" in page.text.lower(), page
    assert device_count(srv, tokens) == before


def test_a_csv_with_one_bad_row_is_previewed_with_the_error_and_nothing_is_written(srv, ca, logged_in, tokens):
    b = logged_in["engineer"]
    ids = [ca.unique("mon") for _ in range(3)]
    bad = ("device_id,model,owner,criticality\n"
           f"{ids[0]},monitor,icu,high\n{ids[1]},monitor,,low\n{ids[2]},monitor,ward-2,extreme\n")
    before = device_count(srv, tokens)
    page = form_post(b, "/import", csv_text=bad)
    assert page.status == 400, page
    errors = re.findall(r'<li class="error">([^<]+)</li>', page.text)
    assert errors == ["line 3: owner is required",
                      "line 4: criticality &#39;extreme&#39; is not one of low, medium, high"], errors
    assert device_count(srv, tokens) == before
    good = bad.replace(",monitor,,low", ",monitor,ward-1,low").replace("extreme", "medium")
    preview = form_post(b, "/import", csv_text=good)
    assert preview.status == 200 and "3 device(s) to import" in preview.text, preview
    assert device_count(srv, tokens) == before          # a preview writes nothing
    done = form_post(b, "/import", csv_text=good, confirm="yes")
    assert done.status == 200 and all(i in done.text for i in ids), done
    assert len(re.findall(r'<code class="token">', done.text)) == 3
    assert device_count(srv, tokens) == before + 3


def test_revoke_goes_through_a_confirmation_with_a_reason(srv, ca, logged_in, tools):
    device = ca.unique("vent")
    issued = srv.enroll(device, ca.add_device(device))
    b = logged_in["security"]
    serial = issued.serial_hex
    confirm = b.get(f"/certificates/{serial}/revoke")
    assert confirm.status == 200 and "keyCompromise" in confirm.text and 'name="confirm"' in confirm.text
    unconfirmed = form_post(b, f"/certificates/{serial}/revoke", reason="keyCompromise")
    assert unconfirmed.status == 400 and "confirmation" in unconfirmed.text
    assert ": good" in ocsp_status(srv, ca, tools, issued)
    done = form_post(b, f"/certificates/{serial}/revoke", reason="keyCompromise", confirm="yes")
    assert done.status == 303 and done.header("location") == f"/devices/{device}", done
    assert ": revoked" in ocsp_status(srv, ca, tools, issued)
    [entry] = ca.audit("certificate_revoked", device)
    assert entry["actor"] == "operator:op-security:security" and entry["detail"]["reason"] == "keyCompromise"


def test_hold_and_release_from_the_device_page(srv, ca, logged_in, tools):
    device = ca.unique("pump")
    issued = srv.enroll(device, ca.add_device(device))
    b = logged_in["security"]
    page = b.get(f"/devices/{device}")
    assert f"/certificates/{issued.serial_hex}/hold" in page.text
    assert form_post(b, f"/certificates/{issued.serial_hex}/hold", confirm="yes").status == 303
    overview = b.get("/").text
    held = re.search(r"Devices with a certificate on hold: (\d+)(.*?)</li>", overview, re.S)
    assert held and int(held.group(1)) >= 1 and f"/devices/{device}" in held.group(2), overview
    assert "certificateHold" in ocsp_status(srv, ca, tools, issued) or ": revoked" in ocsp_status(srv, ca, tools, issued)
    assert f"/certificates/{issued.serial_hex}/release" in b.get(f"/devices/{device}").text
    assert form_post(b, f"/certificates/{issued.serial_hex}/release", confirm="yes").status == 303
    assert ": good" in ocsp_status(srv, ca, tools, issued)


def test_an_auditor_sees_no_buttons_and_is_refused_by_the_server(srv, ca, logged_in, tools):
    device = ca.unique("ct")
    issued = srv.enroll(device, ca.add_device(device))
    b = logged_in["auditor"]
    page = b.get(f"/devices/{device}")
    assert page.status == 200 and issued.serial_hex in page.text
    assert "/revoke" not in page.text and "/decommission" not in page.text and "/onboard" not in page.text
    refused = form_post(b, f"/certificates/{issued.serial_hex}/revoke", reason="keyCompromise", confirm="yes")
    assert refused.status == 403 and "security" in refused.text, refused
    assert form_post(b, "/onboard", device_id=ca.unique("x"), model="m", owner="o").status == 403
    assert ": good" in ocsp_status(srv, ca, tools, issued)


def test_an_engineer_edits_and_decommissions_with_confirmation(srv, ca, logged_in):
    device = ca.unique("pump")
    ca.add_device(device)
    b = logged_in["engineer"]
    assert form_post(b, f"/devices/{device}/edit", location="Ward 7", firmware="3.1.0").status == 303
    shown = ca.device(device)
    assert shown["location"] == "Ward 7" and shown["firmware"] == "3.1.0"
    assert "operator:op-engineer:engineer" in [e["actor"] for e in ca.audit("device_edited", device)]
    assert form_post(b, f"/devices/{device}/decommission").status == 400
    assert form_post(b, f"/devices/{device}/decommission", confirm="yes").status == 303
    assert ca.device(device)["status"] == "decommissioned"


def test_a_waiting_enrollment_is_approved_from_the_approvals_page(srv, ca, logged_in, tools):
    device = ca.unique("vent")
    token = ca.add_device(device, criticality="high")
    key, csr = ca.make_csr(device)
    body = tools.b64_body(csr.read_bytes())
    assert srv.est_post("simpleenroll", body, user=(device, token)).status == 202
    page = logged_in["security"].get("/approvals")
    fingerprint = re.search(rf'/approvals/{device}/approve".*?name="fingerprint" value="([0-9a-f]{{64}})"',
                            page.text, re.S).group(1)
    assert "approve" not in logged_in["auditor"].get("/approvals").text.lower().split("<main>")[1].replace(
        "approval", "")
    assert form_post(logged_in["security"], f"/approvals/{device}/approve", fingerprint=fingerprint).status == 303
    approved = srv.est_post("simpleenroll", body, user=(device, token))
    assert approved.status == 200, approved


def test_device_filters_paging_and_the_csv_of_the_filter(srv, ca, logged_in, tokens):
    b = logged_in["auditor"]
    stem = ca.unique("ward9")
    ids = [f"{stem}-{n:02d}" for n in range(60)]
    ca.iomtca("device", "import", str(ca.write("ward9.csv", ("device_id,model,owner,location\n" + "".join(
        f"{i},monitor,ward-9,{stem}\n" for i in ids)).encode())), "--tokens-out", str(ca.work / "w9-tokens.csv"))
    enrolled = srv.enroll(ids[0], next(line.split(",")[1] for line in (ca.work / "w9-tokens.csv").read_text().splitlines()
                                        if line.startswith(ids[0] + ",")))
    first = b.get(f"/devices?location={stem}")
    assert "60 device(s), 1 to 50 shown" in first.text and "Next page" in first.text and "Previous page" not in first.text
    second = b.get(f"/devices?location={stem}&offset=50")
    assert "51 to 60 shown" in second.text and "Previous page" in second.text and "Next page" not in second.text
    assert all(i in first.text + second.text for i in ids)
    # expiring within a day: none (certificates last longer); within a year: the one enrolled
    assert "0 device(s)" in b.get(f"/devices?location={stem}&expiring=1h").text
    soon = b.get(f"/devices?location={stem}&expiring=365d")
    assert "1 device(s)" in soon.text and ids[0] in soon.text
    # never proven contact: all but the one that enrolled
    assert "59 device(s)" in b.get(f"/devices?location={stem}&absent=1d").text
    assert b.get(f"/devices?location={stem}&absent=soon").status == 400
    exported = b.get(f"/devices.csv?location={stem}&expiring=365d")
    assert exported.status == 200 and exported.header("content-type").startswith("text/csv")
    lines = exported.text.splitlines()
    assert lines[0].startswith("device_id,model,owner,location") and len(lines) == 2
    assert lines[1].startswith(f"{ids[0]},monitor,ward-9,{stem}") and enrolled.serial_hex not in lines[1]


def test_audit_page_filters_by_device_actor_and_event(srv, ca, logged_in):
    device = ca.unique("flt")
    srv.enroll(device, ca.add_device(device))
    page = logged_in["auditor"].get(f"/audit?device={device}")
    assert "3 matching entries" in page.text, page.text[-2000:]
    only = logged_in["auditor"].get(f"/audit?device={device}&action=certificate_issued")
    assert "1 matching entry" in only.text and f"device:{device}" in only.text
    assert "0 matching entries" in logged_in["auditor"].get(f"/audit?device={device}&actor=nobody").text
