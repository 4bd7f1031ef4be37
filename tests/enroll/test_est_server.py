"""EST (RFC 7030) against the real `iomtca serve`, driven the way appendix A of the RFC does it:
curl for the HTTP exchanges, openssl (and GnuTLS when installed) as the judges of what comes back."""
from __future__ import annotations

import base64
import email
import email.policy
import re
import shutil
import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

# One server for the module: a 3-second profile reachable by the EST label "short", a model
# whose certificates may renew only 1 s after expiry, and approval for high-criticality devices.
CONFIG = dict(
    ca_tables="""
[ca.profiles.short]
base = "device"
lifetime = "3s"

[ca.models."shortgrace"]
renewal_grace = "1s"
""",
    approval_criticality=["high"],
)


@pytest.fixture(scope="module")
def est(start_server):
    return start_server("est", **CONFIG)


@pytest.fixture(scope="module")
def ca(est):
    return est.ca


def no_chunking(reply) -> None:
    assert reply.header("content-length") is not None, reply.raw_headers
    assert "chunked" not in (reply.header("transfer-encoding") or ""), reply.raw_headers


def names_of(tools, cert_path) -> tuple[str, str]:
    out = tools.run(["openssl", "x509", "-in", cert_path, "-noout", "-subject", "-ext", "subjectAltName",
                     "-nameopt", "RFC2253"]).stdout
    subject = re.search(r"^subject=(.*)$", out, re.M).group(1).strip()
    san = re.search(r"X509v3 Subject Alternative Name:\s*\n\s*(.+)", out).group(1).strip()
    return subject, san


# -- cacerts, csrattrs, fullcmc, labels --------------------------------------------------------

def test_cacerts_is_the_chain_and_verifies_to_root(est, ca, tools):
    reply = est.https(f"{tools.EST}/cacerts")
    assert reply.status == 200, reply
    assert reply.header("content-type") == "application/pkcs7-mime; smime-type=certs-only"
    no_chunking(reply)
    pems = ca.pem_certs_from_pkcs7(reply.body)
    assert len(pems) == 2, pems
    # a PKCS#7 SET OF has no order: find the root and the issuing CA by what they are
    certs = {x509.load_pem_x509_certificate(p): p for p in pems}
    root = x509.load_pem_x509_certificate(ca.root.read_bytes())
    issuing = x509.load_pem_x509_certificate(ca.issuing.read_bytes())
    assert set(certs) == {root, issuing}
    # the issuing CA as served chains to the trust anchor on disk, as openssl sees it
    issuing_path = ca.write("cacert-issuing.pem", certs[issuing])
    out = tools.run(["openssl", "verify", "-CAfile", ca.root, issuing_path]).stdout
    assert out.strip() == f"{issuing_path}: OK"
    root_path = ca.write("cacert-root.pem", certs[root])
    out = tools.run(["openssl", "verify", "-CAfile", root_path, issuing_path]).stdout
    assert out.strip() == f"{issuing_path}: OK"
    # the same under a label naming a device profile
    labelled = est.https(f"{tools.EST}/short/cacerts")
    assert labelled.status == 200 and sorted(ca.pem_certs_from_pkcs7(labelled.body)) == sorted(pems)


def test_csrattrs_names_p256(est, ca, tools):
    reply = est.https(f"{tools.EST}/csrattrs")
    assert reply.status == 200, reply
    assert reply.header("content-type") == "application/csrattrs"
    der = ca.write("csrattrs.der", base64.b64decode(b"".join(reply.body.split()), validate=True))
    out = tools.run(["openssl", "asn1parse", "-inform", "DER", "-in", der]).stdout
    assert "prime256v1" in out and "id-ecPublicKey" in out and "ecdsa-with-SHA256" in out, out


def test_fullcmc_is_not_here(est, ca, tools):
    _, csr = ca.make_csr("cmc")
    reply = est.est_post("fullcmc", tools.b64_body(csr.read_bytes()), content_type="application/pkcs7-mime")
    assert reply.status == 404, reply
    assert "fullcmc" in reply.text


def test_unknown_label_is_404_and_keeps_the_token(est, ca, tools):
    device = ca.unique("label")
    token = ca.add_device(device)
    _, csr = ca.make_csr(device)
    with ca.no_new_certificates():
        reply = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes()), user=(device, token),
                             label="no-such-label")
    assert reply.status == 404, reply
    assert "no-such-label" in reply.text
    assert est.https(f"{tools.EST}/no-such-label/cacerts").status == 404
    # the refusal did not spend the token
    est.enroll(device, token)


