"""The EST listener as a TLS scanner sees it: testssl.sh (Debian's `testssl`), an independent judge.

TLS 1.2 and 1.3 only; no NULL, anonymous, export, low, 3DES/IDEA or other obsolete ciphers; TLS
1.2 suites with forward secrecy and AEAD only; no TLS compression (CRIME); secure renegotiation
and no client-initiated renegotiation; a chain that validates to our root. docs/SECURITY.md
summarises the result.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("testssl") is None, reason="testssl.sh not installed (make deps)")


@pytest.fixture(scope="module")
def findings(start_server, tmp_path_factory) -> dict[str, str]:
    srv = start_server("tlsscan")
    out = tmp_path_factory.mktemp("testssl") / "scan.json"
    host = srv.est.removeprefix("https://").split("/")[0]
    proc = subprocess.run(["testssl", "--quiet", "--color", "0", "--warnings", "off", "--sneaky", "--fast",
                           "--add-ca", str(srv.ca.root), "--jsonfile", str(out),
                           "--protocols", "--std", "--fs", "--renegotiation", "--crime", "--server-defaults", host],
                          capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {item["id"]: item["finding"] for item in json.loads(out.read_text())}


@pytest.mark.parametrize("protocol", ["SSLv2", "SSLv3", "TLS1", "TLS1_1"])
def test_old_protocols_are_not_offered(findings, protocol):
    assert findings[protocol].startswith("not offered"), findings[protocol]


def test_tls_1_2_and_1_3_are_offered(findings):
    assert findings["TLS1_2"].startswith("offered"), findings["TLS1_2"]
    assert findings["TLS1_3"].startswith("offered"), findings["TLS1_3"]


@pytest.mark.parametrize("category", ["cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                                      "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"])
def test_no_weak_cipher_category_is_offered(findings, category):
    assert findings[category].startswith("not offered"), findings[category]


def test_strong_ciphers_with_forward_secrecy(findings):
    assert findings["cipherlist_STRONG"].startswith("offered"), findings["cipherlist_STRONG"]
    fs = findings.get("FS", findings.get("PFS", ""))   # testssl 3.1 says FS, 3.0 PFS
    assert fs.startswith("offered"), fs
    suites = (findings.get("FS_ciphers") or findings.get("PFS_ciphers", "")).split()
    assert suites and all("GCM" in c or "CHACHA20" in c for c in suites), suites   # AEAD only


def test_no_compression_and_secure_renegotiation_only(findings):
    assert findings["CRIME_TLS"].startswith("not vulnerable"), findings["CRIME_TLS"]
    assert findings["secure_renego"].startswith("supported"), findings["secure_renego"]
    assert findings["secure_client_renego"].startswith("not vulnerable"), findings["secure_client_renego"]


def test_the_chain_validates_to_our_root(findings):
    trust = [v for k, v in findings.items() if k.startswith("cert_chain_of_trust")]
    assert trust and all(v.startswith("passed") for v in trust), trust
