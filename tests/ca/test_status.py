"""Certificate status as one state machine (ca/status.py), and what only a device's proof may change
(ca/proof.py): attendance, holds lifted on return, the firmware gate, superseded certificates."""
from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp

from ca import status
from ca.audit import verify_chain
from ca.authority import Authority, OperatorAuth, TokenAuth
from ca.config import AttendancePolicy, ModelPolicy
from ca.credentials import CertificateAuth, SignedRequestAuth
from ca.errors import (BadRequestError, PolicyViolationError, PostureError, RevokedError, SupersededError,
                       UnauthorizedError, UnknownDeviceError)
from ca.model import CertStatus, DeviceStatus, RevocationReason
from ca.registry import new_device
from tests.conftest import make_csr

R = RevocationReason
PUMP = "infusion-pump"


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    a.config = replace(a.config, models={PUMP: ModelPolicy(non_attendance=timedelta(hours=1),
                                                           min_firmware="2.0.0")})
    yield a
    await a.close()


async def enrolled(authority, device_id="pump-1", firmware="2.1.0"):
    token = await authority.registry.add(new_device(device_id, model=PUMP, owner="ICU", firmware=firmware),
                                         actor="test")
    csr, key = make_csr()
    issued = await authority.enroll(device_id, csr, TokenAuth(token.secret))
    return issued, key


async def renew(authority, issued, *, signed=True, request_id=None):
    csr, key = make_csr()
    cred = (SignedRequestAuth(issued.certificate, signing_time=authority.now()) if signed
            else CertificateAuth(issued.certificate))
    return await authority.renew(issued.device_id if signed else None, csr, cred, request_id=request_id), key


def signed(authority, issued, at=None):
    return SignedRequestAuth(issued.certificate, signing_time=at or authority.now())


async def held_absent(authority, clock, device_id="pump-1"):
    issued, _ = await enrolled(authority, device_id)
    clock.advance(hours=2)
    report = await authority.enforce_attendance()
    assert report.held == {device_id: [issued.serial]}
    assert (await authority.certificate(issued.serial)).status is CertStatus.HOLD
    return issued


async def published_status(authority, serial):
    """What relying parties are told: the signed OCSP response and the signed CRL."""
    resp = x509_ocsp.load_der_ocsp_response(await authority.ocsp_response(serial))
    crl = x509.load_der_x509_crl(await authority.crl())
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    crl_reason = None
    if entry is not None:
        crl_reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    return resp.certificate_status, resp.revocation_reason, entry is not None, crl_reason


def test_the_transition_table_is_exactly_the_four_allowed():
    G, H, V = CertStatus.GOOD, CertStatus.HOLD, CertStatus.REVOKED
    assert set(status.TRANSITIONS) == {(G, H), (H, G), (G, V), (H, V)}
    for current in CertStatus:
        assert not status.allowed(V, current)  # revoked is terminal
        assert not status.allowed(current, current)


# -- the reproduction of the bug: held, revoked, then a presence message -----------------------------
@pytest.mark.parametrize("how", ["revoke", "decommission"])
async def test_a_revoked_certificate_never_comes_back(authority, clock, how):
    issued = await held_absent(authority, clock)
    if how == "revoke":
        await authority.revoke(issued.serial, R.keyCompromise, actor="operator:sec")
        reason, flag = R.keyCompromise, x509.ReasonFlags.key_compromise
    else:
        await authority.decommission("pump-1", actor="operator:eng")
        reason, flag = R.cessationOfOperation, x509.ReasonFlags.cessation_of_operation
    await authority.record_presence("pump-1", online=True)
    await authority.record_reported_posture("pump-1", {"firmware": "9.9.9"})
    with pytest.raises(RevokedError):
        await authority.prove_posture("pump-1", {"firmware": "9.9.9"}, signed(authority, issued))
    with pytest.raises(RevokedError):
        await renew(authority, issued)
    clock.advance(minutes=5)
    await authority.enforce_attendance()
    record = await authority.certificate(issued.serial)
    assert record.status is CertStatus.REVOKED and record.reason is reason
    ocsp_status, ocsp_reason, on_crl, crl_reason = await published_status(authority, issued.serial)
    assert ocsp_status is x509_ocsp.OCSPCertStatus.REVOKED and ocsp_reason is flag
    assert on_crl and crl_reason is flag
    async with authority.store.read() as tx:
        assert await tx.attendance_holds("pump-1") == []   # the superseded hold is gone
        assert not verify_chain(await tx.audit_rows())


