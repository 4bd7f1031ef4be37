"""What a broken or hostile EST client gets: a 4xx with a plain-text reason, never a 500, no
certificate, an audit entry for every refusal that reached the CA, and a server still answering.
The client is curl; the CSRs are made by openssl."""
from __future__ import annotations

import subprocess
import urllib.parse

import pytest

from tests.enroll.conftest import IOMTCA, env


@pytest.fixture(scope="module")
def est(start_server):
    return start_server("badinput")


@pytest.fixture(scope="module")
def ca(est):
    return est.ca


@pytest.fixture
def device(ca):
    """A fresh registered device: (id, token)."""
    device_id = ca.unique("dev")
    return device_id, ca.add_device(device_id)


def refused(reply, status: int, *fragments: str) -> None:
    """A refusal in words a technician can read: text/plain, one short printable reason."""
    assert reply.status == status, reply
    assert (reply.header("content-type") or "").startswith("text/plain"), reply.raw_headers
    text = reply.body.decode("utf-8")
    assert text.strip() and text.rstrip("\n").isprintable(), text
    assert "Traceback" not in text and len(text) < 2000, text
    for fragment in fragments:
        assert fragment.lower() in text.lower(), text


def refusal_audited(ca, device_id: str, code: str) -> None:
    rows = ca.audit("enroll_refused", device_id)
    assert rows, f"no enroll_refused audit entry for {device_id}"
    assert rows[-1]["detail"]["code"] == code, rows[-1]


def token_still_works(est, device) -> None:
    """README: a refused attempt does not burn a valid token."""
    est.enroll(*device)


def post(est, ca, device, body: bytes, **kw):
    with ca.no_new_certificates():
        return est.est_post("simpleenroll", body, user=device, **kw)


def test_garbage_base64_is_400(est, ca, device):
    reply = post(est, ca, device, b"this is !!! not base64 @@@\n")
    refused(reply, 400, "base64")


def test_empty_body_is_400(est, ca, device):
    refused(post(est, ca, device, b""), 400, "empty")


def test_base64_of_garbage_der_is_400(est, ca, device, tools):
    reply = post(est, ca, device, tools.b64_body(b"\x30\x82\x01\x00 certainly not a PKCS#10 request" * 4))
    refused(reply, 400, "PKCS#10")


def test_truncated_csr_is_400(est, ca, device, tools):
    _, csr = ca.make_csr(device[0])
    reply = post(est, ca, device, tools.b64_body(csr.read_bytes()[:-20]))
    refused(reply, 400, "CSR")
    token_still_works(est, device)


def test_csr_whose_signature_fails_is_400(est, ca, device, tools):
    _, csr = ca.make_csr(device[0])
    der = bytearray(csr.read_bytes())
    der[-3] ^= 0x01   # inside the signature value: still DER, no longer a valid signature
    reply = post(est, ca, device, tools.b64_body(bytes(der)))
    refused(reply, 400, "signature")
    refusal_audited(ca, device[0], "bad_request")
    token_still_works(est, device)


def test_csr_asking_for_another_devices_san_is_403(est, ca, device, tools):
    _, csr = ca.make_csr(device[0], addext=(f"subjectAltName=URI:spiffe://{tools.TRUST_DOMAIN}/device/other",))
    reply = post(est, ca, device, tools.b64_body(csr.read_bytes()))
    refused(reply, 403, f"spiffe://{tools.TRUST_DOMAIN}/device/other")
    refusal_audited(ca, device[0], "policy_violation")
    token_still_works(est, device)


def test_csr_naming_its_own_spiffe_id_is_accepted(est, ca, device, tools):
    _, csr = ca.make_csr(device[0], addext=(f"subjectAltName=URI:spiffe://{tools.TRUST_DOMAIN}/device/{device[0]}",))
    reply = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes()), user=device)
    assert reply.status == 200, reply


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None])
def test_wrong_content_type_is_415(est, ca, device, tools, content_type):
    _, csr = ca.make_csr(device[0])
    reply = post(est, ca, device, tools.b64_body(csr.read_bytes()), content_type=content_type)
    refused(reply, 415, "application/pkcs10")


