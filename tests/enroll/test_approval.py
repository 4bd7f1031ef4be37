"""Approval binds a key, end to end: first enrollments of high-criticality devices over EST (curl)
and the RA API against the real `iomtca serve`, approved with the real `iomtca device` commands.
Fingerprints are computed independently by openssl (SHA-256 over the DER SubjectPublicKeyInfo)."""
from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timedelta, timezone

import pytest

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
SOURCE_B = "127.0.0.2"   # a second client as the server sees it (curl --interface)


@pytest.fixture(scope="module")
def est(start_server):
    return start_server("approval", approval_criticality=["high"])


@pytest.fixture(scope="module")
def ca(est):
    return est.ca


def openssl_fingerprint(ca, tools, key) -> str:
    """SHA-256 of the key's DER SubjectPublicKeyInfo: `openssl pkey -pubin -outform DER | sha256`."""
    pub_pem = ca.write("pub.pem", ca.pubkey_of_key(key).encode())
    pub_der = ca.work / f"{ca.unique('pub')}.der"
    tools.run(["openssl", "pkey", "-pubin", "-in", pub_pem, "-outform", "DER", "-out", pub_der])
    out = tools.run(["openssl", "dgst", "-sha256", "-r", pub_der]).stdout
    return out.split()[0].lower()


def colons(fp: str) -> str:
    return ":".join(fp[i:i + 2] for i in range(0, len(fp), 2)).upper()


class Device:
    """A high-criticality device with its token, and the keys it (or an impostor) enrolls with."""

    def __init__(self, est, ca, tools, stem: str) -> None:
        self.est, self.ca, self.tools = est, ca, tools
        self.id = ca.unique(stem)
        self.token = ca.add_device(self.id, criticality="high")

    def new_key(self, key_type: str = "ec"):
        key = self.ca.make_key(self.id, key_type)
        return key, openssl_fingerprint(self.ca, self.tools, key)

    def ask(self, key, source: str | None = None):
        _, csr = self.ca.make_csr(self.id, key=key)
        return self.est.est_post("simpleenroll", self.tools.b64_body(csr.read_bytes()),
                                 user=(self.id, self.token), source=source)

    def waits(self, key, source: str | None = None) -> None:
        with self.ca.no_new_certificates():
            reply = self.ask(key, source)
        assert reply.status == 202, reply
        assert (reply.header("retry-after") or "").isdigit(), reply.raw_headers

    def pending(self) -> list[dict]:
        return json.loads(self.ca.iomtca("device", "pending", self.id, "--json").stdout)

    def approve(self, *args, check: bool = True):
        return self.ca.iomtca("device", "approve", self.id, *args, check=check)


