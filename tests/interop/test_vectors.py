"""CSR vectors made by openssl (tests/vectors, see its README) through load_csr and enroll.

A refused request must raise its typed error and leave exactly one trace: an
`enroll_refused` audit row (no certificate, no other row). A request that
`load_csr` already rejects reaches nothing, so it leaves no trace at all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca.authority import OperatorAuth
from ca.codec import load_csr
from ca.errors import BadRequestError, KeyPolicyError, PolicyViolationError, ProofOfPossessionError

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
DEVICE = "vec-device"
DER = serialization.Encoding.DER


@dataclass(frozen=True)
class Vector:
    file: str
    error: type[Exception] | None      # None: issued
    at_load: bool = False               # the error comes from load_csr, before enroll
    key: type | None = None             # public key class of an issued certificate


GOOD = [
    Vector("p256.csr.der", None, key=ec.EllipticCurvePublicKey),
    Vector("p256.csr.pem", None, key=ec.EllipticCurvePublicKey),
    Vector("rsa2048.csr.der", None, key=rsa.RSAPublicKey),
    Vector("ed25519.csr.der", None, key=ed25519.Ed25519PublicKey),
    Vector("own-san.csr.der", None, key=ec.EllipticCurvePublicKey),
]
BAD = [
    Vector("rsa1024.csr.der", KeyPolicyError),
    Vector("secp256k1.csr.der", KeyPolicyError),
    Vector("other-device-san.csr.der", PolicyViolationError),
    Vector("bad-signature.csr.der", ProofOfPossessionError),
    Vector("truncated.csr.der", BadRequestError, at_load=True),
]
ALL = GOOD + BAD


def ids(vectors):
    return [v.file for v in vectors]


@pytest.fixture(scope="module")
def vec_ca(ca):
    """The shared CA (trust domain iomt.local, as the vectors' SANs assume) with `vec-device`."""
    assert ca.trust_domain == "iomt.local"
    ca.add_device(DEVICE, model="vector-pump")
    return ca


async def snapshot(authority):
    async with authority.store.read() as tx:
        rows = await tx.audit_rows()
    return len(await authority.certificates()), rows


def test_vector_files_are_all_here():
    on_disk = {p.name for p in VECTORS.iterdir() if ".csr." in p.name}
    assert on_disk == set(ids(ALL))
    assert (VECTORS / "make_vectors.sh").exists() and (VECTORS / "README.md").exists()
    readme = (VECTORS / "README.md").read_text()
    for name in on_disk:
        assert f"`{name}`" in readme, f"{name} is not described in tests/vectors/README.md"


def test_vectors_are_what_the_readme_says(sh, openssl):
    """openssl, not our code, confirms each vector's key and signature state."""
    def text(name):
        return sh(["openssl", "req", "-inform", "PEM" if name.endswith(".pem") else "DER",
                   "-in", VECTORS / name, "-noout", "-text", "-verify"], check=False)

    for v in ALL:
        out = text(v.file)
        combined = out.stdout + out.stderr
        if v.file == "truncated.csr.der":
            assert out.returncode != 0 and "Unable to load X509 request" in combined
        elif v.file == "bad-signature.csr.der":
            assert "self-signature verify failure" in combined
        else:
            assert "self-signature verify OK" in combined, v.file
    assert "Public-Key: (1024 bit)" in text("rsa1024.csr.der").stdout
    assert "ASN1 OID: secp256k1" in text("secp256k1.csr.der").stdout
    assert "ED25519" in text("ed25519.csr.der").stdout.upper()
    assert "URI:spiffe://iomt.local/device/other-device" in text("other-device-san.csr.der").stdout
    # bad-signature differs from p256 in exactly its last byte, by one bit.
    good, bad = (VECTORS / "p256.csr.der").read_bytes(), (VECTORS / "bad-signature.csr.der").read_bytes()
    assert len(good) == len(bad) and good[:-1] == bad[:-1] and good[-1] ^ bad[-1] == 1
    assert good[:100] == (VECTORS / "truncated.csr.der").read_bytes()


@pytest.mark.parametrize("vector", [v for v in ALL if not v.at_load], ids=ids([v for v in ALL if not v.at_load]))
def test_write_it_back(vector):
    """load_csr keeps the request as it came: re-encoding gives back the exact DER."""
    data = (VECTORS / vector.file).read_bytes()
    der = (VECTORS / "p256.csr.der").read_bytes() if vector.file.endswith(".pem") else data
    assert load_csr(data).public_bytes(DER) == der


def test_truncated_is_refused_by_load_csr():
    with pytest.raises(BadRequestError) as info:
        load_csr((VECTORS / "truncated.csr.der").read_bytes())
    assert type(info.value) is BadRequestError
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("vector", GOOD, ids=ids(GOOD))
async def test_good_vector_is_issued(vec_ca, vector):
    csr = load_csr((VECTORS / vector.file).read_bytes())
    async with await vec_ca.open() as authority:
        certs_before, rows_before = await snapshot(authority)
        issued = await authority.enroll(DEVICE, csr, OperatorAuth("t"))
        certs_after, rows_after = await snapshot(authority)
    cert = issued.certificate
    assert certs_after == certs_before + 1
    new_rows = rows_after[len(rows_before):]
    assert [(r.action, r.actor, r.device_id) for r in new_rows] == [("certificate_issued", "operator:t", DEVICE)]
    # The certified key is the CSR's; the names are the registry's, whatever the CSR asked for.
    assert cert.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        csr.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert isinstance(cert.public_key(), vector.key)
    assert [(a.oid, a.value) for a in cert.subject] == [(NameOID.COMMON_NAME, DEVICE)]
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == \
        [x509.UniformResourceIdentifier(f"spiffe://iomt.local/device/{DEVICE}")]
    # ...and the CA signed it with the issuing key.
    cert.verify_directly_issued_by(vec_ca.issuing_cert)


@pytest.mark.parametrize("vector", [v for v in BAD if not v.at_load], ids=ids([v for v in BAD if not v.at_load]))
async def test_bad_vector_is_refused_with_its_typed_error(vec_ca, vector):
    csr = load_csr((VECTORS / vector.file).read_bytes())
    async with await vec_ca.open() as authority:
        certs_before, rows_before = await snapshot(authority)
        with pytest.raises(vector.error) as info:
            await authority.enroll(DEVICE, csr, OperatorAuth("t"))
        certs_after, rows_after = await snapshot(authority)
    assert type(info.value) is vector.error
    assert certs_after == certs_before
    new_rows = rows_after[len(rows_before):]
    assert [(r.action, r.actor, r.device_id, r.serial) for r in new_rows] == \
        [("enroll_refused", "operator:t", DEVICE, None)]
    assert json.loads(new_rows[0].detail)["code"] == info.value.code


async def test_load_error_leaves_no_trace(vec_ca):
    async with await vec_ca.open() as authority:
        before = await snapshot(authority)
        with pytest.raises(BadRequestError):
            csr = load_csr((VECTORS / "truncated.csr.der").read_bytes())
            await authority.enroll(DEVICE, csr, OperatorAuth("t"))   # not reached
        after = await snapshot(authority)
    assert after[0] == before[0] and len(after[1]) == len(before[1])


@pytest.mark.parametrize("name, message", [
    ("truncated.csr.der", "CSR is not a valid PKCS#10 request"),
    ("rsa1024.csr.der", "too weak"),
    ("bad-signature.csr.der", "proof of possession"),
])
def test_cli_refuses_bad_vectors(vec_ca, name, message):
    """The installed executable turns each typed error into exit 1 and a one-line message."""
    out = vec_ca.iomtca("cert", "issue", DEVICE, "--csr", VECTORS / name, check=False, subprocess_=True)
    assert out.returncode == 1
    assert out.stderr.startswith("iomtca: error: ") and message in out.stderr
    assert out.stdout == ""


def test_audit_chain_intact_after_refusals(vec_ca):
    """The refusals above appended to the hash-chained audit log without breaking it."""
    out = vec_ca.iomtca("audit", "verify", subprocess_=True)
    assert out.stdout.startswith("audit log intact: ")
    assert int(out.stdout.split()[3]) > 0
