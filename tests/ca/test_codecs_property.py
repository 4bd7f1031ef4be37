"""Property-based tests of the codecs, with asn1crypto and cryptography as independent decoders."""
from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from asn1crypto import core as asn1
from asn1crypto import crl as asn1_crl
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from ca import der
from ca.codec import b64decode_strict, load_csr
from ca.crl import encode_entry
from ca.errors import BadRequestError
from ca.model import Revocation, RevocationReason, parse_serial, serial_hex
from ca.timefmt import format_duration, parse_duration
from ca.udi import gtin_check_digit, parse_udi
from tests.conftest import make_csr

times = st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(9999, 12, 31),
                     timezones=st.just(timezone.utc)).map(lambda t: t.replace(microsecond=0))


@given(st.integers(min_value=-(2 ** 200), max_value=2 ** 200))
def test_der_integer_matches_asn1crypto(value):
    encoded = der.integer(value)
    assert encoded == asn1.Integer(value).dump()
    assert asn1.Integer.load(encoded).native == value


@given(st.binary(max_size=70000))
def test_der_lengths_decode(data):
    encoded = der.octet_string(data)
    assert asn1.OctetString.load(encoded).native == data


@given(st.lists(st.integers(min_value=0, max_value=2 ** 32), min_size=1, max_size=8)
       .map(lambda arcs: [1, 3] + arcs))
def test_der_oid_matches_asn1crypto(arcs):
    dotted = ".".join(map(str, arcs))
    assert der.oid(dotted) == asn1.ObjectIdentifier(dotted).dump()


@given(times)
def test_der_time_rfc5280_choice(when):
    encoded = der.time(when)
    if when.year < 2050:
        assert encoded[0] == 0x17 and asn1.UTCTime.load(encoded).native == when
    else:
        assert encoded[0] == 0x18 and asn1.GeneralizedTime.load(encoded).native == when


@given(st.integers(min_value=1, max_value=2 ** 159 - 1),
       st.sampled_from([r for r in RevocationReason if r is not RevocationReason.removeFromCRL]),
       times.filter(lambda t: t.year < 2050))
def test_crl_entry_decodes_with_asn1crypto(serial, reason, when):
    entry = asn1_crl.RevokedCertificate.load(encode_entry(Revocation(serial, reason, when)))
    assert entry["user_certificate"].native == serial
    assert entry["revocation_date"].native == when
    if reason is RevocationReason.unspecified:
        assert entry.crl_reason_value is None  # omitted, as RFC 5280 5.3.1 advises
    else:
        assert int.from_bytes(entry.crl_reason_value.contents, "big") == reason.value


@given(st.integers(min_value=1, max_value=2 ** 160 - 1))
def test_serial_hex_roundtrip(serial):
    text = serial_hex(serial)
    assert text == text.lower() and not text.startswith("0")
    assert parse_serial(text) == serial
    assert parse_serial(":".join(text[i:i + 2] for i in range(0, len(text), 2)).upper()) == serial


@given(st.text(max_size=50))
def test_parse_serial_rejects_or_parses(text):
    try:
        value = parse_serial(text)
    except BadRequestError:
        return
    assert value >= 0


@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10000)).map(
    lambda d: timedelta(seconds=int(d.total_seconds()))))
def test_duration_roundtrip(delta):
    assert parse_duration(format_duration(delta)) == delta


@given(st.text(max_size=20) | st.from_regex(r"\A([0-9]{1,25}[wdhms]){1,3}\Z"))
def test_parse_duration_never_crashes(text):
    """Text, and well-formed durations of any size (a huge one was an OverflowError, a 500 at the API)."""
    try:
        assert parse_duration(text) >= timedelta(0)
    except BadRequestError as exc:
        assert "invalid duration" in str(exc) or "years" in str(exc)


@given(st.binary(max_size=3000))
@settings(max_examples=300)
def test_load_csr_garbage_is_a_bad_request(data):
    try:
        csr = load_csr(data)
    except BadRequestError:
        return
    # anything accepted must really be a CSR that writes back to the same bytes
    assert csr.public_bytes(serialization.Encoding.DER) == data


_CSR_DER = make_csr()[0].public_bytes(serialization.Encoding.DER)


@given(st.integers(min_value=1, max_value=len(_CSR_DER) - 1))
def test_truncated_csr_is_a_bad_request(cut):
    with pytest.raises(BadRequestError):
        load_csr(_CSR_DER[:cut])


@given(st.binary(max_size=500), st.integers(min_value=0, max_value=76))
def test_b64_roundtrip_with_line_breaks(data, width):
    text = base64.b64encode(data).decode()
    if width:
        text = "\r\n".join(text[i:i + width] for i in range(0, len(text), width))
    assert b64decode_strict(text) == data


@given(st.text(alphabet="!@#$%^&*()[]{}<>?", min_size=1, max_size=20))
def test_b64_rejects_non_alphabet(text):
    with pytest.raises(BadRequestError):
        b64decode_strict(text)


@given(st.text(alphabet="0123456789", min_size=13, max_size=13),
       st.text(alphabet="ABCDEFGHJK0123456789", min_size=1, max_size=20))
def test_gs1_udi_roundtrip(body, lot):
    gtin = body + str(gtin_check_digit(body))
    assert parse_udi(f"(01){gtin}(10){lot}") == (gtin, f"(10){lot}")
    wrong = body + str((gtin_check_digit(body) + 1) % 10)
    with pytest.raises(BadRequestError, match="check digit"):
        parse_udi(f"(01){wrong}(10){lot}")


def test_known_udi_examples():
    # FDA's GUDID example label; HIBCC example from the HIBC LIC standard
    assert parse_udi("(01)00844588003288(17)141120(10)7654321D(21)10987654d321") == (
        "00844588003288", "(17)141120(10)7654321D(21)10987654d321")
    assert parse_udi("+H123PROD1231/$$3141120LOT1") == ("+H123PROD1231", "$$3141120LOT1")
    with pytest.raises(BadRequestError):
        parse_udi("not a udi")