async def test_release_only_from_hold_and_revoke_only_once(authority):
    issued, _ = await enrolled(authority)
    with pytest.raises(PolicyViolationError, match="not on hold"):
        await authority.release(issued.serial, actor="eng")
    await authority.hold(issued.serial, actor="eng")
    with pytest.raises(PolicyViolationError, match="already on hold"):
        await authority.hold(issued.serial, actor="eng")
    assert (await authority.release(issued.serial, actor="eng")).status is CertStatus.GOOD
    await authority.hold(issued.serial, actor="eng")
    revoked = await authority.revoke(issued.serial, R.superseded, actor="eng")
    assert revoked.status is CertStatus.REVOKED and revoked.reason is R.superseded
    for attempt in (authority.release(issued.serial, actor="eng"), authority.hold(issued.serial, actor="eng"),
                    authority.revoke(issued.serial, R.keyCompromise, actor="eng")):
        with pytest.raises(PolicyViolationError, match="already revoked"):
            await attempt
    assert (await authority.certificate(issued.serial)).reason is R.superseded


async def test_the_store_refuses_a_transition_from_a_status_it_is_no_longer_in(authority):
    issued, _ = await enrolled(authority)
    stale = await authority.certificate(issued.serial)             # read as good by "another process"
    await authority.revoke(issued.serial, R.keyCompromise, actor="eng")
    before = await authority.last_status_change()
    async with authority.store.write() as tx:
        assert not await tx.change_status(issued.serial, CertStatus.GOOD, CertStatus.HOLD, R.certificateHold,
                                          authority.now())
        assert not await tx.change_status(issued.serial, CertStatus.HOLD, CertStatus.GOOD, None, authority.now())
        with pytest.raises(PolicyViolationError, match="already revoked"):
            await status.revoke(tx, stale, R.certificateHold, authority.now())   # the core's refusal
    assert await authority.last_status_change() == before          # nothing was written
    assert (await authority.certificate(issued.serial)).reason is R.keyCompromise


async def test_no_sql_path_undoes_a_revocation_or_a_decommission(authority, ca_home):
    issued, _ = await enrolled(authority)
    await authority.revoke(issued.serial, R.keyCompromise, actor="eng")
    await authority.decommission("pump-1", actor="eng")
    conn = sqlite3.connect(authority.config.database)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="stays revoked"):
            conn.execute("UPDATE certificates SET status = 'good' WHERE serial = ?", (format(issued.serial, "x"),))
        with pytest.raises(sqlite3.IntegrityError, match="only a certificateHold"):
            conn.execute("UPDATE revocations SET released_at = '2026-11-22T13:00:00Z'")
        with pytest.raises(sqlite3.IntegrityError, match="stays decommissioned"):
            conn.execute("UPDATE devices SET status = 'active' WHERE id = 'pump-1'")
    finally:
        conn.close()


async def test_a_decommissioned_device_never_enrolls_renews_or_proves_again(authority):
    issued, _ = await enrolled(authority)
    await authority.decommission("pump-1", actor="eng")
    with pytest.raises(RevokedError):
        await renew(authority, issued)
    with pytest.raises(RevokedError):
        await authority.enroll("pump-1", make_csr()[0], OperatorAuth("eng"))
    with pytest.raises(PolicyViolationError):
        await authority.registry.new_token("pump-1", actor="eng")
    with pytest.raises(PolicyViolationError, match="already decommissioned"):
        await authority.decommission("pump-1", actor="eng")
    assert (await authority.registry.get("pump-1")).status is DeviceStatus.DECOMMISSIONED


