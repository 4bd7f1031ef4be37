"""ca.cms against real `openssl cms -sign` output: what verifies, and that garbage only ever raises typed errors."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import assume, HealthCheck, event, given, settings
from hypothesis import strategies as st

from ca.cms import MAX_CMS_BYTES, SignedRequest, verify_signed_request
from ca.errors import BadRequestError, UnauthorizedError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

KEYS = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ec-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "rsa-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, check=check)


class Device:
    """A device certificate and key, on disk for openssl and in memory for assertions."""

    def __init__(self, directory: Path, name: str, cert: x509.Certificate, key) -> None:
        self.name, self.cert, self.key = name, cert, key
        self.cert_pem = directory / f"{name}.crt.pem"
        self.key_pem = directory / f"{name}.key.pem"
        self.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))


class Pki:
    """A throwaway CA issuing device certificates, and openssl driven as a device would drive it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Device CA")])
        now = datetime.now(timezone.utc)
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(self.ca_name).issuer_name(self.ca_name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self._devices: dict[str, Device] = {}
        self._counter = 0

    def issue(self, public_key, subject: str, serial: int | None = None) -> x509.Certificate:
        now = datetime.now(timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.ca_name).public_key(public_key)
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.ca_key, hashes.SHA256()))

    def device(self, kind: str, name: str | None = None) -> Device:
        name = name or f"dev-{kind}"
        if name not in self._devices:
            key = KEYS[kind]()
            self._devices[name] = Device(self.dir, name, self.issue(key.public_key(), name), key)
        return self._devices[name]

    def new_csr(self, subject: str = "dev-renewed") -> bytes:
        """A fresh DER CSR with a fresh key, as the device makes before renewing."""
        self._counter += 1
        out = self.dir / f"new-{self._counter}.csr.der"
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", self.dir / f"new-{self._counter}.key.pem", "-subj", f"/CN={subject}",
                "-outform", "DER", "-out", out)
        return out.read_bytes()

    def sign(self, device: Device, csr: bytes, *extra: str, nodetach: bool = True) -> bytes:
        """The MQTT contract's command: openssl cms -sign -binary -nodetach ... -outform DER."""
        self._counter += 1
        csr_file, out = self.dir / f"in-{self._counter}.der", self.dir / f"out-{self._counter}.cms"
        csr_file.write_bytes(csr)
        openssl("cms", "-sign", "-binary", *(["-nodetach"] if nodetach else []), "-in", csr_file,
                "-signer", device.cert_pem, "-inkey", device.key_pem, *extra, "-outform", "DER", "-out", out)
        return out.read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("cms"))


@pytest.fixture(scope="module")
def csr(pki) -> bytes:
    return pki.new_csr()


@pytest.fixture(scope="module")
def ec_request(pki, csr) -> bytes:
    """A valid request from an EC P-256 device, signed attributes and all."""
    return pki.sign(pki.device("ec-p256"), csr)


def assert_fresh(result: SignedRequest, csr: bytes, device: Device, *, signing_time: bool = True) -> None:
    assert result.csr_der == csr
    assert result.signer == device.cert
    if signing_time:
        assert result.signing_time is not None and result.signing_time.tzinfo is not None
        assert result.signing_time.utcoffset() == timedelta(0)
        assert abs(datetime.now(timezone.utc) - result.signing_time) < timedelta(minutes=1)
    else:
        assert result.signing_time is None


def reencode(data: bytes, edit) -> bytes:
    """Load the CMS, let `edit(signed_data, signer_info)` change fields, and encode it again."""
    info = asn1_cms.ContentInfo.load(data)
    signed = info["content"]
    signer_info = signed["signer_infos"][0]
    edit(signed, signer_info)
    signed["signer_infos"] = asn1_cms.SignerInfos([signer_info])
    return asn1_cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def signature_of(data: bytes) -> bytes:
    return asn1_cms.ContentInfo.load(data)["content"]["signer_infos"][0]["signature"].native


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


