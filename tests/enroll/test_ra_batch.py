"""The RA API's batch call (enroll/ra_batch.py) against a real `iomtca serve`, driven by curl with
the gateway's RA client certificate; CSRs and CMS renewals made by openssl as a device would;
certificates judged by `openssl verify`, OCSP responses by `openssl ocsp -respin`, and what was
issued read from the CA's database."""
from __future__ import annotations

import base64
import json
import sqlite3

import pytest

BATCH_MAX = 256   # enroll/ra_batch.py: what the server says it allows, in its refusals


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("ra-batch")


@pytest.fixture(scope="module")
def ca(srv):
    return srv.ca


def post(srv, body, *, client="ra"):
    args = ["-X", "POST", "-H", "Content-Type: application/json"]
    if client == "ra":
        args += ["--cert", srv.ca.ra_cert, "--key", srv.ca.ra_key, "--pass", srv.ca.ra_passphrase]
    elif client is not None:
        args += ["--cert", client["cert_path"], "--key", client["key"]]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    args += ["--data-binary", f"@{srv.ca.write('batch-body.json', data)}"]
    return srv.https("/ra/v1/batch", *args)


def b64file(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def enroll_item(ca, device_id: str, token: str, request_id: str | None = None):
    key, csr = ca.make_csr(device_id)
    item = {"op": "simpleenroll", "device_id": device_id, "csr": b64file(csr), "token": token}
    if request_id is not None:
        item["request_id"] = request_id
    return key, item


def db_certs(ca, device_id: str) -> list[str]:
    conn = sqlite3.connect(f"file:{ca.home / 'iomtca.db'}?mode=ro", uri=True, timeout=30)
    try:
        return [r[0] for r in conn.execute("SELECT serial FROM certificates WHERE device_id = ? ORDER BY serial",
                                           (device_id,))]
    finally:
        conn.close()


def check_ok(ca, tools, result: dict, device_id: str, key) -> dict:
    """An `ok` result: a certificate from our CA for the device's key, in the database, with an
    OCSP response that verifies (openssl, responder certificate and chain) and says good."""
    assert result["status"] == "ok", result
    pem = ca.work / f"{ca.unique(device_id)}.pem"
    der = ca.write(f"{device_id}.der", base64.b64decode(result["cert"], validate=True))
    tools.run(["openssl", "x509", "-inform", "DER", "-in", der, "-out", pem])
    ca.openssl_verify(pem)
    assert ca.pubkey_of_cert(pem) == ca.pubkey_of_key(key)
    serial = tools.run(["openssl", "x509", "-in", pem, "-noout", "-serial"]).stdout.strip().split("=")[1]
    assert int(serial, 16) == int(result["serial"], 16)
    assert format(int(result["serial"], 16), "x") in [format(int(s, 16), "x") for s in db_certs(ca, device_id)]
    resp = ca.write("batch-ocsp.der", base64.b64decode(result["ocsp"], validate=True))
    out = tools.run(["openssl", "ocsp", "-respin", resp, "-issuer", ca.issuing, "-cert", pem, "-no_nonce",
                     "-VAfile", ca.ocsp_cert, "-CAfile", ca.chain])
    text = out.stdout + out.stderr
    assert "Response verify OK" in text and f"{pem}: good" in text, text
    return {"pem": pem, "key": key}


def cms_renewal(ca, tools, signer: dict, device_id: str):
    new_key, csr = ca.make_csr(device_id)
    out = ca.work / f"{ca.unique('renew')}.cms.der"
    tools.run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-in", csr, "-inform", "DER", "-signer",
               signer["pem"], "-inkey", signer["key"], "-outform", "DER", "-out", out])
    return new_key, b64file(out)