# -- attendance: only proven contact counts ---------------------------------------------------------
async def test_presence_is_reported_only_and_does_not_count_as_attendance(authority, clock):
    issued, _ = await enrolled(authority)
    for _ in range(4):
        clock.advance(minutes=30)
        await authority.record_presence("pump-1", online=True)   # anyone on the broker can send this
    device = await authority.registry.get("pump-1")
    assert device.reported_online is True and device.reported_online_at == clock.now
    assert device.last_proven_contact < clock.now - timedelta(hours=1)
    report = await authority.enforce_attendance()
    assert report.held == {"pump-1": [issued.serial]}
    await authority.record_presence("pump-1", online=True)
    assert (await authority.certificate(issued.serial)).status is CertStatus.HOLD   # not lifted by a report
    async with authority.store.read() as tx:
        actions = [r.action for r in await tx.audit_rows()]
    assert "certificate_released" not in actions and "device_returned" not in actions
    with pytest.raises(UnknownDeviceError):
        await authority.record_presence("nobody", online=True)


async def test_a_proven_return_lifts_the_same_hold(authority, clock):
    issued = await held_absent(authority, clock)
    device, released = await authority.prove_posture("pump-1", {"firmware": "2.1.0"}, signed(authority, issued))
    assert released == [issued.serial] and device.last_proven_contact == clock.now
    assert (await authority.certificate(issued.serial)).status is CertStatus.GOOD
    async with authority.store.read() as tx:
        rows = await tx.audit_rows()
    assert [(r.action, r.actor) for r in rows if r.action == "certificate_released"] == \
        [("certificate_released", "system:attendance")]


async def test_a_renewal_with_a_certificate_held_for_absence_lifts_the_hold_and_renews(authority, clock):
    issued = await held_absent(authority, clock)
    new, _ = await renew(authority, issued, signed=False)   # mutual TLS
    assert (await authority.certificate(issued.serial)).status is CertStatus.GOOD
    assert (await authority.certificate(new.serial)).status is CertStatus.GOOD


async def test_an_operator_hold_is_not_lifted_by_a_return(authority, clock):
    issued = await held_absent(authority, clock)
    await authority.release(issued.serial, actor="operator:sec")   # an operator lifts the absence hold...
    await authority.hold(issued.serial, actor="operator:sec")      # ...and puts one of their own
    with pytest.raises(RevokedError, match="on hold"):
        await authority.prove_posture("pump-1", {"firmware": "2.1.0"}, signed(authority, issued))
    with pytest.raises(RevokedError, match="on hold"):
        await renew(authority, issued)
    assert (await authority.certificate(issued.serial)).status is CertStatus.HOLD


async def test_a_held_device_on_old_firmware_stays_held_until_it_proves_new_firmware(authority, clock):
    issued, _ = await enrolled(authority, firmware="1.0.0")
    clock.advance(hours=2)
    await authority.enforce_attendance()
    with pytest.raises(PostureError):
        await renew(authority, issued)
    assert (await authority.certificate(issued.serial)).status is CertStatus.HOLD
    # the refused renewal was still proven contact
    assert (await authority.registry.get("pump-1")).last_proven_contact == clock.now
    _, released = await authority.prove_posture("pump-1", {"firmware": "2.0.0"}, signed(authority, issued))
    assert released == [issued.serial]


async def test_release_on_return_off_keeps_the_hold(authority, clock):
    authority.config = replace(authority.config, attendance=AttendancePolicy(release_on_return=False))
    issued = await held_absent(authority, clock)
    _, released = await authority.prove_posture("pump-1", {"firmware": "2.1.0"}, signed(authority, issued))
    assert released == [] and (await authority.certificate(issued.serial)).status is CertStatus.HOLD
    with pytest.raises(RevokedError, match="on hold"):
        await renew(authority, issued)


