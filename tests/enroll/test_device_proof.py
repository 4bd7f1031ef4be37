"""What a device proves, through the real server: a CMS-signed posture over the RA API (made by
`openssl cms`, as the gateway relays it), a posture over mutual TLS on `POST /iomt/v1/posture`
(curl), the firmware gate that only proof opens, and the refusal of superseded certificates."""
from __future__ import annotations

import base64
import json

import pytest

MODEL = "old-pump"
CA_TABLES = f"""
[ca.models."{MODEL}"]
min_firmware = "2.0.0"
"""


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("proof", ca_tables=CA_TABLES)


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


@pytest.fixture
def device(srv, ca):
    device_id = ca.unique("proof-dev")
    return srv.enroll(device_id, ca.add_device(device_id, model=MODEL))


def ra(srv, method, path, body):
    ca = srv.ca
    args = ["-X", method, "--cert", ca.ra_cert, "--key", ca.ra_key, "--pass", ca.ra_passphrase,
            "-H", "Content-Type: application/json",
            "--data-binary", f"@{ca.write('ra-body.json', json.dumps(body).encode())}"]
    return srv.https(path, *args)


def mtls_posture(srv, cert, posture, *, client=True):
    args = ["-X", "POST", "-H", "Content-Type: application/json",
            "--data-binary", f"@{srv.ca.write('posture.json', json.dumps(posture).encode())}"]
    if client:
        args += ["--cert", cert.cert_path, "--key", cert.key]
    return srv.https("/iomt/v1/posture", *args)


def signed_posture(ca, tools, cert, posture) -> str:
    """What a device vendor runs: openssl cms -sign over the posture JSON with the current pair."""
    doc = ca.write("posture-doc.json", json.dumps(posture).encode())
    out = ca.work / f"{ca.unique('posture')}.cms.der"
    tools.run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-in", doc, "-signer", cert.cert_path,
               "-inkey", cert.key, "-outform", "DER", "-out", out])
    return base64.b64encode(out.read_bytes()).decode()


def renew_refused(srv, cert, code):
    _, csr = srv.ca.make_csr(cert.device_id, key=cert.key)
    from_file = csr.read_bytes()
    reply = srv.est_post("simplereenroll", base64.b64encode(from_file), cert=cert)
    assert reply.status in (401, 403) and reply.header("x-error-code") == code, reply
    return reply


def test_only_a_proven_posture_opens_the_firmware_gate(srv, ca, tools, device):
    renew_refused(srv, device, "posture_noncompliant")
    # an unsigned report (what anyone on the broker can send) is shown, and opens nothing
    reply = ra(srv, "POST", f"/ra/v1/devices/{device.device_id}/reported-posture", {"firmware": "9.9.9"})
    assert reply.status == 200, reply
    shown = ca.device(device.device_id)
    assert shown["reported_firmware"] == "9.9.9" and shown["firmware"] == ""
    renew_refused(srv, device, "posture_noncompliant")
    # the same claim signed with the device's current certificate
    cms_b64 = signed_posture(ca, tools, device, {"firmware": "2.4.1", "model": MODEL})
    reply = ra(srv, "POST", f"/ra/v1/devices/{device.device_id}/posture", {"cms": cms_b64, "request_id": "p-1"})
    assert reply.status == 200 and reply.json()["status"] == "ok" and reply.json()["firmware"] == "2.4.1", reply
    assert ca.device(device.device_id)["firmware"] == "2.4.1"
    changed = ca.audit("firmware_changed", device.device_id)
    assert [(r["actor"], r["detail"]["to"]) for r in changed] == [(f"device:{device.device_id}", "2.4.1")]
    srv.reenroll(device)


def test_a_signed_posture_for_another_device_or_with_a_revoked_certificate_is_refused(srv, ca, tools, device):
    other_id = ca.unique("proof-other")
    cms_b64 = signed_posture(ca, tools, device, {"firmware": "3.0.0"})
    reply = ra(srv, "POST", f"/ra/v1/devices/{other_id}/posture", {"cms": cms_b64})
    assert reply.status == 401 and reply.json()["code"] == "unauthorized", reply
    ca.revoke(device.serial_hex, "keyCompromise")
    reply = ra(srv, "POST", f"/ra/v1/devices/{device.device_id}/posture", {"cms": cms_b64})
    assert reply.status == 403 and reply.json()["code"] == "revoked", reply
    assert ca.device(device.device_id)["firmware"] == ""
    assert [c["status"] for c in ca.certificates() if c["serial"] == device.serial_hex] == ["revoked"]


def test_posture_over_mutual_tls(srv, ca, tools, device):
    reply = mtls_posture(srv, device, {"firmware": "2.0.0"})
    assert reply.status == 200, reply
    body = reply.json()
    assert body == {"status": "ok", "device_id": device.device_id, "firmware": "2.0.0", "released": []}
    shown = ca.device(device.device_id)
    assert shown["firmware"] == "2.0.0" and shown["last_proven_contact"] is not None
    reply = mtls_posture(srv, device, {"firmware": "9.0.0"}, client=False)
    assert reply.status == 401 and reply.json()["code"] == "unauthorized", reply
    reply = mtls_posture(srv, device, ["not", "an", "object"])
    assert reply.status == 400 and reply.json()["code"] == "bad_request", reply
    assert ca.device(device.device_id)["firmware"] == "2.0.0"


def test_a_superseded_certificate_cannot_renew(srv, ca, tools, device):
    assert mtls_posture(srv, device, {"firmware": "2.1.0"}).status == 200
    newer = srv.reenroll(device, new_key=True)
    again = srv.reenroll(device, new_key=True)       # allowed: the newer one was never used
    assert mtls_posture(srv, again, {"firmware": "2.1.0"}).status == 200   # now it has been
    with ca.no_new_certificates():
        reply = renew_refused(srv, device, "unauthorized")
        assert "superseded" in reply.text, reply
        renew_refused(srv, newer, "unauthorized")
    suspected = ca.audit("clone_suspected", device.device_id)
    assert {r["serial"] for r in suspected} == {device.serial_hex, newer.serial_hex}
    assert ca.device(device.device_id)["clone_suspected_at"] is not None
    srv.reenroll(again)   # the current certificate renews as before