def build_ed25519_cms(device: Device, content: bytes, *, signed_attrs: bool = True) -> bytes:
    """RFC 8419 SignedData from an Ed25519 key, which openssl 3.0's `cms -sign` cannot make."""
    cert = asn1_x509.Certificate.load(device.cert.public_bytes(serialization.Encoding.DER))
    signer_info = {
        "version": "v1",
        "sid": asn1_cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": cert.issuer, "serial_number": cert.serial_number}}),
        "digest_algorithm": {"algorithm": "sha512"},
        "signature_algorithm": {"algorithm": "ed25519"},
    }
    if signed_attrs:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        attrs = [
            asn1_cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
            asn1_cms.CMSAttribute({"type": "signing_time",
                                   "values": [asn1_cms.Time({"utc_time": asn1_core.UTCTime(now)})]}),
            asn1_cms.CMSAttribute({"type": "message_digest", "values": [hashlib.sha512(content).digest()]}),
        ]
        attrs.sort(key=lambda a: a.dump())  # DER orders a SET OF by encoding
        encoded = asn1_cms.CMSAttributes(attrs)
        signer_info["signed_attrs"] = encoded
        signer_info["signature"] = device.key.sign(encoded.dump())  # the SET OF (0x31) encoding
    else:
        signer_info["signature"] = device.key.sign(content)
    signed = asn1_cms.SignedData({
        "version": "v1", "digest_algorithms": [{"algorithm": "sha512"}],
        "encap_content_info": {"content_type": "data", "content": content},
        "certificates": [cert], "signer_infos": [signer_info]})
    return asn1_cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


# --- what verifies ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "ec-p521", "rsa-2048"])
def test_openssl_signed_request_verifies(pki, csr, kind):
    device = pki.device(kind)
    assert_fresh(verify_signed_request(pki.sign(device, csr)), csr, device)


@pytest.mark.parametrize("kind, md", [("ec-p256", "sha512"), ("ec-p384", "sha384"), ("ec-p521", "sha512"),
                                      ("rsa-2048", "sha384")])
def test_other_digests_verify(pki, csr, kind, md):
    device = pki.device(kind)
    assert_fresh(verify_signed_request(pki.sign(device, csr, "-md", md)), csr, device)


def test_rsa_pss_verifies(pki, csr):
    device = pki.device("rsa-2048")
    data = pki.sign(device, csr, "-keyopt", "rsa_padding_mode:pss")
    algorithm = asn1_cms.ContentInfo.load(data)["content"]["signer_infos"][0]["signature_algorithm"]
    assert algorithm["algorithm"].native == "rsassa_pss"
    assert_fresh(verify_signed_request(data), csr, device)


def test_signer_found_by_subject_key_identifier(pki, csr):
    device = pki.device("ec-p256")
    data = pki.sign(device, csr, "-keyid")
    assert asn1_cms.ContentInfo.load(data)["content"]["signer_infos"][0]["sid"].name == "subject_key_identifier"
    assert_fresh(verify_signed_request(data), csr, device)


@pytest.mark.parametrize("kind", ["ec-p256", "rsa-2048"])
def test_noattr_signs_the_content_itself(pki, csr, kind):
    device = pki.device(kind)
    data = pki.sign(device, csr, "-noattr")
    assert isinstance(asn1_cms.ContentInfo.load(data)["content"]["signer_infos"][0]["signed_attrs"], asn1_core.Void)
    assert_fresh(verify_signed_request(data), csr, device, signing_time=False)


def test_streamed_ber_output_verifies(pki, csr):
    """`-stream` makes openssl write indefinite-length BER even with -outform DER; it is accepted."""
    device = pki.device("ec-p256")
    data = pki.sign(device, csr, "-stream")
    assert data[1] == 0x80  # indefinite length
    assert_fresh(verify_signed_request(data), csr, device)


def test_smime_capabilities_and_pem_csr_are_passed_through(pki, csr, ec_request):
    attrs = asn1_cms.ContentInfo.load(ec_request)["content"]["signer_infos"][0]["signed_attrs"]
    assert "smime_capabilities" in [a["type"].native for a in attrs]  # openssl adds it unless -nosmimecap
    device = pki.device("ec-p256")
    pem = x509.load_der_x509_csr(csr).public_bytes(serialization.Encoding.PEM)
    # the module does not interpret the content: that is codec.load_csr's job in the caller
    assert verify_signed_request(pki.sign(device, pem)).csr_der == pem


@pytest.mark.parametrize("signed_attrs", [True, False])
def test_ed25519_rfc8419_verifies(pki, csr, signed_attrs):
    device = pki.device("ed25519")
    data = build_ed25519_cms(device, csr, signed_attrs=signed_attrs)
    assert_fresh(verify_signed_request(data), csr, device, signing_time=signed_attrs)
    tampered = build_ed25519_cms(device, csr, signed_attrs=signed_attrs)
    signature = signature_of(tampered)
    tampered = tampered.replace(signature, flip(signature, 5))
    with pytest.raises(UnauthorizedError, match="CMS signature does not verify"):
        verify_signed_request(tampered)


