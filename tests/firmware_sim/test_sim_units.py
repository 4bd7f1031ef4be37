"""The simulator's pure parts, without any process: the device state machine, its folder,
connectivity windows, latency percentiles and the peer's OCSP verification."""
from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.timefmt import to_rfc3339
from firmware_sim.connectivity import MODELS, PATTERNS, Connectivity
from firmware_sim.device import (Action, DeviceRecord, State, adopt, has_valid_certificate, next_action,
                                 renewal_point)
from firmware_sim.persist import DeviceFolder
from firmware_sim.revocation import OCSPVerifyError, verified_status
from firmware_sim.stats import Stats, percentile
from tests.conftest import T0

LIFETIME = timedelta(seconds=12)
BACKDATE = timedelta(minutes=5)   # the CA backdates notBefore this much (ca/issuance.py)
GRACE = timedelta(seconds=20)


def enrolled(issued: datetime = T0, *, lifetime: timedelta = LIFETIME, state: State = State.ENROLLED,
             issued_at: bool = True) -> DeviceRecord:
    return DeviceRecord(device_id="sim-00001", model="infusion-pump", firmware="2.0.0", transport="http",
                        state=state, not_before=to_rfc3339(issued - BACKDATE),
                        not_after=to_rfc3339(issued + lifetime),
                        issued_at=to_rfc3339(issued) if issued_at else None, serial="1f")


# -- device.next_action -------------------------------------------------------------------
def test_unenrolled_device_enrolls_only_with_a_token():
    record = DeviceRecord(device_id="d", model="m", firmware="1", transport="http", token="secret")
    assert next_action(record, T0, GRACE) is Action.ENROLL
    record.token = None
    assert next_action(record, T0, GRACE) is Action.NONE
    assert record.state is State.UNENROLLED


def test_renewal_point_counts_from_issuance_not_from_the_backdated_not_before():
    record = enrolled()
    assert renewal_point(record) == T0 + timedelta(seconds=8)  # 2/3 of 12 s after issuance
    # from notBefore (5 min earlier) the point would lie 92 s before issuance: renew at once, forever
    for seconds in (0, 1, 5, 7):
        assert next_action(record, T0 + timedelta(seconds=seconds), GRACE) is Action.NONE, seconds
    assert next_action(record, T0 + timedelta(seconds=8), GRACE) is Action.RENEW
    assert next_action(record, T0 + timedelta(seconds=11), GRACE) is Action.RENEW
    assert record.state is State.ENROLLED  # still valid: no state change before notAfter


def test_renewal_point_falls_back_to_not_before_without_issued_at():
    record = enrolled(issued_at=False)
    assert renewal_point(record) == T0 - BACKDATE + (BACKDATE + LIFETIME) * 2 / 3


def test_gateway_renew_notice_renews_before_the_renewal_point():
    record = enrolled()
    assert next_action(record, T0 + timedelta(seconds=1), GRACE) is Action.NONE
    record.renew_requested = True
    assert next_action(record, T0 + timedelta(seconds=1), GRACE) is Action.RENEW


def test_expired_within_grace_renews_through_the_grace_path():
    record = enrolled()
    not_after = T0 + LIFETIME
    assert next_action(record, not_after + timedelta(seconds=1), GRACE) is Action.RENEW
    assert record.state is State.EXPIRED
    record.state = State.ENROLLED
    # the last second of the grace period still renews (the CA refuses only after not_after + grace)
    assert next_action(record, not_after + GRACE, GRACE) is Action.RENEW
    assert record.state is State.EXPIRED


def test_beyond_grace_is_stranded_and_stays_stranded():
    record = enrolled()
    beyond = T0 + LIFETIME + GRACE + timedelta(seconds=1)
    assert next_action(record, beyond, GRACE) is Action.NONE
    assert record.state is State.STRANDED
    # nothing brings it back but a new token (an engineer's action)
    assert next_action(record, T0 + timedelta(seconds=9), GRACE) is Action.NONE
    assert record.state is State.STRANDED


@pytest.mark.parametrize("state", [State.REVOKED, State.STRANDED])
def test_revoked_or_stranded_device_does_nothing(state):
    for when in (T0 + timedelta(seconds=9), T0 + LIFETIME + timedelta(seconds=1), T0 + timedelta(days=1)):
        record = enrolled(state=state)
        record.renew_requested = True
        record.token = "new-token-but-still-revoked" if state is State.REVOKED else None
        assert next_action(record, when, GRACE) is Action.NONE
        assert record.state is state


def test_renewing_device_still_renews_and_is_valid():
    record = enrolled(state=State.RENEWING)
    assert next_action(record, T0 + timedelta(seconds=9), GRACE) is Action.RENEW
    assert has_valid_certificate(record, T0 + timedelta(seconds=9))


