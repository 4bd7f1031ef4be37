"""The evidence export in the core (ca/evidence.py), with an injected clock and a real store: what
the document says about devices, revocations, the audit chain and policy; the detached CMS
signature judged by the real `openssl cms -verify`; the evidence signer's certificate, its key
file, and its renewal."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import sqlite3
import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import pkcs7

from ca import evidence
from ca.authority import Authority, TokenAuth
from ca.bootstrap import init_ca
from ca.errors import BadRequestError, ConfigError, NotFoundError, UnauthorizedError
from ca.keystore import load_private_key_pem
from ca.model import RevocationReason, serial_hex
from ca.profiles import DOCUMENT_SIGNING
from ca.registry import new_device
from ca.service_certs import renew_at
from tests.conftest import make_csr

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

ACTOR = "operator:alice:auditor"
POLICY = """
[ca.models."infusion-pump"]
lifetime = "48h"
renewal_grace = "30d"

[ca.criticality.high]
renewal_grace = "1d"
non_attendance = "12h"
"""


@pytest.fixture
async def authority(ca_home, clock):
    with open(ca_home / "config.toml", "a") as config:
        config.write(POLICY)
    a = await Authority.open(ca_home, clock=clock)
    yield a
    await a.close()


async def enrolled(authority, device_id: str, **kw):
    token = await authority.registry.add(new_device(device_id, **kw), actor="test")
    return await authority.enroll(device_id, make_csr()[0], TokenAuth(token.secret))


@pytest.fixture
async def fleet(authority, clock):
    """pump-1 enrolled (and reporting a firmware nobody signed), monitor-1 enrolled then revoked
    for key compromise, idle-1 registered only."""
    pump = await enrolled(authority, "pump-1", model="infusion-pump", owner="ICU")
    monitor = await enrolled(authority, "monitor-1", model="bedside-monitor", owner="Cardiology", criticality="high")
    await authority.registry.add(new_device("idle-1", model="bedside-monitor", owner="Stores"), actor="test")
    await authority.record_reported_posture("pump-1", {"firmware": "9.9-claimed"})
    clock.advance(minutes=10)
    await authority.revoke(monitor.serial, RevocationReason.keyCompromise, actor="operator:sec")
    clock.advance(minutes=10)
    return pump, monitor


async def audit_rows(authority):
    async with authority.store.read() as tx:
        return await tx.audit_rows()


def openssl_verify(tmp_path: Path, data: bytes, signature: bytes, root: Path, at, *extra: str):
    content, sig = tmp_path / "evidence.json", tmp_path / "evidence.json.sig"
    content.write_bytes(data)
    sig.write_bytes(signature)
    # -attime: the fake clock's time (the CA tests live at T0, not today)
    return subprocess.run(["openssl", "cms", "-verify", "-binary", "-content", content, "-inform", "DER", "-in", sig,
                           "-CAfile", root, "-out", "/dev/null", "-attime", str(int(at.timestamp())), *extra],
                          capture_output=True, text=True)


# -- the document ---------------------------------------------------------------------------------

async def test_the_document_lists_each_device_its_certificate_revocations_audit_head_and_policy(
        authority, fleet, clock, ca_home):
    pump, monitor = fleet
    before = await audit_rows(authority)
    done = await evidence.export(authority, actor=ACTOR)
    doc = json.loads(done.body)

    assert doc["generated_at"] == clock.now.strftime("%Y-%m-%dT%H:%M:%SZ") and doc["trust_domain"] == "hospital.test"
    issuing = x509.load_pem_x509_certificate((ca_home / "issuing.pem").read_bytes())
    assert doc["issuing_ca"]["sha256"] == issuing.fingerprint(hashes.SHA256()).hex()
    devices = {d["device_id"]: d for d in doc["devices"]}
    assert [d["device_id"] for d in doc["devices"]] == ["idle-1", "monitor-1", "pump-1"]

    p = devices["pump-1"]
    assert p["owner"] == "ICU" and p["status"] == "active" and p["identity_valid"] is True
    assert p["current_certificate"]["serial"] == serial_hex(pump.serial)
    assert p["current_certificate"]["status"] == "good"
    assert p["current_certificate"]["not_after"] == pump.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert p["last_proven_contact"] is not None   # its enrollment
    # the unsigned report is shown as reported and marked so; the proven firmware stays empty
    assert p["reported_firmware"] == "9.9-claimed" and p["firmware"] == ""
    assert "reported_firmware" in doc["unverified_fields"]
    assert p["policy"] == {"lifetime": "2d", "renewal_grace": "30d", "non_attendance": None, "min_firmware": None}

    m = devices["monitor-1"]
    assert m["current_certificate"]["serial"] == serial_hex(monitor.serial)
    assert m["current_certificate"]["status"] == "revoked" and m["identity_valid"] is False
    assert m["policy"]["renewal_grace"] == "1d" and m["policy"]["non_attendance"] == "12h"   # by criticality
    assert devices["idle-1"]["current_certificate"] is None and devices["idle-1"]["identity_valid"] is False

    [revocation] = doc["revocations"]
    assert revocation["serial"] == serial_hex(monitor.serial) and revocation["reason"] == "keyCompromise"
    assert revocation["revoked_at"] == (clock.now - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")

    # the head is the log's as the document was made; the export's own entry comes after it
    assert doc["audit"] == {"entries": len(before), "head": before[-1].hash, "intact": True, "problems": []}
    assert doc["counts"]["devices"] == 3 and doc["counts"]["revocations"] == 1
    assert doc["counts"]["devices_with_valid_identity"] == 1
    assert doc["policy"]["models"]["infusion-pump"]["lifetime"] == "2d"
    assert doc["policy"]["profiles"]["evidence"]["extended_key_usage"] == [DOCUMENT_SIGNING.dotted_string]
    classes = {(c["model"], c["criticality"]): c for c in doc["policy"]["classes"]}
    assert classes[("bedside-monitor", "high")]["renewal_grace"] == "1d"
    assert classes[("bedside-monitor", "medium")] == {
        "model": "bedside-monitor", "criticality": "medium", "devices": 1, "lifetime": "3d", "renewal_grace": "7d",
        "non_attendance": None, "min_firmware": None}

    # deterministic: the same document encodes to the same bytes
    assert evidence.document_bytes(doc) == done.body and done.body.endswith(b"}\n")


async def test_every_export_is_audited_with_its_digest_and_keeps_its_signature(authority, fleet):
    done = await evidence.export(authority, actor=ACTOR)
    entry = (await audit_rows(authority))[-1]
    detail = json.loads(entry.detail)
    assert entry.action == "evidence_exported" and entry.actor == ACTOR
    assert detail["sha256"] == hashlib.sha256(done.body).hexdigest() == done.sha256
    assert detail["devices"] == 3 and detail["format"] == "json"
    assert base64.b64decode(detail["signature"]) == done.signature
    assert detail["signer"] == serial_hex(done.signer.serial_number)
    # found again by the digest of the bytes, in any process
    assert await evidence.signature_for(authority, done.sha256.upper()) == done.signature
    with pytest.raises(NotFoundError):
        await evidence.signature_for(authority, hashlib.sha256(done.body + b" ").hexdigest())
    with pytest.raises(BadRequestError):
        await evidence.signature_for(authority, "evidence.json")
    # the printable page is audited too, and unsigned: no signature to find for it
    page = await evidence.export(authority, actor=ACTOR, fmt="page", encode=lambda d: b"<html>%d</html>" % len(d))
    assert page.signature is None and json.loads((await audit_rows(authority))[-1].detail)["format"] == "page"
    with pytest.raises(NotFoundError):
        await evidence.signature_for(authority, page.sha256)
    with pytest.raises(BadRequestError):
        await evidence.export(authority, actor=ACTOR, fmt="xml")


async def test_a_damaged_audit_chain_is_reported_as_not_intact(authority, fleet, ca_home):
    conn = sqlite3.connect(ca_home / "iomtca.db")
    with conn:
        conn.execute("UPDATE audit_log SET actor = 'operator:mallory' WHERE id = 3")
    conn.close()
    doc = json.loads((await evidence.export(authority, actor=ACTOR)).body)
    assert doc["audit"]["intact"] is False
    assert doc["audit"]["problems"] == ["entry 3: content does not match its hash (modified)"]


async def test_the_csv_has_a_row_per_device_with_the_json_fields_flattened(authority, fleet):
    await authority.registry.add(new_device("odd-1", model="pump", owner="=HYPERLINK(\"http://x\")"), actor="test")
    done = await evidence.export(authority, actor=ACTOR, fmt="csv")
    assert b"\r\n" in done.body
    rows = list(csv.DictReader(io.StringIO(done.body.decode("utf-8"))))
    assert [r["device_id"] for r in rows] == ["idle-1", "monitor-1", "odd-1", "pump-1"]
    doc = json.loads((await evidence.export(authority, actor=ACTOR)).body)
    flat = evidence._flatten(doc["devices"][-1])   # pump-1, with a certificate
    assert sorted(rows[0]) == sorted(flat)          # the same fields
    pump = rows[-1]
    assert pump["current_certificate.serial"] == flat["current_certificate.serial"]
    assert pump["identity_valid"] == "true" and pump["policy.lifetime"] == "2d"
    assert rows[0]["current_certificate.serial"] == ""   # idle-1 has none
    assert rows[2]["owner"] == "'=HYPERLINK(\"http://x\")"   # a spreadsheet shows it, does not run it
    # the CSV is signed like the JSON
    assert evidence.verify(done.body, done.signature, authority.issuer.certificate) == done.signer


# -- the signature --------------------------------------------------------------------------------

async def test_openssl_accepts_the_signature_with_only_the_root_and_refuses_an_edited_copy(
        authority, fleet, clock, ca_home, tmp_path):
    done = await evidence.export(authority, actor=ACTOR)
    root = ca_home / "root.pem"
    ok = openssl_verify(tmp_path, done.body, done.signature, root, clock.now, "-purpose", "any")
    assert ok.returncode == 0 and "Verification successful" in ok.stderr, ok.stderr

    edited = done.body.replace(b'"owner": "ICU"', b'"owner": "ICV"')
    assert edited != done.body and len(edited) == len(done.body)
    bad = openssl_verify(tmp_path, edited, done.signature, root, clock.now, "-purpose", "any")
    assert bad.returncode != 0 and "Verification failure" in bad.stderr, bad.stderr
    with pytest.raises(UnauthorizedError):
        evidence.verify(edited, done.signature, authority.issuer.certificate)
    assert evidence.verify(done.body, done.signature, authority.issuer.certificate) == done.signer

    # without -purpose any, openssl asks for an S/MIME (emailProtection) certificate, which this is not
    smime = openssl_verify(tmp_path, done.body, done.signature, root, clock.now)
    assert smime.returncode != 0 and "unsuitable certificate purpose" in smime.stderr, smime.stderr


async def test_the_signature_carries_the_signer_and_issuing_ca_and_the_signer_is_for_documents_only(
        authority, fleet, ca_home):
    done = await evidence.export(authority, actor=ACTOR)
    carried = pkcs7.load_der_pkcs7_certificates(done.signature)
    assert set(carried) == {done.signer, authority.issuer.certificate}   # the root comes from the auditor

    cert = done.signer
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not any(getattr(usage.value, n) for n in ("key_cert_sign", "crl_sign", "key_encipherment",
                                                     "content_commitment", "data_encipherment", "key_agreement"))
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [DOCUMENT_SIGNING]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.issuer == authority.issuer.certificate.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)] == [
        "spiffe://hospital.test/ca/evidence"]
    # revocable: it points at the CRL and OCSP, and the CA has it on file
    cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert (await authority.certificate(cert.serial_number)).profile == "evidence"

    # the key: encrypted with the CA passphrase, 0600, beside the other keys
    path = ca_home / "private" / "evidence-signer.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in data and b"BEGIN PRIVATE KEY" not in data
    with pytest.raises(ConfigError):
        load_private_key_pem(data, b"not the passphrase", str(path))
    key = load_private_key_pem(data, authority.key_passphrase, str(path))
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


async def test_a_signature_from_another_certificate_of_the_ca_is_refused(authority, fleet):
    done = await evidence.export(authority, actor=ACTOR)
    # the same bytes signed by a device certificate's key: a valid CMS, but not a document signer
    token = await authority.registry.add(new_device("pump-9", model="infusion-pump", owner="ICU"), actor="test")
    csr, key = make_csr()
    device = await authority.enroll("pump-9", csr, TokenAuth(token.secret))
    forged = evidence.sign(done.body, evidence.service_certs.KeyedCert(device.certificate, key),
                           authority.issuer.certificate)
    with pytest.raises(UnauthorizedError, match="not for document signing"):
        evidence.verify(done.body, forged, authority.issuer.certificate)



@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01\x01", b"not der at all", "certs-only", "truncated"])
async def test_what_is_not_a_signature_is_a_bad_request(authority, fleet, garbage):
    done = await evidence.export(authority, actor=ACTOR)
    if garbage == "certs-only":
        garbage = pkcs7.serialize_certificates([done.signer], serialization.Encoding.DER)
    elif garbage == "truncated":
        garbage = done.signature[:-40]
    with pytest.raises(BadRequestError):
        evidence.verify(done.body, garbage, authority.issuer.certificate)

# -- renewal of the signer ------------------------------------------------------------------------

async def test_the_signer_is_made_on_first_use_reused_and_renewed_at_two_thirds_and_after_revocation(
        authority, fleet, clock, ca_home):
    path = ca_home / "private" / "evidence-signer.pem"
    assert not path.exists()
    first = (await evidence.export(authority, actor=ACTOR)).signer
    assert path.exists()
    clock.advance(days=1)
    assert (await evidence.export(authority, actor=ACTOR)).signer == first

    clock.now = renew_at(first) - timedelta(seconds=1)
    assert (await evidence.export(authority, actor=ACTOR)).signer == first
    clock.now = renew_at(first)
    second = (await evidence.export(authority, actor=ACTOR)).signer
    assert second.serial_number != first.serial_number
    assert second.not_valid_before_utc == clock.now - timedelta(minutes=5)
    assert x509.load_pem_x509_certificates(path.read_bytes())[0] == second

    await authority.revoke(second.serial_number, RevocationReason.keyCompromise, actor="operator:sec")
    third = (await evidence.export(authority, actor=ACTOR)).signer
    assert third.serial_number not in (first.serial_number, second.serial_number)

    issued = [r for r in await audit_rows(authority) if r.action == "certificate_issued"
              and json.loads(r.detail)["profile"] == "evidence"]
    assert [r.actor for r in issued] == [evidence.SIGNER_ACTOR] * 3
    assert [r.serial for r in issued] == [serial_hex(c.serial_number) for c in (first, second, third)]


async def test_a_shorter_configured_lifetime_renews_the_signer_at_the_next_export(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as authority:
        long = (await evidence.export(authority, actor=ACTOR)).signer
    with open(ca_home / "config.toml", "a") as config:
        config.write('\n[ca.profiles.evidence]\nlifetime = "10d"\n')
    async with await Authority.open(ca_home, clock=clock) as authority:
        short = (await evidence.export(authority, actor=ACTOR)).signer
    assert long.not_valid_after_utc - clock.now == timedelta(days=90)
    assert short.serial_number != long.serial_number
    assert short.not_valid_after_utc - clock.now == timedelta(days=10)


async def test_a_revoked_signer_fails_openssl_with_the_crl_and_the_next_export_has_a_new_one(
        authority, fleet, clock, ca_home, tmp_path):
    done = await evidence.export(authority, actor=ACTOR)
    await authority.revoke(done.signer.serial_number, RevocationReason.keyCompromise, actor="operator:sec")
    crl = x509.load_der_x509_crl(await authority.crl()).public_bytes(serialization.Encoding.PEM)
    trust = tmp_path / "root-and-crl.pem"
    trust.write_bytes((ca_home / "root.pem").read_bytes() + crl)
    revoked = openssl_verify(tmp_path, done.body, done.signature, trust, clock.now, "-purpose", "any", "-crl_check")
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stderr, revoked.stderr

    fresh = await evidence.export(authority, actor=ACTOR)
    assert fresh.signer.serial_number != done.signer.serial_number
    ok = openssl_verify(tmp_path, fresh.body, fresh.signature, trust, clock.now, "-purpose", "any", "-crl_check")
    assert ok.returncode == 0, ok.stderr


async def test_a_ca_of_ed25519_keys_signs_with_an_ec_evidence_signer(tmp_path, clock):
    home = tmp_path / "ed-ca"
    await init_ca(home, trust_domain="ed.test", key_type="ed25519", clock=clock)
    async with await Authority.open(home, clock=clock) as authority:
        assert isinstance(authority.issuer.certificate.public_key(), ed25519.Ed25519PublicKey)
        done = await evidence.export(authority, actor=ACTOR)
    assert isinstance(done.signer.public_key(), ec.EllipticCurvePublicKey)
    ok = openssl_verify(tmp_path, done.body, done.signature, home / "root.pem", clock.now, "-purpose", "any")
    assert ok.returncode == 0, ok.stderr