# -- simpleenroll ------------------------------------------------------------------------------

def test_first_request_without_credentials_gets_a_basic_challenge(est, ca, tools):
    _, csr = ca.make_csr("anon")
    with ca.no_new_certificates():
        reply = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes()))
    assert reply.status == 401, reply
    challenge = reply.header("www-authenticate")
    assert challenge and challenge.lower().startswith("basic realm="), reply.raw_headers
    no_chunking(reply)
    assert "authentication required" in reply.text


@pytest.mark.parametrize("style,headers", [
    ("oneline", ()),
    ("lf64", ()),
    ("crlf76", ("Content-Transfer-Encoding: base64",)),
], ids=["no-line-breaks", "64-column-lines", "76-column-crlf-with-CTE-header"])
def test_simpleenroll(est, ca, tools, style, headers):
    device = ca.unique("pump")
    token = ca.add_device(device)
    key, csr = ca.make_csr(device, subject="/CN=whatever-the-device-says")
    reply = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes(), style), user=(device, token),
                         headers=headers)
    assert reply.status == 200, reply
    no_chunking(reply)
    issued = est.device_cert(device, key, reply)
    ca.openssl_verify(issued.cert_path)
    subject, san = names_of(tools, issued.cert_path)
    assert subject == f"CN={device}"       # the registry names the device, not the CSR
    assert san == f"URI:spiffe://{tools.TRUST_DOMAIN}/device/{device}"
    assert ca.pubkey_of_cert(issued.cert_path) == ca.pubkey_of_key(key)
    listed = [c for c in ca.certificates() if c["device_id"] == device]
    assert [c["serial"] for c in listed] == [issued.serial_hex] and listed[0]["status"] == "good"


def test_token_is_single_use(est, ca, tools):
    device = ca.unique("once")
    token = ca.add_device(device)
    est.enroll(device, token)
    _, csr = ca.make_csr(device)
    with ca.no_new_certificates():
        again = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes()), user=(device, token))
    assert again.status == 401, again
    assert "already used" in again.text
    assert again.header("www-authenticate")


# -- simplereenroll ----------------------------------------------------------------------------

@pytest.mark.parametrize("new_key", [False, True], ids=["same-key", "key-rotation"])
def test_simplereenroll_with_the_current_certificate(est, ca, tools, new_key):
    device = ca.unique("renew")
    first = est.enroll(device, ca.add_device(device))
    second = est.reenroll(first, new_key=new_key)
    ca.openssl_verify(second.cert_path)
    assert names_of(tools, second.cert_path) == names_of(tools, first.cert_path)
    assert second.cert.serial_number != first.cert.serial_number
    assert ca.pubkey_of_cert(second.cert_path) == ca.pubkey_of_key(second.key)
    same = ca.pubkey_of_cert(second.cert_path) == ca.pubkey_of_cert(first.cert_path)
    assert same is (not new_key)
    # the new certificate (and, after rotation, the new key) authenticates the next renewal
    third = est.reenroll(second)
    ca.openssl_verify(third.cert_path)
    assert {c["serial"] for c in ca.certificates() if c["device_id"] == device} == {
        first.serial_hex, second.serial_hex, third.serial_hex}


def test_simplereenroll_without_a_client_certificate_is_401(est, ca, tools):
    device = ca.unique("nocert")
    token = ca.add_device(device)
    _, csr = ca.make_csr(device)
    with ca.no_new_certificates():
        reply = est.est_post("simplereenroll", tools.b64_body(csr.read_bytes()), user=(device, token))
    assert reply.status == 401, reply
    assert "current certificate" in reply.text


def test_reenroll_with_a_revoked_certificate_is_403(est, ca, tools):
    device = ca.unique("stolen")
    current = est.enroll(device, ca.add_device(device))
    ca.revoke(current.serial_hex, "keyCompromise")
    _, csr = ca.make_csr(device, key=current.key)
    with ca.no_new_certificates():
        reply = est.est_post("simplereenroll", tools.b64_body(csr.read_bytes()), cert=current)
    assert reply.status == 403, reply
    assert "revoked" in reply.text and "keyCompromise" in reply.text
    refusals = [r for r in ca.audit("renew_refused") if current.serial_hex in r["detail"]["reason"]]
    assert [r["detail"]["code"] for r in refusals] == ["revoked"]