def test_body_over_64_kib_is_413(est, ca, device):
    reply = post(est, ca, device, b"A" * (64 * 1024 + 4))
    refused(reply, 413, "65536")


def test_chunked_body_over_64_kib_is_413_and_a_chunked_csr_is_fine(est, ca, device, tools):
    chunked = ("Transfer-Encoding: chunked",)
    refused(post(est, ca, device, b"A" * (64 * 1024 + 4), headers=chunked), 413)
    key, csr = ca.make_csr(device[0])
    reply = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes(), "lf64"), user=device, headers=chunked)
    assert reply.status == 200, reply
    ca.openssl_verify(est.device_cert(device[0], key, reply).cert_path)


def test_one_token_spent_by_parallel_requests_gives_one_certificate(est, ca, device, tools):
    """Five clients race with the same token: exactly one certificate."""
    _, csr = ca.make_csr(device[0])
    body = ca.write("race.b64", tools.b64_body(csr.read_bytes()))
    before = ca.cert_count()
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca.root,
            "-u", f"{device[0]}:{device[1]}", "-H", "Content-Type: application/pkcs10",
            "--data-binary", f"@{body}", f"{est.est}{tools.EST}/simpleenroll"]
    procs = [subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(5)]
    codes = sorted(p.communicate(timeout=30)[0].decode() for p in procs)
    assert codes == ["200", "401", "401", "401", "401"], codes
    assert ca.cert_count() == before + 1


def test_pem_body_is_accepted(est, ca, device, tools):
    """Hand-made clients post PEM; the server says it takes it."""
    key, csr = ca.make_csr(device[0])
    pem = tools.run(["openssl", "req", "-inform", "DER", "-in", csr, "-outform", "PEM"]).stdout.encode()
    reply = est.est_post("simpleenroll", pem, user=device)
    assert reply.status == 200, reply
    assert est.device_cert(device[0], key, reply).cert.public_key() is not None


def test_weak_rsa_1024_key_is_403(est, ca, device, tools):
    _, csr = ca.make_csr(device[0], key_type="rsa1024")
    reply = post(est, ca, device, tools.b64_body(csr.read_bytes()))
    refused(reply, 403, "1024")
    refusal_audited(ca, device[0], "policy_violation")
    token_still_works(est, device)


def test_key_outside_the_allow_list_is_403(est, ca, device, tools):
    key = ca.work / f"{device[0]}-k1.key"
    tools.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1", "-out", key])
    _, csr = ca.make_csr(device[0], key=key)
    reply = post(est, ca, device, tools.b64_body(csr.read_bytes()))
    refused(reply, 403, "secp256k1")
    refusal_audited(ca, device[0], "policy_violation")
    # Ed25519 is on the list
    key = ca.work / f"{device[0]}-ed.key"
    tools.run(["openssl", "genpkey", "-algorithm", "ED25519", "-out", key])
    issued = est.enroll(*device, key=key)
    ca.openssl_verify(issued.cert_path)


def test_unknown_device_and_wrong_token_get_the_same_401(est, ca, device, tools):
    """A stranger cannot tell registered ids from others: status, body and headers are the same."""
    _, csr = ca.make_csr("ghost")
    body = tools.b64_body(csr.read_bytes())
    unknown = post(est, ca, ("ghost-device", "not-a-token"), body)
    wrong = post(est, ca, (device[0], "not-a-token"), body)
    for reply in (unknown, wrong):
        refused(reply, 401, "device id or enrollment token not accepted")
        assert reply.header("www-authenticate"), reply.raw_headers
        assert reply.header("x-error-code") == "unauthorized", reply.raw_headers
    assert unknown.body == wrong.body
    shown = lambda r: sorted((k, v) for k, v in r.headers.items() if k not in ("date", "content-length"))  # noqa: E731
    assert shown(unknown) == shown(wrong)
    # counted, not audited one by one (ca/failures.py audits per source and window)
    assert ca.audit("enroll_refused", "ghost-device") == []
    token_still_works(est, device)


def test_decommissioned_device_token_is_refused_like_any_wrong_one(est, ca, device, tools):
    """Decommissioning burns the token: a token login then tells nothing about the device."""
    ca.iomtca("device", "decommission", device[0])
    _, csr = ca.make_csr(device[0])
    reply = post(est, ca, device, tools.b64_body(csr.read_bytes()))
    refused(reply, 401, "not accepted")