def test_has_valid_certificate():
    record = enrolled()
    assert has_valid_certificate(record, T0)
    assert has_valid_certificate(record, T0 + LIFETIME)
    assert not has_valid_certificate(record, T0 + LIFETIME + timedelta(seconds=1))
    assert not has_valid_certificate(record, T0 - BACKDATE - timedelta(seconds=1))
    for state in (State.EXPIRED, State.REVOKED, State.STRANDED, State.UNENROLLED):
        record.state = state
        assert not has_valid_certificate(record, T0), state


def _cert(not_before: datetime, not_after: datetime, serial: int = 0xABC) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sim-00001")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))


def test_adopt_remembers_issuance_and_spends_the_token():
    record = DeviceRecord(device_id="sim-00001", model="m", firmware="1", transport="mqtt", token="t",
                          state=State.EXPIRED, renew_requested=True)
    cert = _cert(T0 - BACKDATE, T0 + LIFETIME, serial=0xABC)
    adopt(record, cert, T0 + timedelta(seconds=1))
    assert record.state is State.ENROLLED
    assert record.token is None and record.renew_requested is False
    assert record.serial == "abc"
    assert record.issued_at == to_rfc3339(T0 + timedelta(seconds=1))
    assert record.not_before == to_rfc3339(T0 - BACKDATE) and record.not_after == to_rfc3339(T0 + LIFETIME)
    # a device whose clock is behind the CA's: issuance is never taken before notBefore
    adopt(record, cert, T0 - timedelta(hours=1))
    assert record.issued_at == to_rfc3339(T0 - BACKDATE)


# -- DeviceRecord and its folder --------------------------------------------------------------
def test_device_record_json_round_trip():
    record = DeviceRecord(device_id="sim-00042", model="imaging-ct", firmware="3.1.4", transport="mqtt",
                          token=None, state=State.EXPIRED, not_before="2026-11-22T11:55:00Z",
                          not_after="2026-11-22T12:00:12Z", issued_at="2026-11-22T12:00:00Z", serial="7f01",
                          pending={"abc-1": "simplereenroll", "abc-2": "simpleenroll"},
                          renew_requested=True, server_keygen=True)
    text = record.to_json()
    back = DeviceRecord.from_json(text)
    assert back == record
    assert isinstance(back.state, State) and back.state is State.EXPIRED
    assert '"state": "expired"' in text
    fresh = DeviceRecord(device_id="d", model="m", firmware="1", transport="http", token="tok")
    assert DeviceRecord.from_json(fresh.to_json()) == fresh


def test_device_folder_keeps_identity_and_promotes_only_a_complete_pair(tmp_path):
    folder = DeviceFolder(tmp_path, "sim-00001")
    folder.path.mkdir()
    record = enrolled()
    folder.save(record)
    assert folder.exists() and folder.load() == record
    assert folder.load_cert() is None
    old_key, new_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    old_cert, new_cert = _cert(T0, T0 + LIFETIME, 1), _cert(T0, T0 + LIFETIME, 2)
    folder.write_key(old_key)
    folder.write_cert(old_cert)
    folder.write_key(new_key, new=True)
    folder.write_cert(new_cert, new=True)
    assert folder.load_cert() == old_cert  # still the old pair while renewing
    folder.discard_new()
    assert not folder.new_key.exists() and not folder.new_cert.exists()
    assert folder.load_key().private_numbers() == old_key.private_numbers()
    folder.write_key(new_key, new=True)
    folder.write_cert(new_cert, new=True)
    folder.promote()
    assert folder.load_cert() == new_cert
    assert folder.load_key().private_numbers() == new_key.private_numbers()
    assert not folder.new_key.exists() and not folder.new_cert.exists()
    assert folder.key.stat().st_mode & 0o777 == 0o600 and folder.state.stat().st_mode & 0o777 == 0o600


# -- connectivity ---------------------------------------------------------------------------------
def _windows(model: str, seed, n: int = 20, scale: float = 8640.0) -> list[float]:
    conn = Connectivity(model, random.Random(seed), scale, intermittent=True)
    out = []
    for _ in range(n):
        out += [conn.online(), conn.offline()]
    return out


@pytest.mark.parametrize("model", MODELS)
def test_windows_are_deterministic_for_a_seed(model):
    assert _windows(model, "1-sim-00001") == _windows(model, "1-sim-00001")
    assert _windows(model, "1-sim-00001") != _windows(model, "2-sim-00001")
    assert all(w >= 0 and math.isfinite(w) for w in _windows(model, 7))


def test_always_online_device_is_never_offline_by_itself():
    conn = Connectivity("home-monitor", random.Random(1), 8640.0, intermittent=False)
    assert all(conn.online() == float("inf") for _ in range(100))


