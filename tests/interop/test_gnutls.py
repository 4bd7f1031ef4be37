"""GnuTLS (certtool, ocsptool from Debian gnutls-bin) as a second, independent judge.

openssl and GnuTLS share no X.509 code, so a certificate, CRL or OCSP response
both accept is unlikely to lean on one library's leniency.

ocsptool observations that shape these tests (GnuTLS 3.7):
* `ocsptool -e --load-trust ROOT` fails for our delegated responder ("Signer
  cert is not trusted"): GnuTLS only accepts a signer that is a trust anchor or
  is signed directly by one, and the response carries the responder certificate
  alone. RFC 6960 4.2.2.2 delegation is judged with `--load-trust issuing.pem`
  (the CA that issued the certificate in question) or `--load-signer ocsp.pem`.
* `ocsptool -q --nonce` writes a request without a nonce, so requests made by
  ocsptool are nonce-less; nonce echo is judged on openssl-made requests.
"""
from __future__ import annotations

import re
import shutil

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from ca.signer import KEY_TYPES

CERTTOOL = shutil.which("certtool")
OCSPTOOL = shutil.which("ocsptool")
pytestmark = pytest.mark.skipif(
    CERTTOOL is None or OCSPTOOL is None,
    reason="GnuTLS certtool/ocsptool are not installed (Debian package gnutls-bin)")

TRUSTED = "Chain verification output: Verified. The certificate is trusted."
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"


def both(proc) -> str:
    return proc.stdout + proc.stderr


def certtool_verify(sh, ca, bundle, *extra, check=True):
    return sh([CERTTOOL, "--verify", "--load-ca-certificate", ca.root, *extra, "--infile", bundle], check=check)


def ocsp_info(sh, resp) -> dict[str, str]:
    """`ocsptool -j` fields of a single-response OCSP response."""
    text = sh([OCSPTOOL, "-j", "--load-response", resp]).stdout
    fields = {}
    for key in ("Response Status", "Certificate Status", "Serial Number", "Hash Algorithm", "Nonce",
                "Revocation time", "Responder Key ID"):
        match = re.search(rf"^\s*{key}: (.+)$", text, re.M)
        if match:
            fields[key] = match.group(1).strip()
    return fields


def ocsptool_verify(sh, resp, *trust, check=True):
    return sh([OCSPTOOL, "-e", *trust, "--load-response", resp], check=check)


# -- certificates ----------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_device_chain_verifies_for_every_key_type(ca_for_key_type, sh, key_type):
    kca = ca_for_key_type(key_type)
    dev = kca.new_device_cert()
    # The CLI's --out bundle is exactly "device + issuing CA": GnuTLS builds the path to the root.
    out = certtool_verify(sh, kca, dev.bundle, "--verify-purpose", CLIENT_AUTH)
    assert TRUSTED in out.stdout
    assert f"Subject: CN={dev.device_id}" in out.stdout


def test_certtool_is_a_real_judge(ca, sh, foreign_ca):
    """Negative controls: wrong purpose, wrong trust anchor, missing intermediate."""
    dev = ca.new_device_cert()
    wrong_purpose = certtool_verify(sh, ca, dev.bundle, "--verify-purpose", SERVER_AUTH, check=False)
    assert wrong_purpose.returncode != 0 and "does not match the intended purpose" in wrong_purpose.stdout
    foreign_root, _ = foreign_ca
    wrong_anchor = sh([CERTTOOL, "--verify", "--load-ca-certificate", foreign_root, "--infile", dev.bundle],
                      check=False)
    assert wrong_anchor.returncode != 0 and TRUSTED not in wrong_anchor.stdout
    leaf_only = certtool_verify(sh, ca, dev.leaf, check=False)
    assert leaf_only.returncode != 0 and TRUSTED not in leaf_only.stdout


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1"])
def test_server_cert_verifies_for_its_names(ca, sh, name):
    out = certtool_verify(sh, ca, ca.server, "--verify-hostname", name, "--verify-purpose", SERVER_AUTH)
    assert TRUSTED in out.stdout


def test_server_cert_refuses_other_names(ca, sh):
    out = certtool_verify(sh, ca, ca.server, "--verify-hostname", "enroll.evil.example", check=False)
    assert out.returncode != 0 and "does not match the expected" in out.stdout


def test_ra_cert_verifies_for_client_auth(ca, sh):
    out = certtool_verify(sh, ca, ca.ra, "--verify-purpose", CLIENT_AUTH)
    assert TRUSTED in out.stdout


# -- CRLs --------------------------------------------------------------------------


