"""`Authority`: the one path through which every certificate is issued or revoked.

Both edges (the EST server and, through the RA API, the MQTT gateway) and the
admin CLI call these methods. Each runs: policy, then serial, then build and
sign, then persist with its audit entry in one transaction, then return; so a
certificate handed out is always in the database first.
"""
from __future__ import annotations

import getpass
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp

from . import crl as crl_mod
from . import policy
from . import ocsp as ocsp_mod
from .codec import cert_der
from .config import CAConfig, CAPaths, load_config
from .errors import BadRequestError, CAError, NotFoundError, PolicyViolationError, UnknownDeviceError
from .issuance import IssuerContext, build_certificate, issue_device_certificate, new_serial
from .keystore import load_cert, load_private_key, read_passphrase
from .model import (AuditEvent, CertRecord, CertStatus, Device, DeviceStatus, Issued, RevocationReason,
                    serial_hex)
from .ocsp_signer import OCSPResponder, load_or_rotate_responder
from .registry import Registry, check_token
from .signer import KeySigner
from .store import Store, Tx
from .store.sqlite import SQLiteStore
from .timefmt import Clock, utc_now

log = logging.getLogger(__name__)

SERIAL_ATTEMPTS = 4
# Recorded for completeness, but not issued by the issuing CA: no OCSP or CRL status here.
CA_PROFILES = ("root-ca", "issuing-ca")


@dataclass(frozen=True)
class TokenAuth:
    """The device proves itself with its one-time enrollment token."""

    secret: str


@dataclass(frozen=True)
class OperatorAuth:
    """An engineer at the admin CLI vouches for the CSR (manual onboarding)."""

    name: str


Credential = TokenAuth | OperatorAuth


def operator() -> OperatorAuth:
    try:
        return OperatorAuth(getpass.getuser())
    except Exception:  # no passwd entry in some containers
        return OperatorAuth("unknown")


def _actor(credential: Credential, device_id: str) -> str:
    return f"operator:{credential.name}" if isinstance(credential, OperatorAuth) else f"device:{device_id}"