def test_good_and_bad_items_each_get_their_own_result(srv, ca, tools):
    good = [ca.unique("batch-good") for _ in range(3)]
    tokens = {d: ca.add_device(d) for d in good}
    refused = ca.unique("batch-wrong-token")
    refused_token = ca.add_device(refused)
    keys, items = {}, []
    for d in good:
        keys[d], item = enroll_item(ca, d, tokens[d], request_id="r1")
        items.append(item)
    _, wrong = enroll_item(ca, refused, "not-the-token")
    items.insert(1, wrong)
    items.append({"op": "simpleenroll", "device_id": "no such device!", "csr": "AAAA", "token": "x"})
    items.append({"op": "frobnicate", "device_id": good[0]})
    items.append({"op": "simpleenroll", "device_id": good[0], "csr": "%%%", "token": tokens[good[0]]})
    reply = post(srv, {"requests": items})
    assert reply.status == 200, reply
    results = reply.json()["results"]
    assert len(results) == len(items)
    # in order: good[0], the wrong token, good[1], good[2], then the three malformed ones
    held = {}
    for index, device_id in ((0, good[0]), (2, good[1]), (3, good[2])):
        held[device_id] = check_ok(ca, tools, results[index], device_id, keys[device_id])
        assert len(db_certs(ca, device_id)) == 1
    assert results[1] == {"status": "error", "code": "unauthorized", "message": results[1]["message"],
                          "retry_after": None, "http_status": 401}, results[1]
    for result in results[4:]:
        assert result["status"] == "error" and result["code"] == "bad_request", result
        assert result["http_status"] == 400 and result["message"], result
    assert "device id" in results[4]["message"] and "op" in results[5]["message"]
    # the refused item spent nothing: its device enrolls with its real token
    assert db_certs(ca, refused) == []
    key, item = enroll_item(ca, refused, refused_token)
    check_ok(ca, tools, post(srv, {"requests": [item]}).json()["results"][0], refused, key)

    # renewals in a batch: CMS-signed by the certificate just issued; a second CMS signed by the
    # wrong device's certificate fails alone
    new_key, cms = cms_renewal(ca, tools, held[good[0]], good[0])
    _, forged = cms_renewal(ca, tools, held[good[1]], good[2])
    reply = post(srv, {"requests": [{"op": "simplereenroll", "device_id": good[0], "cms": cms, "request_id": "n1"},
                                    {"op": "simplereenroll", "device_id": good[2], "cms": forged}]})
    renewed, wrong_signer = reply.json()["results"]
    check_ok(ca, tools, renewed, good[0], new_key)
    assert wrong_signer["status"] == "error" and wrong_signer["http_status"] == 401, wrong_signer
    assert len(db_certs(ca, good[0])) == 2 and len(db_certs(ca, good[2])) == 1


def test_the_same_request_id_gets_the_same_certificate(srv, ca, tools):
    device_id = ca.unique("batch-idem")
    token = ca.add_device(device_id)
    key, item = enroll_item(ca, device_id, token, request_id="same-1")
    results = post(srv, {"requests": [item, item]}).json()["results"]
    check_ok(ca, tools, results[0], device_id, key)
    assert results[1]["status"] == "ok" and results[1]["serial"] == results[0]["serial"], results
    again = post(srv, {"requests": [item]}).json()["results"][0]
    assert again["serial"] == results[0]["serial"] and again["cert"] == results[0]["cert"]
    assert len(db_certs(ca, device_id)) == 1
    assert len(ca.audit("certificate_issued", device_id)) == 1


def test_a_malformed_envelope_is_a_400(srv, ca):
    device_id = ca.unique("batch-big")
    token = ca.add_device(device_id)
    _, item = enroll_item(ca, device_id, token)
    with ca.no_new_certificates():
        reply = post(srv, {"requests": [item] * (BATCH_MAX + 1)})
        assert reply.status == 400, reply
        body = reply.json()
        assert body["code"] == "bad_request" and f"1 to {BATCH_MAX}" in body["message"], body
        assert f"got {BATCH_MAX + 1}" in body["message"], body
        for bad in ({"requests": []}, {"requests": "x"}, {}, {"requests": [item, 7]}, [item]):
            reply = post(srv, bad)
            assert reply.status == 400 and reply.json()["code"] == "bad_request", (str(bad)[:80], reply)
        assert post(srv, b"{not json").status == 400
        # bytes, too: over 8 KiB per allowed item on average is refused before it is parsed
        reply = post(srv, {"requests": [{"op": "simpleenroll", "pad": "x" * (BATCH_MAX * 8 * 1024)}]})
        assert reply.status == 413 and reply.json()["code"] == "bad_request", reply
        assert str(BATCH_MAX * 8 * 1024) in reply.json()["message"], reply
    # none of that spent the token
    assert post(srv, {"requests": [item]}).json()["results"][0]["status"] == "ok"


def test_only_the_ra_certificate_gets_in(srv, ca, tools):
    device_id = ca.unique("batch-outsider")
    key, item = enroll_item(ca, device_id, ca.add_device(device_id))
    held = check_ok(ca, tools, post(srv, {"requests": [item]}).json()["results"][0], device_id, key)
    other = ca.unique("batch-victim")
    _, victim = enroll_item(ca, other, ca.add_device(other))
    with ca.no_new_certificates():
        for client in (None, {"cert_path": held["pem"], "key": held["key"]}):
            reply = post(srv, {"requests": [victim]}, client=client)
            assert reply.status == 403, reply
            assert reply.json()["code"] == "policy_violation", reply