def test_crl_signature_and_revocation(ca, sh):
    good, bad = ca.new_device_cert(), ca.new_device_cert()
    ca.revoke(bad, "keyCompromise")
    crl = ca.crl()
    verified = sh([CERTTOOL, "--verify-crl", "--load-ca-certificate", ca.issuing, "--infile", crl.pem])
    assert "Verification output: Verified." in verified.stdout
    # The CRL is signed by the issuing CA, not the root: GnuTLS must refuse the root as its signer.
    wrong = sh([CERTTOOL, "--verify-crl", "--load-ca-certificate", ca.root, "--infile", crl.pem], check=False)
    assert "Verification output: Verified." not in wrong.stdout

    assert TRUSTED in certtool_verify(sh, ca, good.bundle, "--load-crl", crl.pem).stdout
    refused = certtool_verify(sh, ca, bad.bundle, "--load-crl", crl.pem, check=False)
    assert refused.returncode != 0 and "The certificate chain is revoked." in refused.stdout


def test_crl_info_lists_serial_and_number(ca, sh):
    dev = ca.new_device_cert()
    ca.revoke(dev, "superseded")
    crl = ca.crl()
    info = sh([CERTTOOL, "--crl-info", "--inder", "--infile", crl.der]).stdout
    assert "Version: 2" in info
    listed = {int(h, 16) for h in re.findall(r"Serial Number \(hex\): ([0-9a-f]+)", info)}
    assert dev.serial in listed
    number = re.search(r"CRL Number \(not critical\): ([0-9a-f]+)", info)
    assert number and int(number.group(1), 16) == crl.crl.extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number


# -- OCSP --------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_ocsp_response_verifies_for_every_key_type(ca_for_key_type, sh, key_type):
    kca = ca_for_key_type(key_type)
    dev = kca.new_device_cert()
    _, resp = await kca.ocsp_roundtrip(dev)
    for trust in (["--load-signer", kca.ocsp_cert], ["--load-trust", kca.issuing]):
        assert "Verifying OCSP Response: Success." in ocsptool_verify(sh, resp, *trust).stdout
    info = ocsp_info(sh, resp)
    assert info["Certificate Status"] == "good"
    assert int(info["Serial Number"], 16) == dev.serial


async def test_ocsptool_is_a_real_judge(ca, sh, foreign_ca):
    dev = ca.new_device_cert()
    _, resp = await ca.ocsp_roundtrip(dev)
    # The root did not sign the response, and the foreign CA did not issue the responder.
    for trust in (["--load-signer", ca.root], ["--load-trust", foreign_ca[0]]):
        out = ocsptool_verify(sh, resp, *trust, check=False)
        assert out.returncode != 0 and "Verifying OCSP Response: Failure" in out.stdout


@pytest.mark.parametrize("state", ["good", "revoked", "hold", "unknown"])
async def test_ocsp_states(ca, sh, state):
    if state == "unknown":
        target = 0x0DDBA11_0000_0000_0000_0001
    else:
        target = ca.new_device_cert()
        if state == "revoked":
            ca.revoke(target, "keyCompromise")
        if state == "hold":
            ca.hold(target)
    req, resp = await ca.ocsp_roundtrip(target, nonce=True)
    assert "Verifying OCSP Response: Success." in ocsptool_verify(sh, resp, "--load-signer", ca.ocsp_cert).stdout
    info = ocsp_info(sh, resp)
    assert info["Response Status"] == "Successful"
    assert info["Certificate Status"] == {"hold": "revoked"}.get(state, state)
    serial = target if isinstance(target, int) else target.serial
    assert int(info["Serial Number"], 16) == serial
    if state in ("revoked", "hold"):
        assert "Revocation time" in info
    # The nonce of the openssl-made request is echoed, as GnuTLS reads both.
    request_nonce = x509.ocsp.load_der_ocsp_request(req.read_bytes()).extensions.get_extension_for_class(
        x509.OCSPNonce).value.nonce
    assert bytes.fromhex(info["Nonce"]) == request_nonce


async def test_ocsptool_made_request(ca, sh):
    """A request made by GnuTLS (not openssl) is understood and answered for the right serial."""
    dev = ca.new_device_cert()
    req = ca.work / f"{ca.unique('gnutls-req')}.der"
    sh([OCSPTOOL, "-q", "--load-issuer", ca.issuing, "--load-cert", dev.leaf, "--outfile", req])
    resp = req.with_suffix(".resp")
    resp.write_bytes(await ca.ocsp(req.read_bytes()))
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert parsed.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert ocsp_info(sh, resp)["Certificate Status"] == "good"
    assert "Verifying OCSP Response: Success." in ocsptool_verify(sh, resp, "--load-trust", ca.issuing).stdout
    ca.revoke(dev, "cessationOfOperation")
    resp.write_bytes(await ca.ocsp(req.read_bytes()))
    assert ocsp_info(sh, resp)["Certificate Status"] == "revoked"