class Authority:
    def __init__(self, *, config: CAConfig, paths: CAPaths, store: Store, issuer: IssuerContext,
                 passphrase: bytes, clock: Clock = utc_now,
                 serial_source: Callable[[], int] = new_serial) -> None:
        self.config = config
        self.paths = paths
        self.store = store
        self.issuer = issuer
        self.registry = Registry(store, token_ttl=config.token_ttl, clock=clock)
        self.key_passphrase = passphrase  # decrypts service keys it writes (OCSP responder)
        self._clock = clock
        self._serial = serial_source
        self._responder: OCSPResponder | None = None

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
                     *, profile: str = "device") -> Issued:
        """Issue a device certificate for `csr` if the device and its credential allow it."""
        now = self._clock()
        actor = _actor(credential, device_id)
        prof = self.config.profile(profile)
        try:
            async with self.store.write() as tx:
                device = await tx.get_device(device_id)
                if device is None:
                    raise UnknownDeviceError(f"device {device_id} is not registered")
                policy.device_active(device)  # before the token: a retired device hears so plainly
                if isinstance(credential, TokenAuth):
                    await check_token(tx, device_id, credential.secret, now)
                serial = await self._fresh_serial(tx)
                cert = issue_device_certificate(
                    csr, device, prof, self.issuer, trust_domain=self.config.trust_domain, serial=serial,
                    now=now, lifetime=self.config.device_lifetime(device.model) if profile == "device" else None)
                await self._persist(tx, cert, device_id, prof.name, now, actor, "certificate_issued")
        except CAError as exc:
            await self._audit_refusal(now, actor, device_id, exc)
            raise
        log.info("issued device=%s serial=%s profile=%s", device_id, serial_hex(serial), prof.name)
        return Issued(cert, self.issuer.chain, device_id, prof.name)

    async def _persist(self, tx: Tx, cert: x509.Certificate, device_id: str | None, profile: str,
                       now: datetime, actor: str, action: str) -> None:
        await tx.insert_certificate(CertRecord(
            serial=cert.serial_number, device_id=device_id, profile=profile,
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
            der=cert_der(cert), created_at=now))
        await tx.append_audit(AuditEvent(action, actor, device_id=device_id, serial=cert.serial_number,
                                         detail={"profile": profile,
                                                 "not_after": cert.not_valid_after_utc.isoformat()}), now)

    async def _audit_refusal(self, now: datetime, actor: str, device_id: str, exc: CAError) -> None:
        async with self.store.write() as tx:
            await tx.append_audit(AuditEvent("enroll_refused", actor, device_id=device_id,
                                             detail={"code": exc.code, "reason": exc.message}), now)
        log.warning("enroll refused device=%s code=%s reason=%s", device_id, exc.code, exc.message)

    async def issue_service(self, public_key, profile: str, subject: x509.Name,
                            sans: list[x509.GeneralName], *, actor: str) -> Issued:
        """Issue an infrastructure certificate (server, gateway/RA, OCSP responder)."""
        now = self._clock()
        prof = self.config.profile(profile)
        async with self.store.write() as tx:
            serial = await self._fresh_serial(tx)
            cert = build_certificate(public_key=public_key, subject=subject, sans=sans, profile=prof,
                                     issuer=self.issuer, serial=serial, now=now)
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
            if record.status is CertStatus.REVOKED:
                raise PolicyViolationError(f"certificate {serial_hex(serial)} is already revoked")
            if record.status is CertStatus.HOLD and reason is RevocationReason.certificateHold:
                raise PolicyViolationError(f"certificate {serial_hex(serial)} is already on hold")
            await tx.revoke(serial, reason, now)
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
            if record.status is not CertStatus.HOLD:
                raise PolicyViolationError(
                    f"certificate {serial_hex(serial)} is {record.status.value}, not on hold; only a hold can be released")
            await tx.release(serial, now)
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
                    await tx.revoke(record.serial, RevocationReason.cessationOfOperation, now)
                    revoked.append(record.serial)
            burned = await tx.burn_tokens(device_id, now)
            await tx.set_device_status(device_id, DeviceStatus.DECOMMISSIONED)
            await tx.append_audit(AuditEvent(
                "device_decommissioned", actor, device_id=device_id,
                detail={"revoked": [serial_hex(s) for s in revoked], "tokens_burned": burned}), now)
        log.info("decommissioned device=%s revoked=%d", device_id, len(revoked))
        return revoked

    async def _certificate(self, tx: Tx, serial: int) -> CertRecord:
        record = await tx.get_certificate(serial)
        if record is None:
            raise NotFoundError(f"no certificate with serial {serial_hex(serial)}")
        return record

    # -- publication: CRL and OCSP -----------------------------------------

    async def crl(self) -> bytes:
        """A freshly signed CRL (DER) with the next CRL number."""
        now = self._clock()
        async with self.store.write() as tx:
            number = await tx.next_crl_number()
            entries = await tx.active_revocations(now)
        return crl_mod.build_crl(
            issuer_cert=self.issuer.certificate, signer=self.issuer.signer, entries=entries, number=number,
            this_update=now, next_update=now + self.config.crl_next_update)

    async def responder(self) -> OCSPResponder:
        """The delegated OCSP responder, rotated once 2/3 of its lifetime has passed."""
        now = self._clock()
        if self._responder is None or self._responder.needs_rotation(now):
            self._responder = await load_or_rotate_responder(self, now)
        return self._responder

    async def ocsp_answer(self, serial: int) -> ocsp_mod.OCSPAnswer:
        async with self.store.read() as tx:
            record = await tx.get_certificate(serial)
        if record is None or record.profile in CA_PROFILES:
            return ocsp_mod.OCSPAnswer(None)
        reason = record.reason if record.status is not CertStatus.GOOD else None
        return ocsp_mod.OCSPAnswer(record.status, record.revoked_at, reason)

    async def ocsp_response(self, serial: int, *, nonce: bytes | None = None, hash_algorithm=None) -> bytes:
        """A signed OCSP response for one serial of this CA (what the gateway publishes)."""
        now = self._clock()
        responder = await self.responder()
        answer = await self.ocsp_answer(serial)
        return ocsp_mod.build_response(
            serial=serial, answer=answer, issuer_cert=self.issuer.certificate,
            responder_cert=responder.certificate, responder_signer=responder.signer,
            this_update=now, next_update=now + self.config.ocsp_validity,
            hash_algorithm=hash_algorithm, nonce=nonce)

    async def ocsp(self, request_der: bytes) -> bytes:
        """Answer a DER OCSP request; protocol errors become OCSP error responses (RFC 6960 2.3)."""
        try:
            query = ocsp_mod.parse_request(request_der)
        except BadRequestError as exc:
            log.info("malformed OCSP request: %s", exc)
            return ocsp_mod.error_response(x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        if not ocsp_mod.is_for_issuer(query, self.issuer.certificate):
            return ocsp_mod.error_response(x509_ocsp.OCSPResponseStatus.UNAUTHORIZED)
        return await self.ocsp_response(query.serial, nonce=query.nonce, hash_algorithm=query.hash_algorithm)

    # -- records ----------------------------------------------------------

    async def certificates(self, device_id: str | None = None) -> list[CertRecord]:
        async with self.store.read() as tx:
            return await tx.list_certificates(device_id)

    async def certificate(self, serial: int) -> CertRecord:
        async with self.store.read() as tx:
            return await self._certificate(tx, serial)

    async def devices(self) -> list[Device]:
        return await self.registry.list()
