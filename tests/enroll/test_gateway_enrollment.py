"""A gateway as a registration authority of its own: `iomtca gateway add` at the CA, `iomtca
gateway init` into a directory of its own over HTTPS with the one-time token, `gateway revoke`
refusing it on the next RA call, and `gateway run` refusing a CA directory. The real server as a
subprocess; curl and openssl as the independent judges."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.enroll.conftest import IOMTCA, run


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("gw-enroll")


def add(ca, name: str) -> dict:
    return json.loads(ca.iomtca("gateway", "add", name, "--json").stdout)


def init(srv, gwdir: Path, name: str, token: str, *, check: bool = True, extra=()):
    return run([IOMTCA, "gateway", "init", "--dir", gwdir, "--ca", srv.est, "--root", srv.ca.root,
                "--name", name, "--token", "-", *extra], input=(token + "\n").encode(), check=check)


def listed(ca) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(ca.iomtca("gateway", "list", "--json").stdout)}


def ra_get(srv, gwdir: Path, path: str = "/ra/v1/cacerts"):
    passphrase = (gwdir / "private" / "passphrase").read_text().strip()
    return srv.https(path, "--cert", gwdir / "ra.pem", "--key", gwdir / "private" / "ra.key", "--pass", passphrase)


def test_add_init_and_the_directory_it_writes(srv, tmp_path):
    ca = srv.ca
    added = add(ca, "ward-2-gw")
    assert listed(ca)["ward-2-gw"]["status"] == "registered"
    # the token is kept only as a digest
    db = sqlite3.connect(f"file:{ca.home / 'iomtca.db'}?mode=ro", uri=True)
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    assert added["token"] not in dump
    gwdir = tmp_path / "gw"
    out = init(srv, gwdir, "ward-2-gw", added["token"]).stdout
    assert added["token"] not in out
    row = listed(ca)["ward-2-gw"]
    assert row["status"] == "active" and row["serial"] and row["enrolled_at"]
    # the layout: the key encrypted, 0600, opening with the gateway's passphrase and not the CA's
    assert stat.S_IMODE((gwdir / "private").stat().st_mode) == 0o700
    for secret in ("ra.key", "passphrase"):
        assert stat.S_IMODE((gwdir / "private" / secret).stat().st_mode) == 0o600, secret
    key_pem = (gwdir / "private" / "ra.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_pem, (gwdir / "private" / "passphrase").read_bytes().strip())
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(key_pem, ca.passphrase.encode())
    certs = x509.load_pem_x509_certificates((gwdir / "ra.pem").read_bytes())
    assert format(certs[0].serial_number, "x") == row["serial"]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert certs[0].public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    assert (gwdir / "root.pem").read_bytes() == ca.root.read_bytes()
    uris = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [u.value for u in uris] == ["spiffe://iomt.local/ra/gateway/ward-2-gw"]
    # openssl: the RA certificate verifies to the root for client authentication
    run(["openssl", "verify", "-purpose", "sslclient", "-CAfile", ca.root, "-untrusted", ca.issuing, gwdir / "ra.pem"])
    # no file under GWDIR holds the CA passphrase or a CA key
    ca_publics = {serialization.load_pem_private_key((ca.home / "private" / k).read_bytes(), ca.passphrase.encode())
                  .public_key().public_bytes(*spki) for k in ("root.key", "issuing.key")}
    for path in gwdir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert ca.passphrase.encode() not in data, path
            assert b"PRIVATE KEY" not in data or path.name == "ra.key", path
    assert key.public_key().public_bytes(*spki) not in ca_publics
    # and the credential works on the RA API
    assert ra_get(srv, gwdir).status == 200


def test_tokens_are_single_use_and_strangers_learn_nothing(srv, tmp_path):
    ca = srv.ca
    added = add(ca, "ward-3-gw")
    wrong = init(srv, tmp_path / "wrong", "ward-3-gw", "x" * 32, check=False)
    unknown = init(srv, tmp_path / "unknown", "no-such-gw", added["token"], check=False)
    assert wrong.returncode == unknown.returncode == 1
    assert "not accepted" in wrong.stderr and wrong.stderr.count("not accepted") == unknown.stderr.count("not accepted")
    assert not (tmp_path / "wrong" / "gateway.toml").exists()
    assert listed(ca)["ward-3-gw"]["status"] == "registered"   # a wrong guess spends nothing
    init(srv, tmp_path / "gw", "ward-3-gw", added["token"])
    again = init(srv, tmp_path / "again", "ward-3-gw", added["token"], check=False)
    assert again.returncode == 1 and "already enrolled" in again.stderr
    # the token holder's refusal is audited; the two guesses are counted (ca/failures.py), not audited
    db = sqlite3.connect(f"file:{ca.home / 'iomtca.db'}?mode=ro", uri=True)
    try:
        refused = db.execute("SELECT COUNT(*) FROM audit_log WHERE action = 'gateway_enroll_refused'").fetchone()[0]
        guesses = db.execute("SELECT COALESCE(SUM(count), 0) FROM auth_failures WHERE scope = 'source'").fetchone()[0]
    finally:
        db.close()
    assert refused >= 1 and guesses >= 2
    # a name is registered once
    dup = ca.iomtca("gateway", "add", "ward-3-gw", check=False)
    assert dup.returncode == 1 and "already registered" in dup.stderr


def test_revoking_a_gateway_refuses_it_on_the_next_call(srv, tmp_path):
    ca = srv.ca
    gwdir = tmp_path / "gw"
    init(srv, gwdir, "ward-4-gw", add(ca, "ward-4-gw")["token"])
    assert ra_get(srv, gwdir).status == 200
    out = ca.iomtca("gateway", "revoke", "ward-4-gw", "--reason", "keyCompromise").stdout
    serial = listed(ca)["ward-4-gw"]["serial"]
    assert serial in out and listed(ca)["ward-4-gw"]["status"] == "revoked"
    reply = ra_get(srv, gwdir)
    assert reply.status == 403 and reply.json()["code"] == "policy_violation", reply
    assert reply.header("x-refused") == "ra-credential", reply.raw_headers   # the gateway itself, not a device
    cert = {r["serial"]: r for r in json.loads(ca.iomtca("cert", "list", "--json").stdout)}[serial]
    assert cert["status"] == "revoked" and cert["reason"] == "keyCompromise"
    again = ca.iomtca("gateway", "revoke", "ward-4-gw", check=False)
    assert again.returncode == 1 and "already revoked" in again.stderr


def test_an_ra_certificate_of_no_registered_gateway_is_refused(srv, tmp_path):
    """A `gateway`-profile certificate the CA issued outside the registry (as `iomtca init` did
    before gateways were registered) is good and on file, yet belongs to no gateway: refused."""
    from ca.authority import Authority
    from ca.issuance import service_names
    from common.keyfiles import write_atomic, write_private_key
    from common.keys import generate_key

    async def issue() -> tuple:
        key = generate_key("ec-p256")
        async with await Authority.open(srv.ca.home) as authority:
            subject, sans = service_names("iomtca-gateway", "iomt.local", "ra/gateway")
            return key, await authority.issue_service(key.public_key(), "gateway", subject, sans, actor="test")

    key, issued = asyncio.run(issue())
    gwdir = tmp_path / "legacy"
    write_private_key(gwdir / "private" / "ra.key", key, b"legacy-pass")
    write_atomic(gwdir / "private" / "passphrase", b"legacy-pass\n", mode=0o600)
    write_atomic(gwdir / "ra.pem", issued.certificate.public_bytes(serialization.Encoding.PEM))
    reply = ra_get(srv, gwdir)
    assert reply.status == 403 and "no registered gateway" in reply.json()["message"], reply


def test_gateway_run_refuses_a_ca_directory_and_an_unset_one(srv, tmp_path):
    ca_dir = run([IOMTCA, "gateway", "run", "--dir", srv.ca.home], check=False)
    assert ca_dir.returncode == 1
    lines = ca_dir.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a CA directory" in lines[0] and "gateway init" in lines[0], lines
    empty = run([IOMTCA, "gateway", "run", "--dir", tmp_path / "nothing"], check=False)
    assert empty.returncode == 1 and "gateway init" in empty.stderr
    into_ca = init(srv, srv.ca.home, "ward-5-gw", "unused-token", check=False)
    assert into_ca.returncode == 1 and "is a CA directory" in into_ca.stderr
    assert not (srv.ca.home / "gateway.toml").exists()


def test_a_gateway_section_in_the_ca_config_is_refused(tmp_path, ca_home):
    config = ca_home / "config.toml"
    config.write_text(config.read_text() + '\n[gateway]\nretry_every = "1s"\n')
    proc = run([IOMTCA, "status", "--dir", ca_home], check=False)
    assert proc.returncode == 1 and "gateway.toml" in proc.stderr, proc.stderr