def test_malformed_authorization_header_is_400(est, ca, device, tools):
    _, csr = ca.make_csr(device[0])
    reply = post(est, ca, None, tools.b64_body(csr.read_bytes()), headers=("Authorization: Basic %%%not-base64",))
    refused(reply, 400, "Basic")
    reply = post(est, ca, None, tools.b64_body(csr.read_bytes()), headers=("Authorization: Bearer abc",))
    refused(reply, 401, "Basic")
    token_still_works(est, device)


def test_a_stranger_guessing_tokens_locks_out_only_their_own_address(est, ca, device, tools):
    device_id, token = device
    _, csr = ca.make_csr(device_id)
    body = tools.b64_body(csr.read_bytes())
    for attempt in range(5):
        reply = post(est, ca, (device_id, f"wrong-token-{attempt}"), body, source="127.0.0.3")
        refused(reply, 401, "not accepted")
    sixth = post(est, ca, (device_id, "wrong-token-6"), body, source="127.0.0.3")
    refused(sixth, 429, "too many")
    retry = sixth.header("retry-after")
    assert retry is not None and retry.isdigit() and 0 < int(retry) <= 30 * 60, sixth.raw_headers
    # from the stranger's address even the right token waits...
    refused(post(est, ca, device, body, source="127.0.0.3"), 429)
    assert ca.audit("enroll_refused", device_id) == []
    # ...but the device, from its own address, enrolls
    issued = est.enroll(device_id, token)
    ca.openssl_verify(issued.cert_path)


def test_device_source_failures_sets_the_per_device_and_source_limit(start_server, tools):
    """[enroll] device_source_failures = 2: the third try for one device from one address waits,
    the right token from another address still enrolls; a bad value stops the server."""
    own = start_server("device-source-limit", enroll="device_source_failures = 2")
    device_id = own.ca.unique("dsl")
    token = own.ca.add_device(device_id)
    _, csr = own.ca.make_csr(device_id)
    body = tools.b64_body(csr.read_bytes())
    for n in range(2):
        refused(own.est_post("simpleenroll", body, user=(device_id, f"guess-{n}"), source="127.0.0.7"), 401)
    refused(own.est_post("simpleenroll", body, user=(device_id, token), source="127.0.0.7"), 429, "this device")
    assert own.est_post("simpleenroll", body, user=(device_id, token), source="127.0.0.8").status == 200


