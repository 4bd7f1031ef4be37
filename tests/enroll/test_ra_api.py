"""The registration-authority API (what the MQTT gateway calls) over HTTPS with the RA client
certificate from `iomtca init`, driven by curl; device proofs (CSRs, CMS-signed renewals) are
made by openssl as a device would, and what comes back is judged by openssl."""
from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.parse
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("ra")


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


def ra_args(ca) -> list:
    return ["--cert", ca.ra_cert, "--key", ca.ra_key, "--pass", ca.ra_passphrase]


def call(srv, method: str, path: str, body=None, *, client="ra", content_type="application/json"):
    """curl to the RA API; client is "ra" (the gateway), None, or a DeviceCert."""
    args = ["-X", method]
    if client == "ra":
        args += ra_args(srv.ca)
    elif client is not None:
        args += ["--cert", client.cert_path, "--key", client.key]
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        args += ["--data-binary", f"@{srv.ca.write('ra-body.json', data)}"]
        if content_type:
            args += ["-H", f"Content-Type: {content_type}"]
    return srv.https(path, *args)


def json_error(reply, status: int, code: str) -> dict:
    assert reply.status == status, reply
    assert (reply.header("content-type") or "").startswith("application/json"), reply.raw_headers
    body = reply.json()
    assert body["code"] == code and isinstance(body["message"], str) and body["message"], body
    return body


def write_der_cert(ca, b64: str, name: str):
    der = ca.write(f"{name}.der", base64.b64decode(b64, validate=True))
    pem = ca.work / f"{ca.unique(name)}.pem"
    proc = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(der), "-out", str(pem)],
                            capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return pem


class Issued:
    def __init__(self, device_id, key, cert_path):
        self.device_id, self.key, self.cert_path = device_id, key, cert_path
        self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())

    @property
    def serial_hex(self) -> str:
        return format(self.cert.serial_number, "x")


def ra_enroll(srv, ca, tools, device_id: str, token: str) -> tuple[Issued, dict]:
    key, csr = ca.make_csr(device_id)
    reply = call(srv, "POST", f"/ra/v1/devices/{device_id}/simpleenroll",
                 {"csr": base64.b64encode(csr.read_bytes()).decode(), "token": token})
    assert reply.status == 200, reply
    body = reply.json()
    pem = write_der_cert(ca, body["cert"], device_id)
    return Issued(device_id, key, pem), body


@pytest.fixture
def enrolled(srv, ca, tools):
    device_id = ca.unique("gw-dev")
    return ra_enroll(srv, ca, tools, device_id, ca.add_device(device_id))[0]


@pytest.fixture(scope="module")
def outsider(srv, ca, tools):
    """A device with a good certificate that tries to use the RA API itself."""
    device_id = ca.unique("gw-outsider")
    return ra_enroll(srv, ca, tools, device_id, ca.add_device(device_id))[0]


def cms_renewal(ca, tools, signer: Issued, device_id: str) -> tuple[str, object]:
    """`openssl cms -sign` of a new CSR (new key) with the device's current certificate and key."""
    new_key, csr = ca.make_csr(device_id)
    out = ca.work / f"{ca.unique('renew')}.cms.der"
    tools.run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-in", csr, "-inform", "DER", "-signer",
               signer.cert_path, "-inkey", signer.key, "-outform", "DER", "-out", out])
    return base64.b64encode(out.read_bytes()).decode(), new_key


