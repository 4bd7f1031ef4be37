"""`Authority`: the one path through which every certificate is issued or revoked.

Both edges (the EST server and, through the RA API, the MQTT gateway) and the
admin CLI call these methods. Each runs: policy, then serial, then build and
sign, then persist with its audit entry in one transaction, then return; so a
certificate handed out is always in the database first.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from cryptography import x509

from . import approvals, attendance, failures, idevid, proof, status
from . import metrics, policy
from .audit_chain import ChainMonitor
from .codec import cert_der
from .config import CAConfig, CAPaths, load_config
from .credentials import (CertificateAuth, Credential, IDevIDAuth, OperatorAuth, SignedRequestAuth, TokenAuth,
                          actor, operator)
from .errors import (BadRequestError, CAError, NotAcceptedError, NotFoundError, PendingApprovalError,
                     PolicyViolationError, RateLimitedError, SupersededError, TokenExpiredError, TokenUsedError,
                     UnauthorizedError, UnknownDeviceError)
from .issuance import IssuerContext, build_certificate, issue_device_certificate, new_serial, proven_key
from .keystore import load_cert, load_private_key, read_passphrase
from .model import (AuditEvent, CertRecord, CertStatus, Device, DeviceStatus, Issued, RevocationReason,
                    serial_hex)
from .ocsp_signer import OCSPResponder
from .publication import CA_PROFILES, Publication
from .operators import Operators
from .registry import Registry, edited_fields, find_token, token_digest
from .signer import KeySigner
from .store import Store, Tx
from .store.sqlite import SQLiteStore
from .timefmt import Clock, utc_now

log = logging.getLogger(__name__)

__all__ = ["Authority", "TokenAuth", "OperatorAuth", "CertificateAuth", "SignedRequestAuth", "IDevIDAuth",
           "operator"]

SERIAL_ATTEMPTS = 4
REQUEST_ID_WINDOW = timedelta(hours=24)
class Authority(Publication):
    def __init__(self, *, config: CAConfig, paths: CAPaths, store: Store, issuer: IssuerContext,
                 passphrase: bytes, clock: Clock = utc_now,
                 serial_source: Callable[[], int] = new_serial) -> None:
        self.config = config
        self.paths = paths
        self.store = store
        self.issuer = issuer
        self.registry = Registry(store, token_ttl=config.token_ttl, clock=clock)
        # operator accounts (console, admin API); their logins share the failure limits below
        self.operators = Operators(store, clock, limits=lambda: self.failure_limits)
        self.audit_chain = ChainMonitor(store, clock)   # what the console shows of the audit chain
        self.key_passphrase = passphrase  # decrypts service keys it writes (OCSP responder)
        self._clock = clock
        self._serial = serial_source
        self._responder: OCSPResponder | None = None
        self._responder_lock = asyncio.Lock()
        # Failed token logins per (device, source) and per source and window before they wait (RFC
        # 7030 3.2.3 leaves this to us): [enroll] device_source_failures and source_failures, set
        # by the server (ca/failures.py)
        self.failure_limits = failures.Limits()

    @classmethod
    async def open(cls, home: Path, *, clock: Clock = utc_now, serial_source: Callable[[], int] = new_serial,
                   passphrase: bytes | None = None) -> "Authority":
        paths = CAPaths(Path(home))
        config = load_config(paths)
        if passphrase is None:
            passphrase = read_passphrase(config.passphrase_file)
        issuing_cert = load_cert(paths.issuing_cert)
        issuer = IssuerContext(
            certificate=issuing_cert,
            signer=KeySigner(load_private_key(paths.issuing_key, passphrase)),
            chain=(issuing_cert, load_cert(paths.root_cert)),
            crl_url=config.crl_url, ocsp_url=config.ocsp_url, ca_issuers_url=config.ca_issuers_url,
        )
        store = await SQLiteStore.open(config.database)
        return cls(config=config, paths=paths, store=store, issuer=issuer, passphrase=passphrase,
                   clock=clock, serial_source=serial_source)

    async def close(self) -> None:
        await self.store.close()

    async def __aenter__(self) -> "Authority":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- issuance ---------------------------------------------------------

    async def _fresh_serial(self, tx: Tx) -> int:
        for _ in range(SERIAL_ATTEMPTS):
            serial = self._serial()
            if serial > 0 and not await tx.serial_exists(serial):
                return serial
        raise CAError("could not draw an unused serial number; the serial source is broken")

    async def enroll(self, device_id: str, csr: x509.CertificateSigningRequest, credential: Credential,
                     *, profile: str = "device", request_id: str | None = None,
                     approval_csr: x509.CertificateSigningRequest | None = None) -> Issued:
        """First enrollment: a token, an IDevID or an operator vouches for `csr`.

        `request_id` (from a relay such as the MQTT gateway) makes the call idempotent: the same
        (device, request id) again returns the certificate it produced the first time.
        `approval_csr` (serverkeygen, RFC 7030 4.4): the client's own request CSR, whose proven key
        an approval binds, because the key in `csr` is made anew by the server on every attempt.
        """
        if isinstance(credential, CertificateAuth):
            return await self.renew(device_id, csr, credential, request_id=request_id)
        now = self._clock()
        who = actor(credential, device_id)
        self.config.profile(profile)  # an unknown profile fails before anything is read or written
        try:
            # outside the write lock: other issuances commit meanwhile
            key = proven_key(csr)
            bound = key if approval_csr is None else proven_key(approval_csr)   # what an approval names
            async with self.store.write() as tx:
                if (earlier := await self._earlier_result(tx, device_id, request_id)) is not None:
                    return earlier
                token = None
                if isinstance(credential, TokenAuth):
                    # anonymous until the token matches: nothing about the device is told before
                    device, token = await self._token_login(tx, device_id, credential, now)
                else:
                    device = await self._device(tx, device_id)
                policy.device_active(device)
                if isinstance(credential, IDevIDAuth):
                    idevid.check(device, credential)
                if not isinstance(credential, OperatorAuth):
                    await self._approval(tx, csr, key, bound, device, profile)
                issued = await self._issue(tx, csr, device, profile, now, who, "certificate_issued", key=key)
                if request_id is not None:
                    await tx.record_request_result(device_id, request_id, issued.serial, now)
                if token is not None:
                    await tx.mark_token_used(token.id, now)
                if not isinstance(credential, OperatorAuth):
                    await tx.record_proven_contact(device_id, now)   # the device itself was here
                await tx.clear_approval(device_id)   # an approval is used once (ca/approvals.py)
        except PendingApprovalError:
            await self._record_pending(device_id, bound, credential, now, who)
            raise
        except CAError as exc:
            await self._refused(now, who, device_id, credential, exc)
            raise
        return issued

    async def precheck(self, device_id: str, credential: Credential) -> None:
        """Check a first-enrollment credential without using it up (before costly work such as
        server-side key generation). `enroll` checks again, in its transaction."""
        if isinstance(credential, (CertificateAuth, OperatorAuth)):
            return
        now = self._clock()
        who = actor(credential, device_id)
        try:
            async with self.store.read() as tx:
                if isinstance(credential, TokenAuth):
                    device, _ = await self._token_login(tx, device_id, credential, now)
                else:
                    device = await self._device(tx, device_id)
                policy.device_active(device)
                if isinstance(credential, IDevIDAuth):
                    idevid.check(device, credential)
        except CAError as exc:
            await self._refused(now, who, device_id, credential, exc)
            raise

    async def renew(self, device_id: str | None, csr: x509.CertificateSigningRequest,
                    credential: CertificateAuth, *, request_id: str | None = None) -> Issued:
        """Re-enrollment authenticated by the device's current certificate (key rotation allowed).

        `device_id` is the device the request claims to be (the MQTT topic) or None (EST, where
        the certificate alone names the device). The certificate may have expired less than the
        renewal grace period ago; a revoked, held or superseded one is refused. A proven renewal
        counts as attendance even when it is refused for another reason (posture, key policy).
        """
        now = self._clock()
        cert = credential.certificate
        who = f"device:{device_id or 'unknown'}"
        known = device_id  # the device named by the request, or by the certificate once found
        proven = None
        try:
            if isinstance(credential, SignedRequestAuth):
                policy.signed_recently(credential.signing_time, now)
            key = proven_key(csr)  # outside the write lock: other issuances commit meanwhile
            async with self.store.write() as tx:
                if device_id and (earlier := await self._earlier_result(tx, device_id, request_id)) is not None:
                    return earlier
                if known is None and (named := await proof.named_device(tx, cert)) is not None:
                    known, who = named, f"device:{named}"
                proven = await proof.prove(tx, self.config, self.issuer.certificate, cert, device_id, now)
                device = proven.device
                known, who = device.id, f"device:{device.id}"
                device, released = await proof.count_contact(tx, self.config, proven, now)
                record = proven.record
                policy.posture_ok(device, self.config.min_firmware_for(device))
                if proven.absent_hold and record.serial not in released:
                    policy.not_revoked(record)  # still on its non-attendance hold: release_on_return is off
                issued = await self._issue(tx, csr, device, record.profile, now, who, "certificate_renewed",
                                           renews=record.serial, key=key)
                if request_id is not None:
                    await tx.record_request_result(device.id, request_id, issued.serial, now)
        except SupersededError as exc:
            await self._clone_suspected(now, who, exc)
            raise
        except CAError as exc:
            await self._audit_refusal(now, who, known or "unknown", exc, action="renew_refused",
                                      contact=proven)
            raise
        return issued

    async def prove_posture(self, device_id: str | None, posture: dict, credential: CertificateAuth,
                            *, request_id: str | None = None) -> tuple[Device, list[int]]:
        """A posture the device proves with its current certificate (a CMS-signed `req/posture`, or
        mutual TLS on `POST /iomt/v1/posture`): the firmware it names becomes the firmware the
        renewal gate reads, and the contact counts as attendance (which may lift a non-attendance
        hold). Returns the device as updated and the serials released."""
        now = self._clock()
        who = f"device:{device_id or 'unknown'}"
        known = device_id
        try:
            firmware = policy.posture_firmware(posture)
            signed_at = None
            if isinstance(credential, SignedRequestAuth):
                policy.signed_recently(credential.signing_time, now)
                signed_at = credential.signing_time
            async with self.store.write() as tx:
                if known is None and (named := await proof.named_device(tx, credential.certificate)) is not None:
                    known, who = named, f"device:{named}"
                proven = await proof.prove(tx, self.config, self.issuer.certificate, credential.certificate,
                                           device_id, now)
                device = proven.device
                known, who = device.id, f"device:{device.id}"
                if signed_at is not None and device.posture_signed_at is not None \
                        and signed_at < device.posture_signed_at:
                    raise UnauthorizedError(
                        f"posture signed at {signed_at.isoformat()} is older than the last one accepted for "
                        f"device {device.id} ({device.posture_signed_at.isoformat()}): replayed")
                if firmware is not None:
                    await tx.set_firmware(device.id, firmware, signed_at)
                    if firmware != device.firmware:
                        await tx.append_audit(AuditEvent("firmware_changed", who, device_id=device.id,
                                                         serial=proven.record.serial,
                                                         detail={"from": device.firmware, "to": firmware,
                                                                 "proof": _proof_name(credential)}), now)
                updated, released = await proof.count_contact(tx, self.config, proven, now)
        except SupersededError as exc:
            await self._clone_suspected(now, who, exc)
            raise
        except CAError as exc:
            await self._audit_refusal(now, who, known or "unknown", exc, action="posture_refused")
            raise
        log.info("posture proven device=%s firmware=%s released=%d request=%s", updated.id, updated.firmware,
                 len(released), request_id)
        return updated, released

    async def _clone_suspected(self, now: datetime, who: str, exc: SupersededError) -> None:
        async with self.store.write() as tx:
            await tx.flag_clone(exc.device_id, now)
            await tx.append_audit(AuditEvent("clone_suspected", who, device_id=exc.device_id, serial=exc.serial,
                                             detail={"newer": serial_hex(exc.newer), "reason": exc.message}), now)
        log.warning("clone suspected device=%s serial=%s newer=%s", exc.device_id, serial_hex(exc.serial),
                    serial_hex(exc.newer))

    async def _earlier_result(self, tx: Tx, device_id: str, request_id: str | None) -> Issued | None:
        if request_id is None:
            return None
        # the MQTT contract's window: a request id repeated within 24 hours is the same request
        serial = await tx.request_result(device_id, request_id, self._clock() - REQUEST_ID_WINDOW)
        if serial is None:
            return None
        record = await tx.get_certificate(serial)
        log.info("repeated request device=%s request=%s: same certificate %s", device_id, request_id,
                 serial_hex(serial))
        return Issued(x509.load_der_x509_certificate(record.der), self.issuer.chain, device_id, record.profile,
                      new=False)

    async def device_for_idevid(self, credential: IDevIDAuth) -> str:
        """The registered device an IDevID names: its subject serialNumber is the device's serial number."""
        async with self.store.read() as tx:
            candidates = await tx.devices_with_serial(idevid.serial_of(credential.certificate))
        return idevid.device_for(candidates, credential)

    async def _device(self, tx: Tx, device_id: str) -> Device:
        device = await tx.get_device(device_id)
        if device is None:
            raise UnknownDeviceError(f"device {device_id} is not registered")
        return device

    async def _token_login(self, tx: Tx, device_id: str, credential: TokenAuth, now: datetime):
        """(device, token row) a one-time token logs in. Until the token matches, an unknown id and
        a wrong token are one NotAcceptedError; a locked (device, source) or source is 429."""
        await failures.check(tx, failures.keys(device_id, credential.source), now, self.failure_limits)
        device = await tx.get_device(device_id)
        if device is None:
            token_digest(credential.secret)   # about the work of a wrong token: no timing tell
            raise NotAcceptedError(f"device {device_id} is not registered")
        try:
            token = await find_token(tx, device_id, credential.secret, now)
        except (TokenUsedError, TokenExpiredError):
            raise   # the caller holds the device's real token: it may hear what became of it
        except UnauthorizedError as exc:
            raise NotAcceptedError(exc.message) from None
        return device, token

    async def _refused(self, now: datetime, who: str, device_id: str, credential, exc: CAError) -> None:
        """A refused enrollment: audited, except an anonymous one (a token that did not match, an
        unknown id, a locked source), which is counted (ca/failures.py) and audited per source
        and window by `audit_anonymous_failures`."""
        if isinstance(credential, TokenAuth) and isinstance(exc, (NotAcceptedError, RateLimitedError)):
            await failures.refused(self.store, failures.keys(device_id, credential.source), now, exc, "enrollment")
            return
        await self._audit_refusal(now, who, device_id, exc)

    async def audit_anonymous_failures(self) -> int:
        """One audit entry per source and ended window of failed anonymous logins (ca/failures.py)."""
        async with self.store.write() as tx:
            return await failures.audit_windows(tx, self._clock())

    async def _approval(self, tx: Tx, csr: x509.CertificateSigningRequest, key, bound, device: Device,
                        profile: str) -> None:
        """First enrollments of configured device classes wait for `iomtca device approve` of the
        key `bound` (ca/approvals.py). A CSR the CA would refuse anyway is refused now, not put
        before an engineer; recorded by _record_pending, as this transaction rolls back."""
        if not self.config.approval.required(device):
            return
        policy.key_allowed(key, self.config.profile(profile))
        policy.csr_names_this_device(csr, device, self.config.trust_domain)
        await approvals.check(tx, device.id, bound)

    async def _record_pending(self, device_id: str, key, credential: Credential, now: datetime, who: str) -> None:
        source = credential.source if isinstance(credential, (TokenAuth, IDevIDAuth)) else None
        async with self.store.write() as tx:
            await approvals.record(tx, device_id, key, source, now, who)

    async def _issue(self, tx: Tx, csr: x509.CertificateSigningRequest, device: Device, profile: str,
                     now: datetime, who: str, action: str, renews: int | None = None, key=None) -> Issued:
        prof = self.config.profile(profile)
        serial = await self._fresh_serial(tx)
        cert = await self._signing(
            self.issuer.signer, issue_device_certificate, csr, device, prof, self.issuer, trust_domain=self.config.trust_domain,
            serial=serial, now=now, lifetime=self.config.device_lifetime(device, prof.name), checked_key=key)
        await self._persist(tx, cert, device.id, prof.name, now, who, action,
                            extra={"renews": serial_hex(renews)} if renews else None)
        tx.on_commit(metrics.ISSUED.labels(metrics.EDGE.get(),
                                           "renewal" if action == "certificate_renewed" else "enrollment").inc)
        log.info("%s device=%s serial=%s profile=%s", action, device.id, serial_hex(serial), prof.name)
        return Issued(cert, self.issuer.chain, device.id, prof.name)

    @staticmethod
    async def _signing(signer, fn, *args, **kwargs):
        """Run a build-and-sign with `signer`: in a thread for a slow (RSA) key, which must not stall
        the loop; inline otherwise, where the hop to a thread would cost more than the signature."""
        if signer.slow:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def _persist(self, tx: Tx, cert: x509.Certificate, device_id: str | None, profile: str,
                       now: datetime, actor: str, action: str, extra: dict | None = None) -> None:
        await tx.insert_certificate(CertRecord(
            serial=cert.serial_number, device_id=device_id, profile=profile,
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
            der=cert_der(cert), created_at=now))
        await tx.append_audit(AuditEvent(action, actor, device_id=device_id, serial=cert.serial_number,
                                         detail={"profile": profile, **(extra or {}),
                                                 "not_after": cert.not_valid_after_utc.isoformat()}), now)

    async def _audit_refusal(self, now: datetime, actor: str, device_id: str, exc: CAError,
                             action: str = "enroll_refused", contact: proof.Proven | None = None) -> None:
        async with self.store.write() as tx:
            if contact is not None:  # the device proved itself before the refusal: it was here
                await proof.count_contact(tx, self.config, contact, now)
            await tx.append_audit(AuditEvent(action, actor, device_id=device_id,
                                             detail={"code": exc.code, "reason": exc.message}), now)
        log.warning("enroll refused device=%s code=%s reason=%s", device_id, exc.code, exc.message)

    async def issue_service(self, public_key, profile: str, subject: x509.Name,
                            sans: list[x509.GeneralName], *, actor: str, tx: Tx | None = None) -> Issued:
        """Issue an infrastructure certificate (server, gateway/RA, OCSP responder). Inside `tx`
        when given (the caller's checks and records commit with the certificate), else its own."""
        if tx is None:
            async with self.store.write() as tx:
                return await self.issue_service(public_key, profile, subject, sans, actor=actor, tx=tx)
        now = self._clock()
        prof = self.config.profile(profile)
        serial = await self._fresh_serial(tx)
        cert = await self._signing(self.issuer.signer, build_certificate, public_key=public_key,
                                   subject=subject, sans=sans,
                                   profile=prof, issuer=self.issuer, serial=serial, now=now)
        await self._persist(tx, cert, None, prof.name, now, actor, "certificate_issued")
        log.info("issued service certificate profile=%s serial=%s", prof.name, serial_hex(serial))
        return Issued(cert, self.issuer.chain, None, prof.name)

    async def record_ca_certificate(self, cert: x509.Certificate, profile: str, *, actor: str) -> None:
        """Record a CA certificate made at init (root, issuing CA) so every certificate is on file."""
        now = self._clock()
        async with self.store.write() as tx:
            if not await tx.serial_exists(cert.serial_number):
                await self._persist(tx, cert, None, profile, now, actor, "ca_certificate_created")

    # -- revocation -------------------------------------------------------

    async def revoke(self, serial: int, reason: RevocationReason, *, actor: str) -> CertRecord:
        """Revoke (or, with certificateHold, suspend) one certificate."""
        if reason is RevocationReason.removeFromCRL:
            raise BadRequestError("removeFromCRL is not a revocation reason; release the hold instead")
        now = self._clock()
        async with self.store.write() as tx:
            record = await self._certificate(tx, serial)
            if record.profile in CA_PROFILES:
                # RFC 5280 5.1: this CA's CRL lists only what the issuing CA issued.
                raise PolicyViolationError(
                    f"certificate {serial_hex(serial)} is the {record.profile} certificate; CA certificates "
                    "are revoked by replacing the CA (iomtca init), not on the issuing CA's CRL")
            await status.revoke(tx, record, reason, now)
            await tx.append_audit(AuditEvent("certificate_revoked", actor, device_id=record.device_id,
                                             serial=serial, detail={"reason": reason.name}), now)
            updated = await tx.get_certificate(serial)
        log.info("revoked serial=%s reason=%s", serial_hex(serial), reason.name)
        return updated

    async def hold(self, serial: int, *, actor: str) -> CertRecord:
        return await self.revoke(serial, RevocationReason.certificateHold, actor=actor)

    async def release(self, serial: int, *, actor: str) -> CertRecord:
        """Lift a certificateHold (RFC 5280 5.3.1): the certificate is good again."""
        now = self._clock()
        async with self.store.write() as tx:
            record = await self._certificate(tx, serial)
            await status.release(tx, record, now)
            await tx.append_audit(AuditEvent("certificate_released", actor, device_id=record.device_id,
                                             serial=serial), now)
            updated = await tx.get_certificate(serial)
        log.info("released serial=%s", serial_hex(serial))
        return updated

    async def decommission(self, device_id: str, *, actor: str) -> list[int]:
        """Retire a device: revoke its live certificates (cessationOfOperation), burn its tokens."""
        now = self._clock()
        revoked = []
        async with self.store.write() as tx:
            device = await tx.get_device(device_id)
            if device is None:
                raise UnknownDeviceError(f"device {device_id} is not registered")
            if device.status is DeviceStatus.DECOMMISSIONED:
                raise PolicyViolationError(f"device {device_id} is already decommissioned")
            for record in await tx.list_certificates(device_id):
                if record.status is not CertStatus.REVOKED and record.not_after > now:
                    await status.revoke(tx, record, RevocationReason.cessationOfOperation, now)
                    revoked.append(record.serial)
            burned = await tx.burn_tokens(device_id, now)
            await tx.clear_approval(device_id)
            await tx.set_device_status(device_id, DeviceStatus.DECOMMISSIONED)
            await tx.append_audit(AuditEvent(
                "device_decommissioned", actor, device_id=device_id,
                detail={"revoked": [serial_hex(s) for s in revoked], "tokens_burned": burned}), now)
        log.info("decommissioned device=%s revoked=%d", device_id, len(revoked))
        return revoked

    async def approve(self, device_id: str, fingerprint: str | None = None, *,
                      actor: str) -> approvals.ApprovalRequest:
        """Let the first enrollment of a device with one waiting key through: the key with this
        fingerprint (hex, any case, colons allowed), or, without one, the only key waiting."""
        now = self._clock()
        async with self.store.write() as tx:
            device = await self._device(tx, device_id)
            policy.device_active(device)
            return await approvals.approve(tx, device_id, fingerprint, now, actor)

    async def reject_approval(self, device_id: str, fingerprint: str | None = None, *,
                              actor: str) -> list[approvals.ApprovalRequest]:
        """Drop a device's waiting requests (all, or the one of this key)."""
        now = self._clock()
        async with self.store.write() as tx:
            await self._device(tx, device_id)
            return await approvals.reject(tx, device_id, fingerprint, now, actor)

    async def pending_approvals(self, device_id: str | None = None) -> list[approvals.ApprovalRequest]:
        async with self.store.read() as tx:
            return await tx.pending_approvals(device_id)

    async def record_presence(self, device_id: str, *, online: bool) -> None:
        """An unsigned presence message (MQTT): kept as "reported online/offline", shown as
        unverified. It changes no trust: no attendance, no hold lifted, no audit entry."""
        async with self.store.write() as tx:
            if not await tx.record_reported(device_id, self._clock(), online=online):
                raise UnknownDeviceError(f"device {device_id} is not registered")
        log.debug("reported presence device=%s online=%s", device_id, online)

    async def record_reported_posture(self, device_id: str, posture: dict) -> None:
        """An unsigned posture message (MQTT): kept as "reported firmware", shown as unverified.
        The firmware the renewal gate reads changes only by a proven posture or an operator."""
        firmware = policy.posture_firmware(posture)
        async with self.store.write() as tx:
            if not await tx.record_reported(device_id, self._clock(), firmware=firmware):
                raise UnknownDeviceError(f"device {device_id} is not registered")

    async def enforce_attendance(self) -> attendance.AttendanceReport:
        """Hold the certificates of devices away longer than their non-attendance period."""
        now = self._clock()
        async with self.store.write() as tx:
            report = await attendance.hold_absent(tx, self.config, now)
        if report.held or report.flagged:
            log.warning("attendance: %s", attendance.describe(report))
        return report

    async def edit_device(self, device_id: str, changes: dict[str, str], *, actor: str) -> Device:
        """An operator corrects a device's registry entry (firmware, location, owner...). Values are
        validated as at registration; the audit entry lists each field's old and new value."""
        now = self._clock()
        async with self.store.write() as tx:
            device = await self._device(tx, device_id)
            fields = edited_fields(device, changes)
            if not fields:
                raise BadRequestError("nothing to change: give at least one field with a new value")
            await tx.update_device(device_id, fields)
            await tx.append_audit(AuditEvent(
                "device_edited", actor, device_id=device_id,
                detail={name: {"from": getattr(device, name), "to": value} for name, value in fields.items()}), now)
            return await tx.get_device(device_id)

    async def status_changes(self, after_id: int) -> list[tuple[int, int]]:
        """(change id, serial) of revocations, holds and releases after `after_id`, oldest first."""
        async with self.store.read() as tx:
            return await tx.status_changes_after(after_id)

    async def last_status_change(self) -> int:
        async with self.store.read() as tx:
            return await tx.last_status_change()

    async def _certificate(self, tx: Tx, serial: int) -> CertRecord:
        record = await tx.get_certificate(serial)
        if record is None:
            raise NotFoundError(f"no certificate with serial {serial_hex(serial)}")
        return record

    def now(self) -> datetime:
        return self._clock()

    # -- records ----------------------------------------------------------

    async def certificates(self, device_id: str | None = None) -> list[CertRecord]:
        async with self.store.read() as tx:
            return await tx.list_certificates(device_id)

    async def unexpired_certificates(self, after: str = "", limit: int = 1000) -> list[tuple[CertRecord, str]]:
        """One page of unexpired device certificates; pass the last serial_hex as `after` for the next."""
        async with self.store.read() as tx:
            return await tx.unexpired_certificates(self._clock(), after, limit)

    async def certificate(self, serial: int) -> CertRecord:
        async with self.store.read() as tx:
            return await self._certificate(tx, serial)

    async def devices(self) -> list[Device]:
        return await self.registry.list()


def _proof_name(credential: CertificateAuth) -> str:
    return "cms" if isinstance(credential, SignedRequestAuth) else "mtls"