@pytest.mark.parametrize("setting", ["device_source_failures = 0", 'source_failures = "many"'])
def test_a_failure_limit_that_is_no_count_is_refused(ca, setting):
    config = ca.home / "config.toml"
    original = config.read_text()
    try:
        config.write_text(original + f"\n[enroll]\n{setting}\n" if "\n[enroll]" not in original
                          else original.replace("\n[enroll]\n", f"\n[enroll]\n{setting}\n", 1))
        proc = subprocess.run([str(IOMTCA), "serve", "--dir", str(ca.home), "--listen", "127.0.0.1:0",
                               "--http-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60, env=env())
    finally:
        config.write_text(original)
    assert proc.returncode != 0 and "must be a whole number" in proc.stderr, proc.stderr


def test_per_address_limit_spans_devices(start_server, tools):
    """[enroll] source_failures: wrong tokens for many devices from one address lock the address."""
    own = start_server("source-limit", enroll="source_failures = 3")
    devices = [(d, own.ca.add_device(d)) for d in (own.ca.unique("src") for _ in range(4))]
    _, csr = own.ca.make_csr("src")
    body = tools.b64_body(csr.read_bytes())
    for device_id, _ in devices[:3]:
        refused(own.est_post("simpleenroll", body, user=(device_id, "wrong")), 401, "not accepted")
    with own.ca.no_new_certificates():
        locked = own.est_post("simpleenroll", body, user=devices[3])
    refused(locked, 429, "address")
    assert locked.header("retry-after") and int(locked.header("retry-after")) > 0


def test_behind_a_trusted_proxy_the_source_is_the_forwarded_client(start_server, tools):
    """[enroll] trusted_proxies: clients behind one proxy are counted apart by X-Forwarded-For;
    the header from anyone else is ignored (the peer address counts)."""
    own = start_server("proxied", enroll='trusted_proxies = ["127.0.0.5/32"]')
    ca = own.ca
    pump, other = ca.unique("px"), ca.unique("px")
    tokens = {pump: ca.add_device(pump), other: ca.add_device(other)}
    _, csr = ca.make_csr(pump)
    body = tools.b64_body(csr.read_bytes())
    stranger = ("X-Forwarded-For: 192.0.2.66",)
    for n in range(5):
        refused(own.est_post("simpleenroll", body, user=(pump, f"guess-{n}"), headers=stranger, source="127.0.0.5"),
                401, "not accepted")
    refused(own.est_post("simpleenroll", body, user=(pump, tokens[pump]), headers=stranger, source="127.0.0.5"),
            429, "too many")
    # a spoofed header from an address that is no trusted proxy: that address is the source
    with ca.no_new_certificates():
        spoof = own.est_post("simpleenroll", body, user=(pump, "guess-x"), headers=stranger, source="127.0.0.6")
    refused(spoof, 401, "not accepted")
    # the pump, behind the same proxy with its own address, enrolls
    ok = own.est_post("simpleenroll", body, user=(pump, tokens[pump]), headers=("X-Forwarded-For: 192.0.2.10",),
                      source="127.0.0.5")
    assert ok.status == 200, ok


def test_proxy_client_cert_header_from_an_untrusted_client_does_not_authenticate(est, ca, device, tools):
    current = est.enroll(*device)
    header = "X-SSL-Client-Cert: " + urllib.parse.quote(current.cert_path.read_text(), safe="")
    _, csr = ca.make_csr(device[0], key=current.key)
    body = tools.b64_body(csr.read_bytes())
    with ca.no_new_certificates():
        reply = est.est_post("simplereenroll", body, headers=(header,))
    refused(reply, 401, "current certificate")
    # nor does it stand in for credentials on simpleenroll
    with ca.no_new_certificates():
        reply = est.est_post("simpleenroll", body, headers=(header,))
    refused(reply, 401, "authentication required")
    # the same certificate presented in TLS does renew: the refusal above was about the header
    est.reenroll(current)


@pytest.mark.parametrize("san_der", ["3004A3023000", "3004A5023000"], ids=["x400Address", "ediPartyName"])
def test_csr_with_an_unsupported_san_type_is_refused_not_500(est, ca, device, tools, san_der):
    _, csr = ca.make_csr(device[0], addext=(f"subjectAltName=DER:{san_der}",))
    with ca.no_new_certificates():
        reply = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes()), user=device, allow_5xx=(500,))
    assert reply.status in (400, 403), reply
    refusal_audited(ca, device[0], "bad_request" if reply.status == 400 else "policy_violation")


def test_the_gateway_ra_certificate_cannot_renew_into_a_device_certificate(est, ca, device, tools):
    _, csr = ca.make_csr(device[0])
    assert ca.ra   # the gateway's credential exists before the count starts
    with ca.no_new_certificates():
        reply = est.https(f"{tools.EST}/simplereenroll", "--cert", ca.ra_cert, "--key", ca.ra_key,
                          "--pass", ca.ra_passphrase, "-H", "Content-Type: application/pkcs10",
                          "--data-binary", f"@{ca.write('ra.b64', tools.b64_body(csr.read_bytes()))}")
    refused(reply, 401, "not a device certificate")


def test_server_survived_and_audit_log_is_intact(est, ca, tools):
    assert est.alive()
    reply = est.https(f"{tools.EST}/cacerts")
    assert reply.status == 200 and len(ca.pem_certs_from_pkcs7(reply.body)) == 2
    codes = {r["detail"]["code"] for r in ca.audit("enroll_refused")}
    # refusals of callers who proved something (a token, a certificate) are audited one by one;
    # anonymous ones are counted and audited per source and window (tests/ca/test_failures.py)
    assert {"bad_request", "policy_violation"} <= codes, codes
    assert not codes & {"unknown_device", "rate_limited"}, codes
    ca.audit_verify()
    assert est.unexpected_log_errors() is None, est.log_tail()