def test_simpleenroll(srv, ca, tools):
    device_id = ca.unique("gw-pump")
    token = ca.add_device(device_id)
    issued, body = ra_enroll(srv, ca, tools, device_id, token)
    assert body["status"] == "ok"
    ca.openssl_verify(issued.cert_path)
    out = tools.run(["openssl", "x509", "-in", issued.cert_path, "-noout", "-subject", "-ext", "subjectAltName",
                     "-nameopt", "RFC2253"]).stdout
    assert f"subject=CN={device_id}" in out and f"URI:spiffe://{tools.TRUST_DOMAIN}/device/{device_id}" in out
    assert body["serial"] == issued.serial_hex
    not_after = datetime.strptime(body["not_after"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert not_after == issued.cert.not_valid_after_utc
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in body["chain"]]
    assert chain[0] == x509.load_pem_x509_certificate(ca.issuing.read_bytes())
    # the token was the device's: it is spent now
    _, csr = ca.make_csr(device_id)
    with ca.no_new_certificates():
        again = call(srv, "POST", f"/ra/v1/devices/{device_id}/simpleenroll",
                     {"csr": base64.b64encode(csr.read_bytes()).decode(), "token": token})
    json_error(again, 401, "unauthorized")


def test_simpleenroll_refusals_are_json(srv, ca, tools):
    device_id = ca.unique("gw-bad")
    token = ca.add_device(device_id)
    _, csr = ca.make_csr(device_id)
    csr_b64 = base64.b64encode(csr.read_bytes()).decode()
    path = f"/ra/v1/devices/{device_id}/simpleenroll"
    with ca.no_new_certificates():
        json_error(call(srv, "POST", path, {"csr": csr_b64, "token": "wrong"}), 401, "unauthorized")
        # a token login: an unregistered id is answered as a wrong token (docs/SECURITY.md)
        json_error(call(srv, "POST", "/ra/v1/devices/nobody-here/simpleenroll", {"csr": csr_b64, "token": token}),
                   401, "unauthorized")
        json_error(call(srv, "POST", path, {"csr": "%%%", "token": token}), 400, "bad_request")
        json_error(call(srv, "POST", path, {"token": token}), 400, "bad_request")
        json_error(call(srv, "POST", path, b"{not json"), 400, "bad_request")
        json_error(call(srv, "POST", path, [1, 2]), 400, "bad_request")
    # none of that spent the token
    ra_enroll(srv, ca, tools, device_id, token)


def test_wrong_content_type_is_a_json_error(srv, ca, tools, enrolled):
    reply = call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/presence", {"online": True},
                 content_type="text/plain")
    assert reply.status == 415
    json_error(reply, 415, "bad_request")


def test_simplereenroll_with_openssl_cms(srv, ca, tools, enrolled):
    cms_b64, new_key = cms_renewal(ca, tools, enrolled, enrolled.device_id)
    reply = call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/simplereenroll", {"cms": cms_b64})
    assert reply.status == 200, reply
    renewed = Issued(enrolled.device_id, new_key, write_der_cert(ca, reply.json()["cert"], "renewed"))
    ca.openssl_verify(renewed.cert_path)
    assert renewed.cert.serial_number != enrolled.cert.serial_number
    assert renewed.cert.subject == enrolled.cert.subject
    # key rotation: the new certificate carries the new key the CMS-signed CSR named
    assert ca.pubkey_of_cert(renewed.cert_path) == ca.pubkey_of_key(new_key)
    assert ca.pubkey_of_cert(renewed.cert_path) != ca.pubkey_of_cert(enrolled.cert_path)


def test_cms_signed_by_another_device_is_401(srv, ca, tools, enrolled):
    other_id = ca.unique("gw-other")
    other = ra_enroll(srv, ca, tools, other_id, ca.add_device(other_id))[0]
    cms_b64, _ = cms_renewal(ca, tools, other, enrolled.device_id)   # B signs a CSR for A
    with ca.no_new_certificates():
        reply = call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/simplereenroll", {"cms": cms_b64})
    body = json_error(reply, 401, "unauthorized")
    assert other_id in body["message"] and enrolled.device_id in body["message"], body


def test_cms_with_a_revoked_signer_is_refused(srv, ca, tools, enrolled):
    ca.revoke(enrolled.serial_hex, "keyCompromise")
    cms_b64, _ = cms_renewal(ca, tools, enrolled, enrolled.device_id)
    with ca.no_new_certificates():
        reply = call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/simplereenroll", {"cms": cms_b64})
    json_error(reply, 403, "revoked")