def test_reenroll_on_hold_is_403_until_released(est, ca, tools):
    device = ca.unique("held")
    current = est.enroll(device, ca.add_device(device))
    ca.iomtca("cert", "hold", current.serial_hex)
    _, csr = ca.make_csr(device, key=current.key)
    with ca.no_new_certificates():
        reply = est.est_post("simplereenroll", tools.b64_body(csr.read_bytes()), cert=current)
    assert reply.status == 403 and "on hold" in reply.text, reply
    ca.iomtca("cert", "release", current.serial_hex)
    ca.openssl_verify(est.reenroll(current).cert_path)


@pytest.fixture(scope="module")
def short_lived(est, ca):
    """Two 3-second certificates made together through the label "short": one of a model with the
    default renewal grace (7 days), one of model "shortgrace" (1 second)."""
    inside, outside = ca.unique("grace-in"), ca.unique("grace-out")
    token_in = ca.add_device(inside)
    token_out = ca.add_device(outside, model="shortgrace")
    return est.enroll(inside, token_in, label="short"), est.enroll(outside, token_out, label="short")


def wait_until(moment: datetime, bound: float) -> None:
    delay = (moment - datetime.now(timezone.utc)).total_seconds()
    assert delay <= bound, f"would have to wait {delay:.1f} s (bound {bound} s)"
    if delay > 0:
        time.sleep(delay)


def test_short_profile_via_label(short_lived):
    for dev in short_lived:
        c = dev.cert
        assert c.not_valid_after_utc - c.not_valid_before_utc == timedelta(minutes=5, seconds=3)


def test_reenroll_just_after_expiry_inside_the_grace_period(est, ca, tools, short_lived):
    current = short_lived[0]
    wait_until(current.cert.not_valid_after_utc + timedelta(seconds=0.3), bound=6)
    expired = tools.run(["openssl", "x509", "-in", current.cert_path, "-noout", "-checkend", "0"], check=False)
    assert expired.returncode == 1 and "will expire" in expired.stdout, expired.stdout
    renewed = est.reenroll(current)
    ca.openssl_verify(renewed.cert_path, "-no_check_time")
    assert renewed.cert.not_valid_after_utc > current.cert.not_valid_after_utc
    # the renewal keeps the profile of the certificate it replaces
    assert renewed.cert.not_valid_after_utc - renewed.cert.not_valid_before_utc == timedelta(minutes=5, seconds=3)


def test_reenroll_after_the_grace_period_is_401(est, ca, tools, short_lived):
    current = short_lived[1]
    # grace 1 s: the server (whole seconds) refuses from not_after + 2 s on
    wait_until(current.cert.not_valid_after_utc + timedelta(seconds=2.2), bound=8)
    _, csr = ca.make_csr(current.device_id, key=current.key)
    with ca.no_new_certificates():
        reply = est.est_post("simplereenroll", tools.b64_body(csr.read_bytes()), cert=current)
    assert reply.status == 401, reply
    assert "grace period" in reply.text, reply.text
    refusals = [r for r in ca.audit("renew_refused") if current.serial_hex in r["detail"]["reason"]]
    assert [r["detail"]["code"] for r in refusals] == ["unauthorized"]


def test_refused_renewal_is_audited_under_its_device(est, ca, tools):
    device = ca.unique("traced")
    current = est.enroll(device, ca.add_device(device))
    ca.revoke(current.serial_hex, "keyCompromise")
    _, csr = ca.make_csr(device, key=current.key)
    reply = est.est_post("simplereenroll", tools.b64_body(csr.read_bytes()), cert=current)
    assert reply.status == 403, reply
    refusals = ca.audit("renew_refused", device)
    assert refusals and refusals[-1]["detail"]["code"] == "revoked"
    assert refusals[-1]["actor"] == f"device:{device}"


# -- serverkeygen ------------------------------------------------------------------------------

def serverkeygen(est, ca, tools):
    device = ca.unique("keygen")
    token = ca.add_device(device)
    _, csr = ca.make_csr(device)
    reply = est.est_post("serverkeygen", tools.b64_body(csr.read_bytes()), user=(device, token))
    assert reply.status == 200, reply
    return device, reply


def test_serverkeygen_key_matches_certificate(est, ca, tools):
    device, reply = serverkeygen(est, ca, tools)
    ctype = reply.header("content-type")
    assert ctype.startswith("multipart/mixed") and "boundary=" in ctype, reply.raw_headers
    msg = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + reply.body,
                                   policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/pkcs8", "application/pkcs7-mime"]
    assert parts[1].get_param("smime-type") == "certs-only"
    key_der = ca.write("keygen.p8.der", parts[0].get_payload(decode=True))
    cert_pems = ca.pem_certs_from_pkcs7(parts[1].get_payload(decode=False).encode())
    assert len(cert_pems) == 1
    cert_path = ca.write("keygen.pem", cert_pems[0])
    tools.run(["openssl", "pkey", "-inform", "DER", "-in", key_der, "-check", "-noout"])
    assert ca.pubkey_of_key(key_der, "-inform", "DER") == ca.pubkey_of_cert(cert_path)
    ca.openssl_verify(cert_path)
    assert names_of(tools, cert_path)[0] == f"CN={device}"
    assert "ASN1 OID: prime256v1" in tools.run(["openssl", "pkey", "-inform", "DER", "-in", key_der,
                                                "-noout", "-text"]).stdout


