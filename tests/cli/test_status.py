"""`iomtca status` as an engineer runs it: the real command on CA directories made by `iomtca init`
(and by `init_ca` with a clock set back, for certificates that are about to expire)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509

from ca.bootstrap import init_ca

IOMTCA = str(Path(sys.executable).with_name("iomtca"))
NAMES = ["server", "OCSP responder", "issuing CA", "root CA"]


def status(home: Path, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("IOMTCA_PASSPHRASE", "IOMTCA_HOME")}
    proc = subprocess.run([IOMTCA, "status", "--dir", str(home), *extra], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_status_of_a_fresh_ca(tmp_path):
    home = tmp_path / "ca"
    subprocess.run([IOMTCA, "init", "--dir", str(home)], check=True, capture_output=True, timeout=60)
    data = json.loads(status(home, "--json").stdout)
    assert [c["name"] for c in data["certificates"]] == NAMES and data["warnings"] == []
    by_name = {c["name"]: c for c in data["certificates"]}
    server = x509.load_pem_x509_certificates((home / "server.pem").read_bytes())[0]
    assert by_name["server"]["serial"] == format(server.serial_number, "x")
    assert by_name["server"]["not_after"] == server.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    # renewal at 2/3 of the 90 days from issuance: day 60
    renew_at = datetime.fromisoformat(by_name["server"]["renew_at"].replace("Z", "+00:00"))
    issued = server.not_valid_before_utc + timedelta(minutes=5)
    assert abs((renew_at - issued) - timedelta(days=60)) <= timedelta(seconds=1)
    assert by_name["OCSP responder"]["renew_at"] and by_name["OCSP responder"]["renewal_due"] is None
    assert by_name["issuing CA"]["renew_at"] is None and by_name["root CA"]["not_after"]
    human = status(home).stdout
    for name in NAMES:
        line = next(ln for ln in human.splitlines() if ln.startswith(name + " "))
        assert by_name[name]["not_after"] in line, line
    assert "WARNING" not in human
    # a shortened lifetime: the server certificate is due at the next start, and says so
    config = home / "config.toml"
    config.write_text(config.read_text().replace("\n[storage]", '\n[ca.profiles.server]\nlifetime = "30d"\n\n[storage]'))
    server_row = json.loads(status(home, "--json").stdout)["certificates"][0]
    assert "longer than the configured lifetime 30d" in server_row["renewal_due"]
    assert "due now" in next(ln for ln in status(home).stdout.splitlines() if ln.startswith("server "))


def test_status_warns_of_what_expires_within_30_days(tmp_path):
    home = tmp_path / "old"
    eighty_days_ago = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=80)
    asyncio.run(init_ca(home, clock=lambda: eighty_days_ago))
    asyncio.run(_gateway_enrolled_at(home, eighty_days_ago))
    data = json.loads(status(home, "--json").stdout)
    warnings = data["warnings"]
    # server and the gateway's RA certificate (from the database): 10 days left and past their
    # renewal point; the 7-day responder expired
    assert any(w.startswith("server certificate expires") and "overdue" in w for w in warnings), warnings
    assert any(w.startswith("gateway ward-old RA certificate expires") and "overdue" in w for w in warnings), warnings
    assert any(w.startswith("OCSP responder certificate expired") for w in warnings), warnings
    assert len(warnings) == 3, warnings
    human = status(home).stdout
    assert sum(ln.startswith("WARNING: ") for ln in human.splitlines()) == 3, human
    assert "expired" in next(ln for ln in human.splitlines() if ln.startswith("OCSP responder "))


async def _gateway_enrolled_at(home: Path, when: datetime) -> None:
    """A gateway registered and enrolled (through the CA core) with the clock at `when`."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from ca import gateways
    from ca.authority import Authority
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ward-old")])).sign(key, hashes.SHA256()))
    async with await Authority.open(home, clock=lambda: when) as authority:
        token = await gateways.register(authority, "ward-old", actor="operator:test")
        await gateways.enroll(authority, "ward-old", token.secret, csr)
