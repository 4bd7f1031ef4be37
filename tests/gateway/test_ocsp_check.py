"""The gateway publishes an OCSP response as retained only if the issuing CA, or a responder it
authorised (RFC 6960 4.2.2.2), signed it; the responder's key is remembered, the judgement is not
skipped."""
from __future__ import annotations

from datetime import timedelta

import pytest

from ca import ocsp as ocsp_mod
from ca.model import CertStatus
from ca.signer import KeySigner, generate_key
from gateway.pki import GarbageError, check_ocsp
from tests.ca.test_ocsp_encoding import ISSUER, ISSUER_KEY, NOW, make_cert, responder

GOOD = ocsp_mod.OCSPAnswer(CertStatus.GOOD)


def response(cert, signer, serial: int = 0xABC) -> bytes:
    return ocsp_mod.build_response(serial=serial, answer=GOOD, issuer_cert=ISSUER, responder_cert=cert,
                                   responder_signer=signer, this_update=NOW, next_update=NOW + timedelta(hours=4))


def test_an_authorised_responder_passes_again_and_again():
    cert, signer = responder("ec-p256")
    for serial in (1, 2, 3):   # the second and third use the remembered key
        assert check_ocsp(response(cert, signer, serial), f"{serial:x}", ISSUER).serial_number == serial


def test_the_issuing_ca_itself_passes():
    assert check_ocsp(response(ISSUER, KeySigner(ISSUER_KEY)), "abc", ISSUER).serial_number == 0xABC


def test_a_responder_the_issuer_did_not_sign_is_refused():
    key = generate_key("ec-p256")
    stranger = make_cert("OCSP responder", key, key, "Issuing CA", ocsp_signing=True)   # self-signed look-alike
    with pytest.raises(GarbageError, match="not signed by the issuing CA"):
        check_ocsp(response(stranger, KeySigner(key)), "abc", ISSUER)


def test_a_certificate_of_the_issuer_without_ocsp_signing_is_refused():
    key = generate_key("ec-p256")
    plain = make_cert("not a responder", key, ISSUER_KEY, "Issuing CA", ocsp_signing=False)
    with pytest.raises(GarbageError, match="not signed by the issuing CA"):
        check_ocsp(response(plain, KeySigner(key)), "abc", ISSUER)


def test_an_authorised_responder_with_a_signature_by_another_key_is_refused():
    cert, _ = responder("ec-p256")
    with pytest.raises(GarbageError, match="not signed by the issuing CA"):
        check_ocsp(response(cert, KeySigner(generate_key("ec-p256"))), "abc", ISSUER)
    cert2, signer2 = responder("ec-p256")
    with pytest.raises(GarbageError, match="is about"):
        check_ocsp(response(cert2, signer2, serial=5), "6", ISSUER)