def test_presence_and_plain_posture_are_reported_only(srv, ca, tools, enrolled):
    before = ca.device(enrolled.device_id)
    assert before["reported_online_at"] is None and before["firmware"] == ""
    proven_before = before["last_proven_contact"]
    reply = call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/presence", {"online": True})
    assert reply.status == 200 and reply.json()["status"] == "ok", reply
    seen = ca.device(enrolled.device_id)
    assert seen["reported_online"] is True and seen["reported_online_at"] is not None
    seen_at = datetime.strptime(seen["reported_online_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - seen_at) < timedelta(minutes=1)
    assert seen["last_proven_contact"] == proven_before   # a report is not proof of attendance
    reply = call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/reported-posture", {"firmware": "13.0.1"})
    assert reply.status == 200 and reply.json()["status"] == "ok", reply
    after = ca.device(enrolled.device_id)
    assert after["reported_firmware"] == "13.0.1" and after["firmware"] == ""   # the gate reads only proof
    assert not ca.audit("firmware_changed", enrolled.device_id)
    # the signed form only: a plain posture on /posture is refused
    json_error(call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/posture", {"firmware": "13.0.1"}),
               400, "bad_request")
    json_error(call(srv, "POST", f"/ra/v1/devices/{enrolled.device_id}/presence", {"online": "yes"}),
               400, "bad_request")
    json_error(call(srv, "POST", "/ra/v1/devices/nobody-here/presence", {"online": True}), 401, "unknown_device")


def test_status_changes_long_poll_returns_a_revocation_made_meanwhile(srv, ca, tools, enrolled):
    everything = call(srv, "GET", "/ra/v1/status-changes?after=0&wait=0")
    assert everything.status == 200, everything
    last = everything.json()["last"]
    argv = ["curl", "-sS", "--max-time", "10", "--cacert", ca.root, *ra_args(ca),
            f"{srv.est}/ra/v1/status-changes?after={last}&wait=2"]
    started = time.monotonic()
    poll = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)   # let the long poll reach the server and wait there
        ca.revoke(enrolled.serial_hex, "superseded")
        revoked = time.monotonic()
        out, err = poll.communicate(timeout=10)
    finally:
        if poll.poll() is None:
            poll.kill()
            poll.wait()
    returned = time.monotonic()
    assert poll.returncode == 0, err
    assert returned - revoked < 1.0, f"long poll answered {returned - revoked:.2f} s after the revocation"
    assert returned - started >= 0.3    # it was waiting, not answering at once
    body = json.loads(out)
    mine = [c for c in body["changes"] if c["serial"] == enrolled.serial_hex]
    assert mine and mine[0]["status"] == "revoked" and mine[0]["reason"] == "superseded", body
    assert mine[0]["device_id"] == enrolled.device_id and body["last"] > last


def test_status_changes_without_news_waits_then_answers_empty(srv, ca):
    last = call(srv, "GET", "/ra/v1/status-changes?after=0").json()["last"]
    started = time.monotonic()
    reply = call(srv, "GET", f"/ra/v1/status-changes?after={last}&wait=0.5")
    assert reply.status == 200 and reply.json() == {"last": last, "changes": []}, reply
    assert time.monotonic() - started >= 0.45
    json_error(call(srv, "GET", "/ra/v1/status-changes?after=abc"), 400, "bad_request")


def test_certificates(srv, ca, tools, enrolled):
    reply = call(srv, "GET", "/ra/v1/certificates")
    assert reply.status == 200, reply
    rows = {r["serial"]: r for r in reply.json()["certificates"]}
    assert rows[enrolled.serial_hex]["device_id"] == enrolled.device_id
    assert rows[enrolled.serial_hex]["status"] == "good"
    # device certificates only: not the server, RA or OCSP responder certificates
    assert all(r["device_id"] for r in rows.values()), rows
    # paging: limit=1 pages, each after the previous page's serial, add up to the full listing
    paged, after = [], ""
    for _ in range(len(rows) + 2):
        page = call(srv, "GET", f"/ra/v1/certificates?limit=1&after={after}").json()["certificates"]
        if not page:
            break
        assert len(page) == 1
        paged.append(page[0]["serial"])
        after = page[0]["serial"]
    assert paged == [r["serial"] for r in reply.json()["certificates"]]
    json_error(call(srv, "GET", "/ra/v1/certificates?limit=many"), 400, "bad_request")


def test_ocsp_by_serial(srv, ca, tools, enrolled):
    reply = call(srv, "GET", f"/ra/v1/ocsp/{enrolled.serial_hex}")
    assert reply.status == 200 and reply.header("content-type") == "application/ocsp-response", reply
    resp = ca.write("ra-ocsp.der", reply.body)
    out = tools.run(["openssl", "ocsp", "-respin", resp, "-issuer", ca.issuing, "-cert", enrolled.cert_path,
                     "-no_nonce", "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain])
    text = out.stdout + out.stderr
    assert "Response verify OK" in text and f"{enrolled.cert_path}: good" in text, text


def test_ocsp_in_batches(srv, ca, tools, enrolled):
    """What the gateway's sweep fetches: many serials' responses in one request, each judged by openssl."""
    unknown = "7" * 30
    reply = call(srv, "POST", "/ra/v1/ocsp", {"serials": [enrolled.serial_hex, unknown]})
    assert reply.status == 200, reply
    responses = reply.json()["responses"]
    assert set(responses) == {enrolled.serial_hex, unknown}
    resp = ca.write("ra-ocsp-batch.der", base64.b64decode(responses[enrolled.serial_hex]))
    out = tools.run(["openssl", "ocsp", "-respin", resp, "-issuer", ca.issuing, "-cert", enrolled.cert_path,
                     "-no_nonce", "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain])
    text = out.stdout + out.stderr
    assert "Response verify OK" in text and f"{enrolled.cert_path}: good" in text, text
    from cryptography.x509 import ocsp
    other = ocsp.load_der_ocsp_response(base64.b64decode(responses[unknown]))
    assert other.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    for body in ({"serials": []}, {"serials": "ab"}, {"serials": [12]}, {"serials": ["xyz"]},
                 {"serials": ["a"] * 1001}, {}):
        json_error(call(srv, "POST", "/ra/v1/ocsp", body), 400, "bad_request")
    json_error(call(srv, "POST", "/ra/v1/ocsp", {"serials": ["ab"]}, client=None), 403, "policy_violation")


def test_cacerts_and_csrattrs(srv, ca):
    certs = call(srv, "GET", "/ra/v1/cacerts").json()["certs"]
    got = {x509.load_der_x509_certificate(base64.b64decode(c)) for c in certs}
    assert got == set(x509.load_pem_x509_certificates(ca.chain.read_bytes()))
    attrs = call(srv, "GET", "/ra/v1/csrattrs").json()
    assert attrs["key_types"] == ["ec-p256"] and base64.b64decode(attrs["csrattrs"])


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/ra/v1/certificates", None),
    ("GET", "/ra/v1/status-changes?after=0", None),
    ("POST", "/ra/v1/devices/{id}/simpleenroll", {"csr": "AAAA", "token": "x"}),
    ("POST", "/ra/v1/devices/{id}/presence", {"online": True}),
], ids=["certificates", "status-changes", "simpleenroll", "presence"])
@pytest.mark.parametrize("who", ["no-client-cert", "device-cert", "proxy-header"])
def test_only_the_ra_certificate_gets_in(srv, ca, tools, outsider, method, path, body, who):
    path = path.format(id=outsider.device_id)
    if who == "no-client-cert":
        reply = call(srv, method, path, body, client=None)
    elif who == "device-cert":
        reply = call(srv, method, path, body, client=outsider)
    else:   # the RA certificate in a proxy header, from a client that is no trusted proxy
        pem = tools.first_cert_pem(ca.ra_cert.read_bytes()).decode()
        args = ["-X", method, "-H", "X-SSL-Client-Cert: " + urllib.parse.quote(pem, safe="")]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        reply = srv.https(path, *args)
    json_error(reply, 403, "policy_violation")
    assert ca.device(outsider.device_id)["reported_online_at"] is None


def test_a_revoked_ra_certificate_is_refused(start_server, tools):
    """A server of its own: revoking the gateway's certificate locks the gateway out at once."""
    own = start_server("ra-revoked")
    assert call(own, "GET", "/ra/v1/certificates").status == 200
    ra_serial = format(x509.load_pem_x509_certificate(own.ca.ra_cert.read_bytes()).serial_number, "x")
    own.ca.revoke(ra_serial, "keyCompromise")
    json_error(call(own, "GET", "/ra/v1/certificates"), 403, "policy_violation")
