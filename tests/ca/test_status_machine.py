"""A stateful property test of certificate status on a real store: hypothesis interleaves issue,
hold, release, revoke, decommission, attendance checks, presence, posture (reported and proven)
and renewal, and after every step checks that revoked stays revoked, that every change was an
allowed transition, that OCSP and the CRL say what the store says, and that the audit chain
verifies."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule

from ca import status
from ca.audit import verify_chain
from ca.authority import Authority, TokenAuth
from ca.bootstrap import init_ca
from ca.config import ModelPolicy
from ca.credentials import CertificateAuth, SignedRequestAuth
from ca.errors import CAError
from ca.model import CertStatus, DeviceStatus, RevocationReason
from ca.registry import new_device
from tests.conftest import FakeClock, make_csr

R = RevocationReason
FINAL_REASONS = [R.keyCompromise, R.superseded, R.cessationOfOperation, R.unspecified, R.affiliationChanged]
OCSP_STATUS = {x509_ocsp.OCSPCertStatus.GOOD: CertStatus.GOOD, x509_ocsp.OCSPCertStatus.REVOKED: None}
_TEMPLATE: list[Path] = []


def template() -> Path:
    if not _TEMPLATE:
        home = Path(tempfile.mkdtemp(prefix="status-machine-")) / "ca"
        asyncio.run(init_ca(home, trust_domain="hospital.test", clock=FakeClock()))
        _TEMPLATE.append(home)
    return _TEMPLATE[0]


def _crl_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


class CertificateLifecycle(RuleBasedStateMachine):
    devices = Bundle("devices")
    certs = Bundle("certs")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.work = Path(tempfile.mkdtemp(prefix="status-run-"))
        shutil.copytree(template(), self.work / "ca")
        self.clock = FakeClock()
        self.authority = self.run(Authority.open(self.work / "ca", clock=self.clock))
        self.authority.config = replace(self.authority.config, models={"pump": ModelPolicy(
            non_attendance=timedelta(hours=1), min_firmware="2.0.0")})
        self.issued: dict[int, object] = {}          # serial -> Issued
        self.final: dict[int, RevocationReason] = {}  # serial -> the reason it was first seen revoked with
        self.seen: dict[int, CertStatus] = {}        # serial -> status after the previous step
        self.retired: set[str] = set()
        self.count = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def attempt(self, coro):
        """Run an operation the rules allow to be refused; a refusal must leave the state as it was
        (the invariants check that)."""
        try:
            return self.run(coro)
        except CAError:
            return None

    def teardown(self) -> None:
        self.run(self.authority.close())
        self.loop.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- rules -------------------------------------------------------------------------------
    @rule(target=devices, firmware=st.sampled_from(["1.0.0", "2.1.0"]))
    def add_device(self, firmware):
        self.count += 1
        device_id = f"pump-{self.count}"
        self.run(self.authority.registry.add(new_device(device_id, model="pump", owner="icu", firmware=firmware),
                                             actor="test"))
        return device_id

    @rule(target=certs, device=devices)
    def enroll(self, device):
        token = self.attempt(self.authority.registry.new_token(device, actor="test"))
        if token is None:
            assert device in self.retired
            return multiple()
        issued = self.run(self.authority.enroll(device, make_csr()[0], TokenAuth(token.secret)))
        self.issued[issued.serial] = issued
        return issued.serial

    @rule(target=certs, serial=certs, signed=st.booleans())
    def renew(self, serial, signed):
        old = self.issued[serial]
        cred = (SignedRequestAuth(old.certificate, signing_time=self.clock.now) if signed
                else CertificateAuth(old.certificate))
        before = self.run(self.authority.certificate(serial))
        issued = self.attempt(self.authority.renew(old.device_id if signed else None, make_csr()[0], cred))
        if issued is None:
            return multiple()
        assert old.device_id not in self.retired, "a decommissioned device renewed"
        assert before.status is not CertStatus.REVOKED, "a revoked certificate renewed"
        self.issued[issued.serial] = issued
        return issued.serial

    @rule(serial=certs)
    def hold(self, serial):
        self.attempt(self.authority.hold(serial, actor="operator:t"))

    @rule(serial=certs)
    def release(self, serial):
        before = self.run(self.authority.certificate(serial)).status
        after = self.attempt(self.authority.release(serial, actor="operator:t"))
        assert after is None or before is CertStatus.HOLD, f"released from {before}"

    @rule(serial=certs, reason=st.sampled_from(FINAL_REASONS))
    def revoke(self, serial, reason):
        before = self.run(self.authority.certificate(serial))
        after = self.attempt(self.authority.revoke(serial, reason, actor="operator:t"))
        if before.status is CertStatus.REVOKED:
            assert after is None, "revoked twice"
        else:
            assert after is not None and after.status is CertStatus.REVOKED and after.reason is reason

    @rule(device=devices)
    def decommission(self, device):
        if self.attempt(self.authority.decommission(device, actor="operator:t")) is not None:
            self.retired.add(device)

    @rule()
    def attendance_check(self):
        self.run(self.authority.enforce_attendance())

    @rule(minutes=st.integers(min_value=1, max_value=150))
    def time_passes(self, minutes):
        self.clock.advance(minutes=minutes)

    @rule(device=devices, online=st.booleans())
    def presence(self, device, online):
        before = self.statuses()
        self.run(self.authority.record_presence(device, online=online))
        assert self.statuses() == before, "an unsigned presence changed a status"

    @rule(device=devices, firmware=st.sampled_from(["1.0.0", "2.1.0", "9.9.9"]))
    def reported_posture(self, device, firmware):
        before = self.statuses(), self.run(self.authority.registry.get(device)).firmware
        self.run(self.authority.record_reported_posture(device, {"firmware": firmware}))
        after = self.statuses(), self.run(self.authority.registry.get(device)).firmware
        assert after == before, "an unsigned posture changed trust"

    @rule(serial=certs, firmware=st.sampled_from(["1.0.0", "2.1.0"]), signed=st.booleans())
    def proven_posture(self, serial, firmware, signed):
        issued = self.issued[serial]
        cred = (SignedRequestAuth(issued.certificate, signing_time=self.clock.now) if signed
                else CertificateAuth(issued.certificate))
        before = self.run(self.authority.certificate(serial)).status
        result = self.attempt(self.authority.prove_posture(None, {"firmware": firmware}, cred))
        if result is not None:
            assert before is not CertStatus.REVOKED and issued.device_id not in self.retired

    # -- invariants ----------------------------------------------------------------------------
    def statuses(self) -> dict[int, CertStatus]:
        return {r.serial: r.status for r in self.run(self.authority.certificates()) if r.serial in self.issued}

    @invariant()
    def revoked_stays_revoked_and_changes_follow_the_table(self):
        for record in self.run(self.authority.certificates()):
            if record.serial not in self.issued:
                continue
            previous = self.seen.get(record.serial, CertStatus.GOOD)
            assert record.status is previous or status.allowed(previous, record.status), \
                f"{previous.value} -> {record.status.value}"
            if record.serial in self.final:
                assert record.status is CertStatus.REVOKED and record.reason is self.final[record.serial]
            elif record.status is CertStatus.REVOKED:
                self.final[record.serial] = record.reason
            self.seen[record.serial] = record.status

    @invariant()
    def decommissioned_devices_stay_retired(self):
        now = self.clock.now
        for device in self.retired:
            assert self.run(self.authority.registry.get(device)).status is DeviceStatus.DECOMMISSIONED
            for record in self.run(self.authority.certificates(device)):
                if record.not_after > now:
                    assert record.status is CertStatus.REVOKED, "a retired device holds a live certificate"

    @invariant()
    def ocsp_and_crl_agree_with_the_store(self):
        if not self.issued:
            return
        now = self.clock.now
        crl = x509.load_der_x509_crl(self.run(self.authority.crl()))
        listed = {e.serial_number: _crl_reason(e) for e in crl}
        expected = {}
        for record in self.run(self.authority.certificates()):
            if record.serial not in self.issued:
                continue
            resp = x509_ocsp.load_der_ocsp_response(self.run(self.authority.ocsp_response(record.serial)))
            if record.status is CertStatus.GOOD:
                assert resp.certificate_status is x509_ocsp.OCSPCertStatus.GOOD
            else:
                assert resp.certificate_status is x509_ocsp.OCSPCertStatus.REVOKED
                # RFC 5280 5.3.1: unspecified is said by leaving the reason out
                flag = None if record.reason is R.unspecified else record.reason.flag
                assert resp.revocation_reason is flag
                if record.not_after > now:
                    expected[record.serial] = flag
        assert listed == expected

    @invariant()
    def the_audit_chain_verifies(self):
        async def rows():
            async with self.authority.store.read() as tx:
                return await tx.audit_rows()
        assert verify_chain(self.run(rows())) == []


CertificateLifecycle.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_certificate_lifecycle = CertificateLifecycle.TestCase