# -- the firmware gate reads only proof -----------------------------------------------------------
async def test_an_unsigned_posture_does_not_pass_the_firmware_gate_a_signed_one_does(authority):
    issued, _ = await enrolled(authority, firmware="1.0.0")
    await authority.record_reported_posture("pump-1", {"firmware": "9.9.9"})
    device = await authority.registry.get("pump-1")
    assert device.reported_firmware == "9.9.9" and device.firmware == "1.0.0"
    with pytest.raises(PostureError):
        await renew(authority, issued)
    device, _ = await authority.prove_posture("pump-1", {"firmware": "2.4.1"}, signed(authority, issued))
    assert device.firmware == "2.4.1"
    new, _ = await renew(authority, issued)
    assert new.device_id == "pump-1"
    async with authority.store.read() as tx:
        changed = [r for r in await tx.audit_rows() if r.action == "firmware_changed"]
    assert [(r.actor, r.detail) for r in changed] == \
        [("device:pump-1", '{"from":"1.0.0","proof":"cms","to":"2.4.1"}')]


async def test_signed_posture_refusals(authority, clock):
    issued, _ = await enrolled(authority)
    other, _ = await enrolled(authority, "pump-2")
    with pytest.raises(UnauthorizedError, match="certificate of device pump-2"):
        await authority.prove_posture("pump-1", {"firmware": "3.0"}, signed(authority, other))
    with pytest.raises(UnauthorizedError, match="10 minutes"):
        await authority.prove_posture("pump-1", {"firmware": "3.0"},
                                      signed(authority, issued, at=clock.now - timedelta(minutes=11)))
    await authority.prove_posture("pump-1", {"firmware": "3.0"}, signed(authority, issued))
    with pytest.raises(UnauthorizedError, match="replayed"):   # older than the one accepted
        await authority.prove_posture("pump-1", {"firmware": "1.0"},
                                      signed(authority, issued, at=clock.now - timedelta(minutes=1)))
    with pytest.raises(BadRequestError):
        await authority.prove_posture("pump-1", {"firmware": 3}, signed(authority, issued))
    assert (await authority.registry.get("pump-1")).firmware == "3.0"


# -- superseded certificates: a clone cannot keep renewing ---------------------------------------------
async def test_an_older_certificate_is_refused_once_a_newer_one_was_used(authority):
    first, _ = await enrolled(authority)
    second, _ = await renew(authority, first, request_id="r-1")
    third, _ = await renew(authority, first)     # the second was never used: a lost answer, say
    assert third.serial != second.serial
    await authority.prove_posture("pump-1", {"firmware": "2.1.0"}, signed(authority, third))   # third used
    for old in (first, second):
        with pytest.raises(SupersededError, match="superseded"):
            await renew(authority, old)
    again, _ = await renew(authority, first, request_id="r-1")   # a retry of the same request id
    assert again.serial == second.serial                          # gets its first answer
    device = await authority.registry.get("pump-1")
    assert device.clone_suspected_at is not None
    async with authority.store.read() as tx:
        rows = await tx.audit_rows()
    suspected = [r for r in rows if r.action == "clone_suspected"]
    assert {int(r.serial, 16) for r in suspected} == {first.serial, second.serial}
    assert not verify_chain(rows)
    newest, _ = await renew(authority, third)
    assert newest.device_id == "pump-1"


async def test_device_edit_is_validated_and_audited(authority):
    await enrolled(authority, firmware="1.0.0")
    device = await authority.edit_device("pump-1", {"firmware": "2.0.0", "location": "Ward 3", "udi": ""},
                                         actor="operator:alice")
    assert device.firmware == "2.0.0" and device.location == "Ward 3"
    async with authority.store.read() as tx:
        edited = [r for r in await tx.audit_rows() if r.action == "device_edited"]
    assert len(edited) == 1 and edited[0].actor == "operator:alice"
    assert '"firmware":{"from":"1.0.0","to":"2.0.0"}' in edited[0].detail and "udi" not in edited[0].detail
    with pytest.raises(BadRequestError, match="criticality"):
        await authority.edit_device("pump-1", {"criticality": "extreme"}, actor="operator:alice")
    with pytest.raises(BadRequestError, match="nothing to change"):
        await authority.edit_device("pump-1", {"firmware": "2.0.0"}, actor="operator:alice")
    with pytest.raises(BadRequestError, match="cannot be empty"):
        await authority.edit_device("pump-1", {"owner": " "}, actor="operator:alice")