def test_openssl_ed25519(pki, csr, tmp_path):
    """The contract's exact command with an Ed25519 key, where the installed openssl can make one."""
    device = pki.device("ed25519")
    (tmp_path / "csr.der").write_bytes(csr)
    made = openssl("cms", "-sign", "-binary", "-nodetach", "-in", tmp_path / "csr.der", "-signer", device.cert_pem,
                   "-inkey", device.key_pem, "-outform", "DER", "-out", tmp_path / "out.cms", check=False)
    if made.returncode != 0:
        version = openssl("version").stdout.decode().strip()
        pytest.skip(f"{version} cannot sign CMS with Ed25519 (openssl#11915): {made.stderr.decode()[:120]}")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(pki.ca_cert.public_bytes(serialization.Encoding.PEM))
    if openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "out.cms", "-CAfile", ca_file,
               "-out", tmp_path / "content", check=False).returncode != 0:
        pytest.skip("this openssl makes Ed25519 CMS it cannot verify itself (openssl#32248)")
    assert_fresh(verify_signed_request((tmp_path / "out.cms").read_bytes()), csr, device)


# --- what is refused ----------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"definitely not DER", "not a DER ContentInfo"),
    (b"\x30\x03\x02\x01\x01", "not a DER ContentInfo"),
    (b"\x00" * (MAX_CMS_BYTES + 1), "limit"),
])
def test_garbage_is_a_bad_request(data, message):
    with pytest.raises(BadRequestError, match=message):
        verify_signed_request(data)


def test_non_bytes_is_a_bad_request():
    with pytest.raises(BadRequestError, match="must be bytes"):
        verify_signed_request("MIIB")  # type: ignore[arg-type]


@pytest.mark.parametrize("cut", [1, 10, 200, 600])
def test_truncated_der_is_a_bad_request(ec_request, cut):
    with pytest.raises(BadRequestError, match="not a DER ContentInfo"):
        verify_signed_request(ec_request[:-cut])


def test_trailing_bytes_are_a_bad_request(ec_request):
    with pytest.raises(BadRequestError, match="not a DER ContentInfo"):
        verify_signed_request(ec_request + b"\x00\x00")


def test_detached_signature_is_a_bad_request(pki, csr):
    data = pki.sign(pki.device("ec-p256"), csr, nodetach=False)
    with pytest.raises(BadRequestError, match="detached"):
        verify_signed_request(data)


@pytest.mark.parametrize("extra, message", [
    ((), "CMS signature does not verify: messageDigest does not match the encapsulated CSR"),
    (("-noattr",), "CMS signature does not verify with the signer certificate's key"),
])
def test_content_tampered_after_signing(pki, csr, extra, message):
    data = pki.sign(pki.device("ec-p256"), csr, *extra)
    offset = data.index(csr) + len(csr) // 2
    with pytest.raises(UnauthorizedError, match=message):
        verify_signed_request(flip(data, offset))


@pytest.mark.parametrize("kind", ["ec-p256", "rsa-2048"])
def test_signature_bytes_flipped(pki, csr, kind):
    data = pki.sign(pki.device(kind), csr)
    signature = signature_of(data)
    offset = data.index(signature) + len(signature) - 3
    with pytest.raises(UnauthorizedError, match="CMS signature does not verify with the signer certificate's key"):
        verify_signed_request(flip(data, offset))


def test_signed_attribute_tampered(ec_request):
    attrs = asn1_cms.ContentInfo.load(ec_request)["content"]["signer_infos"][0]["signed_attrs"]
    (signing_time,) = [a["values"][0] for a in attrs if a["type"].native == "signing_time"]
    encoded = signing_time.chosen.dump()
    earlier = signing_time.native - timedelta(hours=1)
    replacement = asn1_core.UTCTime(earlier).dump()
    assert len(replacement) == len(encoded) and ec_request.count(encoded) == 1
    with pytest.raises(UnauthorizedError, match="CMS signature does not verify"):
        verify_signed_request(ec_request.replace(encoded, replacement))


