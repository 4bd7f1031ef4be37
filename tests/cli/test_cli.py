"""The admin CLI as an engineer runs it: the real `iomtca` console script in a subprocess."""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import make_csr

IOMTCA = str(Path(sys.executable).with_name("iomtca"))


def run(*args, env_extra=None, ok=True, home: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("IOMTCA_PASSPHRASE", "IOMTCA_HOME")}
    env.update(env_extra or {})
    argv = [IOMTCA, *args] + (["--dir", str(home)] if home else [])
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc, fragment):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iomtca: error:"), proc.stderr
    assert fragment in lines[0], lines[0]


def write_csr(path: Path) -> Path:
    path.write_bytes(make_csr()[0].public_bytes(serialization.Encoding.PEM))
    return path


def test_init_layout_modes_and_refusal(tmp_path):
    home = tmp_path / "ca"
    out = run("init", "--trust-domain", "stmary.example", "--server-name", "est.stmary.example", home=home)
    assert "passphrase" in out.stdout and str(home / "private" / "passphrase") in out.stdout
    for key in ("root.key", "issuing.key", "server.key", "ocsp-signer.pem", "passphrase"):
        path = home / "private" / key
        assert path.stat().st_mode & 0o777 == 0o600, key
        if key.endswith(".key"):
            assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    # no gateway credential in the CA directory: each gateway makes its own key on its own host
    assert not (home / "ra.pem").exists() and not (home / "private" / "ra.key").exists()
    assert not (home / "private" / "gateway-passphrase").exists()
    assert "iomtca gateway add" in out.stdout
    root = x509.load_pem_x509_certificate((home / "root.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((home / "chain.pem").read_bytes())
    assert [c.subject for c in chain] == [chain[0].subject, root.subject] and chain[0].issuer == root.subject
    assert chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    server = x509.load_pem_x509_certificates((home / "server.pem").read_bytes())[0]
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "est.stmary.example"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ocsp_cert = x509.load_pem_x509_certificate((home / "ocsp.pem").read_bytes())
    assert ocsp_cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
    one_line_error(run("init", home=home, ok=False), "already holds a CA")
    forced = run("init", "--force", home=home)
    assert "moved the previous CA directory" in forced.stdout
    assert x509.load_pem_x509_certificate((home / "root.pem").read_bytes()) != root


def test_passphrase_from_environment(tmp_path):
    home = tmp_path / "ca"
    env = {"IOMTCA_PASSPHRASE": "correct horse battery staple"}
    out = run("init", home=home, env_extra=env)
    assert "IOMTCA_PASSPHRASE" in out.stdout and not (home / "private" / "passphrase").exists()
    one_line_error(run("device", "add", "p1", "--model", "m", "--owner", "o", home=home, ok=False),
                   "no passphrase")
    one_line_error(run("device", "add", "p1", "--model", "m", "--owner", "o", home=home, ok=False,
                       env_extra={"IOMTCA_PASSPHRASE": "wrong"}), "wrong passphrase")
    run("device", "add", "p1", "--model", "m", "--owner", "o", home=home, env_extra=env)


def test_device_lifecycle(ca_home, tmp_path):
    added = json.loads(run("device", "add", "pump-1", "--model", "infusion-pump", "--owner", "ICU",
                           "--criticality", "high", "--udi", "(01)00844588003288(10)LOT7", "--json",
                           home=ca_home).stdout)
    assert added["device_id"] == "pump-1" and len(added["token"]) >= 22 and added["expires_at"].endswith("Z")
    shown = json.loads(run("device", "show", "pump-1", "--json", home=ca_home).stdout)
    assert shown["udi_di"] == "00844588003288" and shown["udi_pi"] == "(10)LOT7"
    assert shown["criticality"] == "high" and shown["certificates"] == []

    out = tmp_path / "pump-1.pem"
    run("cert", "issue", "pump-1", "--csr", str(write_csr(tmp_path / "r.csr")), "--out", str(out), home=ca_home)
    chain = x509.load_pem_x509_certificates(out.read_bytes())
    assert chain[0].subject.rfc4514_string() == "CN=pump-1" and chain[1].subject == chain[0].issuer
    serial = format(chain[0].serial_number, "x")

    certs = json.loads(run("cert", "list", "--json", home=ca_home).stdout)
    mine = [c for c in certs if c["device_id"] == "pump-1"]
    assert mine == [{**mine[0], "serial": serial, "status": "good"}]
    assert mine[0]["not_after"].endswith("Z")

    # the certificate expires in 72h: inside --expiring 7d, outside --expiring 1d
    assert [d["device_id"] for d in json.loads(
        run("device", "list", "--json", "--expiring", "7d", home=ca_home).stdout)] == ["pump-1"]
    assert json.loads(run("device", "list", "--json", "--expiring", "1d", home=ca_home).stdout) == []
    # never seen since it was registered a moment ago: not offline for 3 days
    assert json.loads(run("device", "list", "--json", "--offline", "3d", home=ca_home).stdout) == []
    assert [d["device_id"] for d in json.loads(
        run("device", "list", "--json", "--offline", "0s", home=ca_home).stdout)] == ["pump-1"]

    run("cert", "hold", serial, home=ca_home)
    assert _status(ca_home, serial) == "hold"
    run("cert", "release", serial, home=ca_home)
    assert _status(ca_home, serial) == "good"
    crl_path = tmp_path / "crl.der"
    run("crl", "--out", str(crl_path), home=ca_home)
    assert x509.load_der_x509_crl(crl_path.read_bytes()).get_revoked_certificate_by_serial_number(
        chain[0].serial_number) is None

    dec = run("device", "decommission", "pump-1", home=ca_home)
    assert serial in dec.stdout
    assert _status(ca_home, serial) == "revoked"
    run("crl", "--out", str(crl_path), home=ca_home)
    entry = x509.load_der_x509_crl(crl_path.read_bytes()).get_revoked_certificate_by_serial_number(
        chain[0].serial_number)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is \
        x509.ReasonFlags.cessation_of_operation
    one_line_error(run("device", "token", "pump-1", home=ca_home, ok=False), "decommissioned")
    one_line_error(run("cert", "issue", "pump-1", "--csr", str(tmp_path / "r.csr"), home=ca_home, ok=False),
                   "decommissioned")


def _status(home, serial):
    return {c["serial"]: c["status"] for c in json.loads(run("cert", "list", "--json", home=home).stdout)}[serial]


def test_revoke_with_reason_and_errors(ca_home, tmp_path):
    run("device", "add", "mon-1", "--model", "monitor", "--owner", "ED", home=ca_home)
    pem = run("cert", "issue", "mon-1", "--csr", str(write_csr(tmp_path / "r.csr")), home=ca_home).stdout
    serial = format(x509.load_pem_x509_certificates(pem.encode())[0].serial_number, "x")
    one_line_error(run("cert", "revoke", serial, "--reason", "bogus", home=ca_home, ok=False),
                   "unknown revocation reason")
    run("cert", "revoke", serial, "--reason", "keyCompromise", home=ca_home)
    certs = json.loads(run("cert", "list", "--json", home=ca_home).stdout)
    assert [c["reason"] for c in certs if c["serial"] == serial] == ["keyCompromise"]
    one_line_error(run("cert", "revoke", "ffff", home=ca_home, ok=False), "no certificate with serial ffff")
    one_line_error(run("cert", "revoke", "xyz", home=ca_home, ok=False), "invalid serial")
    (tmp_path / "garbage.csr").write_bytes(b"\x30\x82\x01\x00garbage")
    one_line_error(run("cert", "issue", "mon-1", "--csr", str(tmp_path / "garbage.csr"), home=ca_home, ok=False),
                   "not a valid PKCS#10")
    one_line_error(run("cert", "issue", "ghost", "--csr", str(tmp_path / "r.csr"), home=ca_home, ok=False),
                   "not registered")
    one_line_error(run("device", "add", "bad id!", "--model", "m", "--owner", "o", home=ca_home, ok=False),
                   "invalid device id")
    one_line_error(run("device", "list", home=tmp_path / "nowhere", ok=False), "not a CA directory")


ASSETS = [
    ["device_id", "model", "owner", "location", "criticality", "firmware", "udi"],
    ["pump-001", "Alaris 8100", "ICU", "ICU bed 4", "high", "12.1.2", ""],
    ["mon-002", "IntelliVue MX450", "ED", "ED bay 2", "medium", "M.00.03", "(01)00844588003288"],
    ["vent-003", "Hamilton C6", "ICU", "", "high", "2.0", ""],
]


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_import_all_or_nothing(ca_home, tmp_path):
    bad = [*ASSETS, ["infu-004", "x", "ICU", "", "extreme", "", ""]]
    proc = run("device", "import", str(_write_csv(tmp_path / "bad.csv", bad)), home=ca_home, ok=False)
    one_line_error(proc, "line 5:")
    assert "criticality" in proc.stderr
    assert json.loads(run("device", "list", "--json", home=ca_home).stdout) == []
    dup = [*ASSETS, ["mon-002", "x", "ICU", "", "low", "", ""]]
    one_line_error(run("device", "import", str(_write_csv(tmp_path / "dup.csv", dup)), home=ca_home, ok=False),
                   "line 5: device mon-002 already appears on line 3")

    tokens = tmp_path / "tokens.csv"
    run("device", "import", str(_write_csv(tmp_path / "ok.csv", ASSETS)), "--tokens-out", str(tokens),
        home=ca_home)
    assert tokens.stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(tokens.open()))
    assert [r["device_id"] for r in rows] == ["pump-001", "mon-002", "vent-003"]
    assert len({r["token"] for r in rows}) == 3
    listed = json.loads(run("device", "list", "--json", home=ca_home).stdout)
    assert {d["device_id"]: d["criticality"] for d in listed} == {
        "pump-001": "high", "mon-002": "medium", "vent-003": "high"}
    again = run("device", "import", str(tmp_path / "ok.csv"), home=ca_home, ok=False)
    one_line_error(again, "already registered")


def test_audit_verify_detects_tampering(ca_home):
    run("device", "add", "pump-9", "--model", "m", "--owner", "o", home=ca_home)
    ok = run("audit", "verify", home=ca_home)
    assert "audit log intact" in ok.stdout
    conn = sqlite3.connect(ca_home / "iomtca.db")
    target = conn.execute("SELECT id FROM audit_log WHERE action = 'device_registered'").fetchone()[0]
    conn.execute("UPDATE audit_log SET actor = 'operator:nobody' WHERE id = ?", (target,))
    conn.commit()
    conn.close()
    bad = run("audit", "verify", home=ca_home, ok=False)
    assert bad.returncode == 1
    assert f"entry {target}: content does not match its hash" in bad.stderr


def test_audit_verify_detects_deleted_entry(ca_home):
    run("device", "add", "pump-9", "--model", "m", "--owner", "o", home=ca_home)
    conn = sqlite3.connect(ca_home / "iomtca.db")
    conn.execute("DELETE FROM audit_log WHERE id = 2")
    conn.commit()
    conn.close()
    bad = run("audit", "verify", home=ca_home, ok=False)
    assert "entry 3: does not follow" in bad.stderr


def test_device_edit_show_and_list_keep_reported_apart_from_proven(tmp_path):
    home = tmp_path / "ca"
    run("init", home=home)
    run("device", "add", "pump-7", "--model", "infusion-pump", "--owner", "ICU", "--firmware", "1.0.0", home=home)
    out = run("device", "edit", "pump-7", "--firmware", "2.0.0", "--location", "ICU bed 6", "--criticality",
              "high", home=home)
    assert out.stdout.strip() == "updated device pump-7: criticality, firmware, location"
    shown = json.loads(run("device", "show", "pump-7", "--json", home=home).stdout)
    assert (shown["firmware"], shown["location"], shown["criticality"]) == ("2.0.0", "ICU bed 6", "high")
    assert shown["reported_firmware"] is None and shown["reported_online"] is None
    # an unsigned report, as the gateway stores it, shows up labelled and changes nothing proven
    conn = sqlite3.connect(home / "iomtca.db")
    with conn:
        conn.execute("UPDATE devices SET reported_firmware = '9.9.9', reported_online = 1, "
                     "reported_online_at = '2026-12-01T10:00:00Z' WHERE id = 'pump-7'")
    conn.close()
    human = run("device", "show", "pump-7", home=home).stdout
    assert "reported firmware (unverified)   9.9.9" in human
    assert any(line.split()[:2] == ["firmware", "2.0.0"] for line in human.splitlines())
    listed = run("device", "list", home=home).stdout
    assert "online 2026-12-01T10:00:00Z, fw 9.9.9 (unverified)" in listed
    one_line_error(run("device", "edit", "pump-7", home=home, ok=False), "nothing to change")
    one_line_error(run("device", "edit", "pump-7", "--owner", " ", home=home, ok=False), "owner cannot be empty")
    one_line_error(run("device", "edit", "ghost", "--firmware", "1", home=home, ok=False), "not registered")
    conn = sqlite3.connect(home / "iomtca.db")
    rows = conn.execute("SELECT actor, detail FROM audit_log WHERE action = 'device_edited'").fetchall()
    conn.close()
    assert len(rows) == 1 and rows[0][0].startswith("operator:")
    assert json.loads(rows[0][1])["firmware"] == {"from": "1.0.0", "to": "2.0.0"}