def test_windows_scale_with_the_time_scale():
    slow, fast = _windows("ventilator", 3, scale=3600.0), _windows("ventilator", 3, scale=7200.0)
    assert slow == pytest.approx([2 * w for w in fast])  # 1 s = 1 nominal hour vs 2 nominal hours


@pytest.mark.parametrize("model", MODELS)
def test_long_offline_windows_appear_at_the_configured_rate(model):
    pattern = PATTERNS[model]
    scale = 3600.0  # one wall second per nominal hour: windows read directly in hours
    conn = Connectivity(model, random.Random(f"rate-{model}"), scale, intermittent=True)
    draws = 20000
    lo, hi = pattern.long_h
    long_ones = [w for w in (conn.offline() for _ in range(draws)) if pattern.long_p and lo <= w <= hi]
    rate = len(long_ones) / draws
    # within 5 standard deviations of long_p (an ordinary window of >= 75 h is astronomically rare)
    sigma = math.sqrt(pattern.long_p * (1 - pattern.long_p) / draws)
    assert abs(rate - pattern.long_p) <= 5 * sigma + 1e-9, (model, rate, pattern.long_p)
    if pattern.long_p:
        # a long window outlasts a demo certificate (30 s at the demo's 8640x: 72 h)
        assert min(long_ones) >= 72


def test_home_monitors_sometimes_stay_away_past_lifetime_plus_grace():
    # the demo: 30 s lifetime + 20 s grace = 50 s = 120 nominal hours at the default time scale
    conn = Connectivity("home-monitor", random.Random(5), 8640.0, intermittent=True)
    windows = [conn.offline() for _ in range(2000)]
    assert any(w > 50 for w in windows)
    assert sum(1 for w in windows if w > 50) < len(windows) * 0.1


# -- stats ------------------------------------------------------------------------------------------
def test_percentiles_nearest_rank_by_hand():
    values = [50, 15, 40, 20, 35]          # sorted: 15 20 35 40 50
    assert percentile(values, 30) == 20    # ceil(0.3*5)=2nd
    assert percentile(values, 40) == 20    # ceil(2.0)=2nd
    assert percentile(values, 50) == 35    # ceil(2.5)=3rd
    assert percentile(values, 100) == 50
    assert percentile(values, 0) == 15
    tens = list(range(10, 0, -1))          # 1..10, unsorted
    assert (percentile(tens, 50), percentile(tens, 95), percentile(tens, 99)) == (5, 10, 10)
    hundred = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    assert (percentile(hundred, 50), percentile(hundred, 95), percentile(hundred, 99)) == (0.05, 0.095, 0.099)
    assert percentile([0.25], 99) == 0.25
    assert math.isnan(percentile([], 50))
    assert values == [50, 15, 40, 20, 35]  # the input is not reordered


def test_latency_table_in_milliseconds():
    stats = Stats()
    for ms in (10, 20, 30, 40):
        stats.timed("http_simpleenroll", ms / 1000)
    stats.timed("mqtt_ocsp", 0.0015)
    stats.count("enrolled", 2)
    stats.error("posture_noncompliant")
    stats.error("posture_noncompliant")
    table = stats.latency_table()
    assert table["http_simpleenroll"] == {"n": 4, "p50_ms": 20.0, "p95_ms": 40.0, "p99_ms": 40.0}
    assert table["mqtt_ocsp"]["p50_ms"] == 1.5
    assert list(table) == ["http_simpleenroll", "mqtt_ocsp"]
    assert stats.counts["enrolled"] == 2 and stats.errors["posture_noncompliant"] == 2


# -- revocation.verified_status ---------------------------------------------------------------------
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _issue(issuer, issuer_key, cn: str, *, ocsp_signing: bool = False, serial: int | None = None,
           not_after: datetime | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(not_after or NOW + timedelta(days=7)))
    eku = [ExtendedKeyUsageOID.OCSP_SIGNING] if ocsp_signing else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki():
    issuer, issuer_key = _ca("Test Issuing CA")
    responder, responder_key = _issue(issuer, issuer_key, "Test OCSP", ocsp_signing=True)
    device, _ = _issue(issuer, issuer_key, "sim-00003", serial=0x5EED)
    other, _ = _issue(issuer, issuer_key, "sim-00004", serial=0x0BAD)
    return dict(issuer=issuer, issuer_key=issuer_key, responder=responder, responder_key=responder_key,
                device=device, other=other)