def test_serverkeygen_multipart_delimiters_follow_crlf(est, ca, tools):
    _, reply = serverkeygen(est, ca, tools)
    boundary = re.search(r'boundary="?([^";]+)"?', reply.header("content-type")).group(1).encode()
    positions = [m.start() for m in re.finditer(re.escape(b"--" + boundary), reply.body)]
    assert len(positions) == 3 and positions[0] == 0
    for pos in positions[1:]:
        assert reply.body[pos - 2:pos] == b"\r\n", reply.body[pos - 10:pos + 4]


# -- approval ------------------------------------------------------------------------------------

def test_approval_flow(est, ca, tools):
    device = ca.unique("ventilator")
    token = ca.add_device(device, criticality="high")
    key, csr = ca.make_csr(device)
    body = tools.b64_body(csr.read_bytes())
    with ca.no_new_certificates():
        waiting = est.est_post("simpleenroll", body, user=(device, token))
    assert waiting.status == 202, waiting
    retry = waiting.header("retry-after")
    assert retry is not None and retry.isdigit() and int(retry) > 0, waiting.raw_headers
    ca.iomtca("device", "approve", device)
    approved = est.est_post("simpleenroll", body, user=(device, token))
    assert approved.status == 200, approved
    issued = est.device_cert(device, key, approved)
    ca.openssl_verify(issued.cert_path)
    with ca.no_new_certificates():
        used = est.est_post("simpleenroll", body, user=(device, token))
    assert used.status == 401 and "already used" in used.text, used


def test_waiting_enrollment_is_listed_for_the_engineer(est, ca, tools):
    device = ca.unique("monitor")
    token = ca.add_device(device, criticality="high")
    _, csr = ca.make_csr(device)
    reply = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes()), user=(device, token))
    assert reply.status == 202, reply
    pending = ca.iomtca("device", "pending", "--json").stdout
    assert device in pending, pending
    assert ca.audit("enroll_pending_approval", device)


# -- TLS -------------------------------------------------------------------------------------------

def s_client(est, ca, tools, *args):
    host_port = est.est.removeprefix("https://")
    return tools.run(["openssl", "s_client", "-connect", host_port, "-servername", "localhost",
                      "-CAfile", ca.root, *args], input=b"", check=False, timeout=30)


def test_tls_1_1_is_refused(est, ca, tools):
    # SECLEVEL=0 so that our own client is willing to speak TLS 1.1: the refusal is the server's
    out = s_client(est, ca, tools, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Cipher is (NONE)" in text and "Protocol  : TLSv1.1" in text, text


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_tls_1_2_and_1_3_connect_and_verify(est, ca, tools, version):
    out = s_client(est, ca, tools, version)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    name = {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[version]
    assert re.search(rf"New, {name}, Cipher is \S+", text), text
    assert "Verify return code: 0 (ok)" in text, text


def test_tls_1_2_without_forward_secrecy_is_refused(est, ca, tools):
    out = s_client(est, ca, tools, "-tls1_2", "-cipher", "AES128-GCM-SHA256:AES256-SHA")
    assert out.returncode != 0 and "Cipher is (NONE)" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("gnutls-cli") is None, reason="gnutls-cli not installed (gnutls-bin)")
@pytest.mark.parametrize("version,ok", [("TLS1.1", False), ("TLS1.2", True), ("TLS1.3", True)])
def test_gnutls_judges_the_listener(est, ca, tools, version, ok):
    host, port = est.est.removeprefix("https://").rsplit(":", 1)
    out = tools.run(["gnutls-cli", f"--x509cafile={ca.root}", f"--port={port}", host,
                     f"--priority=NORMAL:-VERS-ALL:+VERS-{version}"], input=b"", check=False, timeout=30)
    text = out.stdout + out.stderr
    if ok:
        assert out.returncode == 0, text
        assert "Handshake was completed" in text and "The certificate is trusted" in text, text
        assert f"({version}-X.509)" in text, text
    else:
        assert out.returncode != 0 and "Handshake was completed" not in text, text