def refused(proc, *phrases: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.startswith("iomtca: error: "), proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr
    return proc.stderr


def test_two_keys_wait_and_only_the_approved_one_gets_through(est, ca, tools):
    dev = Device(est, ca, tools, "ventilator")
    (key_a, fp_a), (key_b, fp_b) = dev.new_key(), dev.new_key()
    dev.waits(key_a)
    dev.waits(key_b, source=SOURCE_B)     # say, an impostor holding the stolen token
    rows = {r["fingerprint"]: r for r in dev.pending()}
    assert set(rows) == {fp_a, fp_b}
    assert rows[fp_a]["source"] == "127.0.0.1" and rows[fp_b]["source"] == SOURCE_B
    assert {r["key_type"] for r in rows.values()} == {"EC P-256"}
    assert {r["state"] for r in rows.values()} == {"waiting"}

    refused(dev.approve(check=False), "2 keys wait", "--fingerprint", fp_a, fp_b)
    out = dev.approve("--fingerprint", colons(fp_b)).stdout   # upper case, with colons
    assert f"EC P-256 {fp_b}" in out and dev.id in out, out

    dev.waits(key_a)                                  # not the approved key: it waits again
    rows = {r["fingerprint"]: r for r in dev.pending()}
    assert rows[fp_a]["state"] == "waiting" and rows[fp_b]["state"] == "approved", rows
    assert rows[fp_b]["approved_by"].startswith("operator:")

    approved = dev.ask(key_b)
    assert approved.status == 200, approved
    issued = est.device_cert(dev.id, key_b, approved)
    ca.openssl_verify(issued.cert_path)
    assert ca.pubkey_of_cert(issued.cert_path) == ca.pubkey_of_key(key_b)
    assert dev.pending() == []                        # the approval is used up with the others

    pending_audit = ca.audit("enroll_pending_approval", dev.id)
    assert sorted(r["detail"]["fingerprint"] for r in pending_audit) == sorted([fp_a, fp_b])
    assert [r["detail"]["fingerprint"] for r in ca.audit("enroll_approved", dev.id)] == [fp_b]


def test_one_waiting_key_is_approved_without_fingerprint_and_the_command_says_which(est, ca, tools):
    dev = Device(est, ca, tools, "monitor")
    key, fp = dev.new_key("rsa2048")
    dev.waits(key)
    first = dev.pending()[0]
    dev.waits(key, source=SOURCE_B)                   # the same key again: no second row, no audit
    [row] = dev.pending()
    assert row["fingerprint"] == fp and row["key_type"] == "RSA 2048"
    assert row["source"] == SOURCE_B and row["requested_at"] == first["requested_at"]
    assert row["last_seen_at"] >= first["last_seen_at"]
    assert len(ca.audit("enroll_pending_approval", dev.id)) == 1

    out = dev.approve().stdout
    assert f"RSA 2048 {fp}" in out, out
    reply = dev.ask(key)
    assert reply.status == 200, reply
    # used: a later first enrollment (fresh token, same key) needs a new approval
    dev.token = json.loads(ca.iomtca("device", "token", dev.id, "--json").stdout)["token"]
    dev.waits(key)
    assert [r["state"] for r in dev.pending()] == ["waiting"]


def test_approve_with_nothing_waiting_or_a_wrong_fingerprint_is_an_error(est, ca, tools):
    dev = Device(est, ca, tools, "pump")
    refused(dev.approve(check=False), "no enrollment", "waits for approval")
    key, fp = dev.new_key()
    _, other_fp = dev.new_key()
    dev.waits(key)
    refused(dev.approve("--fingerprint", other_fp, check=False), other_fp, fp)
    refused(dev.approve("--fingerprint", "xyz", check=False), "64 hex digits")
    refused(dev.approve("--fingerprint", fp[:-1], check=False), "64 hex digits")
    dev.waits(key)                                    # nothing was approved by the failed commands
    assert [r["state"] for r in dev.pending()] == ["waiting"]
    assert ca.audit("enroll_approved", dev.id) == []
    assert fp in dev.approve("--fingerprint", fp.upper()).stdout


def test_pending_lists_key_type_fingerprint_source_and_time(est, ca, tools):
    dev = Device(est, ca, tools, "infusion")
    key, fp = dev.new_key()
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    dev.waits(key, source=SOURCE_B)
    text = ca.iomtca("device", "pending").stdout
    header, *lines = text.splitlines()
    for column in ("DEVICE_ID", "KEY_TYPE", "FINGERPRINT", "SOURCE", "REQUESTED_AT"):
        assert column in header, header
    [line] = [ln for ln in lines if ln.startswith(dev.id + " ")]
    assert "EC P-256" in line and fp in line and SOURCE_B in line and RFC3339.search(line), line
    [row] = [r for r in json.loads(ca.iomtca("device", "pending", "--json").stdout) if r["device_id"] == dev.id]
    assert {"device_id", "key_type", "fingerprint", "source", "requested_at", "last_seen_at"} <= set(row)
    assert (row["key_type"], row["fingerprint"], row["source"]) == ("EC P-256", fp, SOURCE_B)
    at = datetime.fromisoformat(row["requested_at"].replace("Z", "+00:00"))
    assert before <= at <= datetime.now(timezone.utc) + timedelta(seconds=2)


def test_a_relayed_request_waits_with_its_gateway_as_source(est, ca, tools):
    gateway = ca.ra.name                  # the RA credential (made on first use: a certificate)
    dev = Device(est, ca, tools, "relayed")
    key, fp = dev.new_key()
    _, csr = ca.make_csr(dev.id, key=key)
    body = ca.write("ra.json", json.dumps({"csr": base64.b64encode(csr.read_bytes()).decode(),
                                           "token": dev.token}).encode())
    with ca.no_new_certificates():
        reply = est.https(f"/ra/v1/devices/{dev.id}/simpleenroll", "--cert", ca.ra_cert, "--key", ca.ra_key,
                          "--pass", ca.ra_passphrase, "-H", "Content-Type: application/json",
                          "--data-binary", f"@{body}")
    assert reply.status == 202, reply
    [row] = dev.pending()
    assert row["fingerprint"] == fp and row["source"] == f"ra:{gateway}", row


def test_serverkeygen_waits_with_the_clients_request_key(est, ca, tools):
    """serverkeygen makes a new key on every attempt: the approval names the key of the client's
    own request CSR (which the client proves), so one request waits and its approval lets it through."""
    dev = Device(est, ca, tools, "keygen")
    key, fp = dev.new_key()
    _, csr = ca.make_csr(dev.id, key=key)
    body = tools.b64_body(csr.read_bytes())
    with ca.no_new_certificates():
        assert est.est_post("serverkeygen", body, user=(dev.id, dev.token)).status == 202
    assert [r["fingerprint"] for r in dev.pending()] == [fp]
    dev.approve("--fingerprint", fp)
    assert est.est_post("serverkeygen", body, user=(dev.id, dev.token)).status == 200


def test_a_new_token_drops_the_waiting_keys_and_keeps_an_approved_one(est, ca, tools):
    """`device token` after a theft: the keys that asked with the old token stop waiting (audited);
    an approved key stays approved, and still needs the new token."""
    dev = Device(est, ca, tools, "monitor")
    (key_a, fp_a), (key_b, fp_b) = dev.new_key(), dev.new_key()
    dev.waits(key_a)
    dev.waits(key_b, source=SOURCE_B)
    dev.approve("--fingerprint", fp_a)
    old_token = dev.token
    dev.token = json.loads(ca.iomtca("device", "token", dev.id, "--json").stdout)["token"]
    assert [(r["fingerprint"], r["state"]) for r in dev.pending()] == [(fp_a, "approved")]
    [rejected] = ca.audit("enroll_approval_rejected", dev.id)
    assert rejected["detail"]["fingerprints"] == [fp_b] and rejected["detail"]["why"] == "new token"
    with ca.no_new_certificates():
        _, csr = ca.make_csr(dev.id, key=key_a)
        stale = est.est_post("simpleenroll", tools.b64_body(csr.read_bytes()), user=(dev.id, old_token))
    assert stale.status == 401, stale
    ok = dev.ask(key_a)
    assert ok.status == 200, ok