def test_reencoding_without_change_still_verifies(ec_request):
    """Control for the tests below: the re-encoding helper alone does not break anything."""
    assert reencode(ec_request, lambda signed, signer_info: None) == ec_request


def test_signer_certificate_replaced_by_one_with_another_key(pki, csr, ec_request):
    """Same issuer and serial (so it is the one the SignerInfo names), different key: a forgery."""
    original = pki.device("ec-p256").cert
    impostor = pki.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-ec-p256",
                         serial=original.serial_number)
    impostor_der = asn1_x509.Certificate.load(impostor.public_bytes(serialization.Encoding.DER))

    def swap(signed, signer_info):
        signed["certificates"] = [impostor_der]

    with pytest.raises(UnauthorizedError, match="CMS signature does not verify with the signer certificate's key"):
        verify_signed_request(reencode(ec_request, swap))


def test_signer_certificate_replaced_by_one_with_another_key_type(pki, ec_request):
    original = pki.device("ec-p256").cert
    impostor = pki.issue(pki.device("rsa-2048").key.public_key(), "dev-ec-p256", serial=original.serial_number)

    def swap(signed, signer_info):
        signed["certificates"] = [asn1_x509.Certificate.load(impostor.public_bytes(serialization.Encoding.DER))]

    with pytest.raises(BadRequestError,
                       match="signatureAlgorithm is ecdsa but the signer certificate holds an RSA key"):
        verify_signed_request(reencode(ec_request, swap))


def test_signer_certificate_missing(pki, csr, ec_request):
    other = pki.device("ec-p256", name="another-device").cert

    def swap(signed, signer_info):
        signed["certificates"] = [asn1_x509.Certificate.load(other.public_bytes(serialization.Encoding.DER))]

    with pytest.raises(BadRequestError, match="no certificate in the CMS matches the signer's issuer and serial"):
        verify_signed_request(reencode(ec_request, swap))
    with pytest.raises(BadRequestError, match="carries no certificates"):
        verify_signed_request(pki.sign(pki.device("ec-p256"), csr, "-nocerts"))


def test_ambiguous_signer_certificates(pki, ec_request):
    original = pki.device("ec-p256").cert
    twin = pki.issue(original.public_key(), "dev-ec-p256-twin", serial=original.serial_number)

    def add(signed, signer_info):
        signed["certificates"] = list(signed["certificates"]) + [
            asn1_x509.Certificate.load(twin.public_bytes(serialization.Encoding.DER))]

    with pytest.raises(BadRequestError, match="2 different certificates in the CMS match"):
        verify_signed_request(reencode(ec_request, add))


def test_extra_certificates_are_fine(pki, csr):
    device = pki.device("ec-p256")
    chain = pki.dir / "chain.pem"
    chain.write_bytes(pki.ca_cert.public_bytes(serialization.Encoding.PEM)
                      + pki.device("rsa-2048").cert.public_bytes(serialization.Encoding.PEM))
    assert_fresh(verify_signed_request(pki.sign(device, csr, "-certfile", str(chain))), csr, device)


def test_two_signers_are_a_bad_request(pki, csr):
    second = pki.device("rsa-2048")
    data = pki.sign(pki.device("ec-p256"), csr, "-signer", str(second.cert_pem), "-inkey", str(second.key_pem))
    with pytest.raises(BadRequestError, match="2 SignerInfos, expected exactly one"):
        verify_signed_request(data)


def test_weak_digest_is_a_bad_request(pki, csr):
    with pytest.raises(BadRequestError, match="unsupported CMS digest algorithm sha1"):
        verify_signed_request(pki.sign(pki.device("ec-p256"), csr, "-md", "sha1"))


def test_signature_hash_must_match_digest_algorithm(ec_request):
    def relabel(signed, signer_info):
        signer_info["signature_algorithm"] = {"algorithm": "sha384_ecdsa"}

    with pytest.raises(BadRequestError, match="uses a different hash than digestAlgorithm sha256"):
        verify_signed_request(reencode(ec_request, relabel))


def test_plain_ec_public_key_label_is_ecdsa(ec_request):
    """Some signers write id-ecPublicKey as the signatureAlgorithm: the hash comes from digestAlgorithm."""
    def relabel(signed, signer_info):
        signer_info["signature_algorithm"] = {"algorithm": "1.2.840.10045.2.1"}  # id-ecPublicKey

    data = reencode(ec_request, relabel)
    assert (asn1_cms.ContentInfo.load(data)["content"]["signer_infos"][0]["signature_algorithm"]["algorithm"]
            .dotted == "1.2.840.10045.2.1")
    assert verify_signed_request(data) == verify_signed_request(ec_request)