def _response(pki, *, about=None, status=ocsp.OCSPCertStatus.GOOD, signer=None, signer_key=None,
              certs=None, this_update=None, next_update=None) -> ocsp.OCSPResponse:
    about = about or pki["device"]
    signer = signer or pki["responder"]
    signer_key = signer_key or pki["responder_key"]
    revoked = status is ocsp.OCSPCertStatus.REVOKED
    builder = (ocsp.OCSPResponseBuilder()
               .add_response(cert=about, issuer=pki["issuer"], algorithm=hashes.SHA1(), cert_status=status,
                             this_update=this_update or NOW - timedelta(minutes=1),
                             next_update=next_update or NOW + timedelta(hours=1),
                             revocation_time=NOW - timedelta(minutes=2) if revoked else None,
                             revocation_reason=x509.ReasonFlags.cessation_of_operation if revoked else None)
               .responder_id(ocsp.OCSPResponderEncoding.HASH, signer))
    certs = [signer] if certs is None else certs
    if certs:
        builder = builder.certificates(certs)
    der = builder.sign(signer_key, hashes.SHA256()).public_bytes(Encoding.DER)
    return ocsp.load_der_ocsp_response(der)


def test_delegated_good_and_revoked_responses_verify(pki):
    serial = pki["device"].serial_number
    assert verified_status(_response(pki), pki["issuer"], serial) == "good"
    assert verified_status(_response(pki, status=ocsp.OCSPCertStatus.REVOKED), pki["issuer"], serial) == "revoked"
    assert verified_status(_response(pki, status=ocsp.OCSPCertStatus.UNKNOWN), pki["issuer"], serial) == "unknown"


def test_response_signed_by_a_key_the_issuer_never_delegated_is_rejected(pki):
    serial = pki["device"].serial_number
    # a responder certificate from another CA (same name, even)
    stranger_ca, stranger_key = _ca("Test Issuing CA")
    rogue, rogue_key = _issue(stranger_ca, stranger_key, "Test OCSP", ocsp_signing=True)
    with pytest.raises(OCSPVerifyError, match="not delegated"):
        verified_status(_response(pki, signer=rogue, signer_key=rogue_key,
                                  status=ocsp.OCSPCertStatus.GOOD), pki["issuer"], serial)
    # a self-signed responder
    selfsigned, selfsigned_key = _ca("Test OCSP")
    with pytest.raises(OCSPVerifyError):
        verified_status(_response(pki, signer=selfsigned, signer_key=selfsigned_key), pki["issuer"], serial)
    # a certificate of our issuer, but not delegated for OCSP signing (a peer device's own)
    peer, peer_key = _issue(pki["issuer"], pki["issuer_key"], "sim-00009")
    with pytest.raises(OCSPVerifyError, match="OCSPSigning"):
        verified_status(_response(pki, signer=peer, signer_key=peer_key), pki["issuer"], serial)
    # the delegated responder's certificate attached, but the response signed with another key
    with pytest.raises(OCSPVerifyError, match="signature"):
        verified_status(_response(pki, signer=rogue, signer_key=rogue_key, certs=[pki["responder"]]),
                        pki["issuer"], serial)
    # no responder certificate at all
    with pytest.raises(OCSPVerifyError):
        verified_status(_response(pki, certs=[]), pki["issuer"], serial)


def test_response_about_another_certificate_is_rejected(pki):
    about_other = _response(pki, about=pki["other"], status=ocsp.OCSPCertStatus.GOOD)
    with pytest.raises(OCSPVerifyError, match="another certificate"):
        verified_status(about_other, pki["issuer"], pki["device"].serial_number)


def test_unsuccessful_response_is_rejected(pki):
    unauthorized = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    with pytest.raises(OCSPVerifyError, match="UNAUTHORIZED"):
        verified_status(unauthorized, pki["issuer"], pki["device"].serial_number)


def test_stale_response_is_rejected(pki):
    stale = _response(pki, this_update=NOW - timedelta(days=3), next_update=NOW - timedelta(days=2))
    with pytest.raises(OCSPVerifyError):
        verified_status(stale, pki["issuer"], pki["device"].serial_number)


async def test_an_answer_that_arrived_while_not_looked_at_is_kept():
    """A device that was waiting for an answer (queued, offline) must still find it when it next
    looks: asking for the future of a request id must not throw an arrived answer away."""
    import asyncio
    import json as _json

    from firmware_sim.mqtt_client import DeviceMQTT
    from gateway.mqtt import Message

    device = DeviceMQTT("mqtt://127.0.0.1:1", "sim-x")   # never connected: only the dispatch is tested
    future = device.expect("r1")
    reader = asyncio.create_task(device._read())
    try:
        device.link.messages.put_nowait(Message("iomt/v1/dev/sim-x/resp/simpleenroll",
                                                _json.dumps({"id": "r1", "status": "ok"}).encode()))
        await asyncio.wait_for(asyncio.shield(future), 2)
        again = device.expect("r1")
        assert again is future and again.result() == {"id": "r1", "status": "ok"}
    finally:
        reader.cancel()
