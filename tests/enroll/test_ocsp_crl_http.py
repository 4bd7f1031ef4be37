"""OCSP (RFC 6960, RFC 5019) and the CRL over the plain-HTTP listener of `iomtca serve`,
judged by `openssl ocsp` / `openssl crl`; requests are made by openssl and sent by curl."""
from __future__ import annotations

import base64
import re
import time
import urllib.parse
import urllib.request

import pytest
from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("ocsp")


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


@pytest.fixture
def dev(srv, ca):
    """A device certificate issued over EST."""
    device_id = ca.unique("ocsp-dev")
    return srv.enroll(device_id, ca.add_device(device_id))


def openssl_ocsp(srv, ca, tools, target, *, nonce: bool = True, check: bool = True):
    """`openssl ocsp` against the listener, verifying the response with the responder certificate."""
    what = ["-cert", target.cert_path] if hasattr(target, "cert_path") else ["-serial", target]
    out = tools.run(["openssl", "ocsp", "-issuer", ca.issuing, *what, "-url", f"{srv.http}/ocsp",
                     "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain, *([] if nonce else ["-no_nonce"])],
                    check=check)
    return out.stdout + out.stderr


def ocsp_request(ca, tools, target, *, nonce: bool) -> bytes:
    path = ca.work / f"{ca.unique('ocsp-req')}.der"
    what = ["-cert", target.cert_path] if hasattr(target, "cert_path") else ["-serial", target]
    tools.run(["openssl", "ocsp", "-issuer", ca.issuing, *what, *([] if nonce else ["-no_nonce"]),
               "-reqout", path])
    return path.read_bytes()


def verify_respin(ca, tools, resp: bytes, target, *, reqin: bytes | None = None) -> str:
    """`openssl ocsp -respin`: signature and chain check, and the status of `target`."""
    resp_path = ca.write("ocsp-resp.der", resp)
    if reqin is not None:
        args = ["-reqin", ca.write("ocsp-req.der", reqin)]
    else:
        args = ["-issuer", ca.issuing, "-cert", target.cert_path, "-no_nonce"]
    out = tools.run(["openssl", "ocsp", "-respin", resp_path, *args, "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain])
    return out.stdout + out.stderr


def post_ocsp(srv, der: bytes) -> bytes:
    """A plain POST (urllib) for the bounded poll loop, where spawning curl each time would blur it."""
    req = urllib.request.Request(f"{srv.http}/ocsp", data=der, headers={"Content-Type": "application/ocsp-request"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
        return resp.read()


def get_crl(srv) -> x509.CertificateRevocationList:
    with urllib.request.urlopen(f"{srv.http}/crl", timeout=5) as resp:
        return x509.load_der_x509_crl(resp.read())


@pytest.mark.parametrize("nonce", [True, False], ids=["nonce", "no-nonce"])
def test_good(srv, ca, tools, dev, nonce):
    text = openssl_ocsp(srv, ca, tools, dev, nonce=nonce)
    assert "Response verify OK" in text, text
    assert f"{dev.cert_path}: good" in text, text
    assert "WARNING: no nonce" not in text, text   # echoed when asked, not invented when not


@pytest.mark.parametrize("nonce", [True, False], ids=["nonce", "no-nonce"])
def test_revoked_with_reason(srv, ca, tools, dev, nonce):
    ca.revoke(dev.serial_hex, "keyCompromise")
    deadline = time.monotonic() + 2
    while True:
        text = openssl_ocsp(srv, ca, tools, dev, nonce=nonce)
        if ": revoked" in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "Response verify OK" in text, text
    assert f"{dev.cert_path}: revoked" in text, text
    assert "Reason: keyCompromise" in text and "Revocation Time:" in text, text


@pytest.mark.parametrize("nonce", [True, False], ids=["nonce", "no-nonce"])
def test_unknown_serial(srv, ca, tools, nonce):
    text = openssl_ocsp(srv, ca, tools, "0x1234", nonce=nonce)
    assert "Response verify OK" in text, text
    assert "0x1234: unknown" in text, text


def test_request_about_another_issuer_is_unauthorized(srv, ca, tools):
    der = ocsp_request(ca, tools, "0x1234", nonce=False)
    # the same serial asked of the root CA (not the issuer this responder answers for)
    path = ca.work / f"{ca.unique('ocsp-req')}.der"
    tools.run(["openssl", "ocsp", "-issuer", ca.root, "-serial", "0x1234", "-no_nonce", "-reqout", path])
    assert path.read_bytes() != der
    parsed = x509_ocsp.load_der_ocsp_response(post_ocsp(srv, path.read_bytes()))
    assert parsed.response_status is x509_ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_get_form(srv, ca, tools, dev):
    der = ocsp_request(ca, tools, dev, nonce=False)
    reply = srv.plain("/ocsp/" + urllib.parse.quote(base64.b64encode(der).decode(), safe=""))
    assert reply.status == 200, reply
    assert reply.header("content-type") == "application/ocsp-response"
    text = verify_respin(ca, tools, reply.body, dev)
    assert "Response verify OK" in text and f"{dev.cert_path}: good" in text, text
    # RFC 5019 6.2: a cacheable answer says for how long
    cache = reply.header("cache-control") or ""
    assert re.search(r"max-age=\d+", cache) and reply.header("expires") and reply.header("last-modified"), \
        reply.raw_headers


@pytest.mark.parametrize("encode", ["percent-encoded", "raw"])
def test_get_form_with_slash_and_plus_in_the_base64(srv, ca, tools, encode):
    """'/' and '+' in the base64 text: url-encoded as RFC 6960 A.1 says, or raw as some clients send."""
    for n in range(0x1000, 0x1100):
        der = ocsp_request(ca, tools, hex(n), nonce=False)
        b64 = base64.b64encode(der).decode()
        if "/" in b64 and "+" in b64:
            break
    else:
        pytest.fail("no request with '/' and '+' in its base64 among 256 serials")
    path = urllib.parse.quote(b64, safe="") if encode == "percent-encoded" else b64
    reply = srv.plain(f"/ocsp/{path}")
    assert reply.status == 200, reply
    parsed = x509_ocsp.load_der_ocsp_response(reply.body)
    assert parsed.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
    assert parsed.serial_number == n and parsed.certificate_status is x509_ocsp.OCSPCertStatus.UNKNOWN
    text = verify_respin(ca, tools, reply.body, None, reqin=der)
    assert "Response verify OK" in text, text


def test_get_form_with_nonce_is_answered_fresh(srv, ca, tools, dev):
    der = ocsp_request(ca, tools, dev, nonce=True)
    reply = srv.plain("/ocsp/" + urllib.parse.quote(base64.b64encode(der).decode(), safe=""))
    assert reply.status == 200, reply
    text = verify_respin(ca, tools, reply.body, dev, reqin=der)
    assert "Response verify OK" in text and "Nonce Verify error" not in text, text
    request_nonce = x509_ocsp.load_der_ocsp_request(der).extensions.get_extension_for_class(x509.OCSPNonce)
    parsed = x509_ocsp.load_der_ocsp_response(reply.body)
    assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value == request_nonce.value
    assert parsed.certificate_status is x509_ocsp.OCSPCertStatus.GOOD
    assert "max-age" not in (reply.header("cache-control") or "")


def test_crl(srv, ca, tools, dev):
    ca.revoke(dev.serial_hex, "affiliationChanged")
    deadline = time.monotonic() + 2
    while get_crl(srv).get_revoked_certificate_by_serial_number(dev.cert.serial_number) is None:
        assert time.monotonic() < deadline, "revocation never reached /crl"
        time.sleep(0.05)
    reply = srv.plain("/crl")
    assert reply.status == 200, reply
    assert reply.header("content-type") == "application/pkix-crl"
    crl = x509.load_der_x509_crl(reply.body)
    http_date = "%a, %d %b %Y %H:%M:%S GMT"
    assert reply.header("last-modified") == crl.last_update_utc.strftime(http_date), reply.raw_headers
    assert reply.header("expires") == crl.next_update_utc.strftime(http_date), reply.raw_headers
    der = ca.write("crl.der", reply.body)
    out = tools.run(["openssl", "crl", "-inform", "DER", "-in", der, "-CAfile", ca.chain, "-noout", "-verify",
                     "-text"])
    assert "verify OK" in out.stderr + out.stdout, out.stderr
    text = out.stdout
    listed = {int(m, 16) for m in re.findall(r"Serial Number: ([0-9A-F]+)", text)}
    assert dev.cert.serial_number in listed, text
    assert "Affiliation Changed" in text, text
    issuer = tools.run(["openssl", "x509", "-in", ca.issuing, "-noout", "-subject"]).stdout.split("=", 1)[1]
    assert issuer.strip() in text, text


def test_revocation_reaches_ocsp_and_crl_within_one_second(srv, ca, tools, dev):
    request = ocsp_request(ca, tools, dev, nonce=False)   # no nonce: served from the responder's cache
    status = x509_ocsp.load_der_ocsp_response(post_ocsp(srv, request)).certificate_status
    assert status is x509_ocsp.OCSPCertStatus.GOOD   # and now a "good" answer sits in the cache
    assert get_crl(srv).get_revoked_certificate_by_serial_number(dev.cert.serial_number) is None

    ca.revoke(dev.serial_hex, "keyCompromise")
    revoked_at = time.monotonic()
    seen_ocsp = seen_crl = None
    while time.monotonic() - revoked_at <= 1.0 and (seen_ocsp is None or seen_crl is None):
        now = time.monotonic() - revoked_at
        if seen_ocsp is None:
            resp = x509_ocsp.load_der_ocsp_response(post_ocsp(srv, request))
            if resp.certificate_status is x509_ocsp.OCSPCertStatus.REVOKED:
                seen_ocsp = now
        if seen_crl is None and get_crl(srv).get_revoked_certificate_by_serial_number(dev.cert.serial_number):
            seen_crl = now
        time.sleep(0.05)
    assert seen_ocsp is not None and seen_ocsp <= 1.0, "OCSP still said good 1 s after `cert revoke` returned"
    assert seen_crl is not None and seen_crl <= 1.0, "/crl did not list the serial 1 s after `cert revoke`"
    # and openssl agrees
    text = openssl_ocsp(srv, ca, tools, dev, nonce=False)
    assert f"{dev.cert_path}: revoked" in text and "Reason: keyCompromise" in text, text


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
def test_post_with_wrong_content_type_is_415(srv, ca, tools, dev, content_type):
    der = ocsp_request(ca, tools, dev, nonce=False)
    reply = srv.plain("/ocsp", "-H", f"Content-Type: {content_type}", "--data-binary", f"@{ca.write('req.der', der)}")
    assert reply.status == 415, reply
    assert "application/ocsp-request" in reply.text


@pytest.mark.parametrize("body", [b"\x30\x03\x02\x01\x01", b"not DER at all", b"\x30\x80"],
                         ids=["wrong-structure", "not-der", "indefinite-length"])
def test_malformed_post_gets_malformed_request(srv, ca, body):
    reply = srv.plain("/ocsp", "-H", "Content-Type: application/ocsp-request",
                      "--data-binary", f"@{ca.write('bad-req.der', body)}")
    assert reply.status == 200 and reply.header("content-type") == "application/ocsp-response", reply
    parsed = x509_ocsp.load_der_ocsp_response(reply.body)
    assert parsed.response_status is x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize("path", ["!!!not-base64!!!", urllib.parse.quote(base64.b64encode(b"junk").decode(), safe="")])
def test_malformed_get_gets_malformed_request(srv, path):
    reply = srv.plain(f"/ocsp/{path}")
    assert reply.status == 200, reply
    parsed = x509_ocsp.load_der_ocsp_response(reply.body)
    assert parsed.response_status is x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize("nonce", [True, False], ids=["nonce", "no-nonce"])
def test_negative_serial_is_answered_not_500(srv, ca, tools, nonce):
    der = ocsp_request(ca, tools, "-0x5", nonce=nonce)
    reply = srv.plain("/ocsp", "-H", "Content-Type: application/ocsp-request",
                      "--data-binary", f"@{ca.write('neg-req.der', der)}", allow_5xx=(500,))
    assert reply.status == 200, reply
    parsed = x509_ocsp.load_der_ocsp_response(reply.body)
    assert (parsed.response_status is x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST
            or parsed.certificate_status is x509_ocsp.OCSPCertStatus.UNKNOWN)


def test_oversized_post_is_413(srv, ca):
    reply = srv.plain("/ocsp", "-H", "Content-Type: application/ocsp-request",
                      "--data-binary", f"@{ca.write('huge.der', bytes(20 * 1024))}")
    assert reply.status == 413, reply


def test_oversized_post_names_the_ocsp_limit(srv, ca):
    reply = srv.plain("/ocsp", "-H", "Content-Type: application/ocsp-request",
                      "--data-binary", f"@{ca.write('huge.der', bytes(20 * 1024))}")
    assert reply.status == 413
    assert "10240" in reply.text, reply.text


def test_plain_http_serves_no_est_and_the_issuer_certificate(srv, ca, tools):
    # EST (Basic tokens) must never be reachable without TLS
    for path in ("/.well-known/est/cacerts", "/.well-known/est/simpleenroll", "/ra/v1/certificates"):
        assert srv.plain(path).status in (404, 405)
    reply = srv.plain("/ca.cer")
    assert reply.status == 200 and reply.header("content-type") == "application/pkix-cert"
    got = x509.load_der_x509_certificate(reply.body)
    assert got == x509.load_pem_x509_certificate(ca.issuing.read_bytes())