def test_content_type_attribute_must_match(ec_request):
    def retype(signed, signer_info):
        encap = signed["encap_content_info"]
        signed["encap_content_info"] = {"content_type": "1.2.840.113549.1.9.16.1.4", "content": encap["content"]}

    with pytest.raises(BadRequestError, match="contentType attribute data .* does not match eContentType"):
        verify_signed_request(reencode(ec_request, retype))


@pytest.mark.parametrize("dropped, message", [("message_digest", "lack the messageDigest"),
                                              ("content_type", "lack the contentType")])
def test_mandatory_signed_attributes(ec_request, dropped, message):
    def drop(signed, signer_info):
        signer_info["signed_attrs"] = [a for a in signer_info["signed_attrs"] if a["type"].native != dropped]

    with pytest.raises(BadRequestError, match=message):
        verify_signed_request(reencode(ec_request, drop))


def test_enveloped_data_is_a_bad_request(pki, csr):
    (pki.dir / "plain.der").write_bytes(csr)
    openssl("cms", "-encrypt", "-binary", "-in", pki.dir / "plain.der", "-outform", "DER",
            "-out", pki.dir / "env.cms", pki.device("rsa-2048").cert_pem)
    with pytest.raises(BadRequestError, match="content type is enveloped_data .* expected signed-data"):
        verify_signed_request((pki.dir / "env.cms").read_bytes())


def test_plain_data_is_a_bad_request(pki, csr):
    (pki.dir / "plain.der").write_bytes(csr)
    openssl("cms", "-data_create", "-binary", "-in", pki.dir / "plain.der", "-outform", "DER",
            "-out", pki.dir / "data.cms")
    with pytest.raises(BadRequestError, match="content type is data .* expected signed-data"):
        verify_signed_request((pki.dir / "data.cms").read_bytes())


def test_signer_certificate_is_not_checked_here(pki, ec_request):
    """Only the key is proven: a certificate whose CA signature is broken still comes back (the caller checks)."""
    original = pki.device("ec-p256").cert
    broken = flip(ec_request, ec_request.index(original.signature) + 10)
    result = verify_signed_request(broken)
    assert result.signer != original
    assert result.signer.public_key() == original.public_key()


# --- properties ---------------------------------------------------------------------------------

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_typed_errors(data):
    with pytest.raises((BadRequestError, UnauthorizedError)):
        verify_signed_request(data)


@FAST
@given(st.data())
def test_random_bytes_after_a_valid_prefix(ec_request, data):
    cut = data.draw(st.integers(0, len(ec_request) - 1))
    junk = data.draw(st.binary(max_size=64))
    assume(ec_request[:cut] + junk != ec_request)   # cutting a byte and appending it back is no mutation
    with pytest.raises((BadRequestError, UnauthorizedError)):
        verify_signed_request(ec_request[:cut] + junk)


@FAST
@given(st.data())
def test_mutations_never_forge(pki, csr, ec_request, data):
    """A mutated request raises a typed error, or still carries exactly what the signer signed.

    A mutation can land where nothing is signed or checked here (SignedData version,
    the digestAlgorithms set, the signer certificate's own CA signature or extensions):
    then the result is accepted, and the CSR, signing time and signer key are the
    original ones. The signer certificate itself may then differ from the original;
    rejecting that is the caller's certificate-chain check.
    """
    mutated = bytearray(ec_request)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(0, len(mutated) - 1))
        how = data.draw(st.sampled_from(["flip", "set", "delete", "insert"]))
        if how == "flip":
            mutated[where] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "set":
            mutated[where] = data.draw(st.integers(0, 255))
        elif how == "delete":
            del mutated[where]
        else:
            mutated.insert(where, data.draw(st.integers(0, 255)))
    original = verify_signed_request(ec_request)
    try:
        result = verify_signed_request(bytes(mutated))
    except BadRequestError:
        event("bad request")
        return
    except UnauthorizedError:
        event("unauthorized")
        return
    event("accepted" + (" (same signer)" if result.signer == original.signer else " (other signer bytes)"))
    assert result.csr_der == csr
    assert result.signing_time == original.signing_time
    assert result.signer.public_key() == pki.device("ec-p256").cert.public_key()
