"""One simulated device's life: online and offline windows, enrollment, renewal, posture, peer checks."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from ca.signer import generate_key
from ca.timefmt import from_rfc3339, utc_now

from .connectivity import Connectivity
from .device import Action, DeviceRecord, State, adopt, has_valid_certificate, next_action
from .est_client import ESTError, make_csr, ocsp_url
from .mqtt_client import DeviceMQTT, MQTTAnswerError, b64
from .persist import DeviceFolder
from .revocation import OCSPVerifyError, verified_status

if TYPE_CHECKING:
    from .fleet import Fleet

log = logging.getLogger(__name__)

STEP_S = 0.5          # how often an online device looks at its state
PEER_CHECK_P = 0.15   # chance per step of checking a ward peer's revocation status
UPGRADE_P = 0.01      # chance per step of a firmware upgrade
POSTURE_WAIT_S = 5.0  # how long an MQTT device waits for the answer to its signed posture
SERVER_KEYGEN_MODELS = ("imaging-ct",)


def bump(firmware: str) -> str:
    parts = firmware.split(".")
    return ".".join([str(int(parts[0]) + 1) if parts[0].isdigit() else "2", "0", "0"])


def posture_of(record: DeviceRecord) -> dict:
    return {"firmware": record.firmware, "model": record.model}


def cms_sign(content: bytes, cert: x509.Certificate, key) -> bytes:
    """CMS SignedData (RFC 5652) with `content` attached and a signingTime attribute: what
    `openssl cms -sign -binary -nodetach` makes; the MQTT contract's `simplereenroll` and `posture`."""
    return (pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(cert, key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))


class SimDevice:
    def __init__(self, record: DeviceRecord, folder: DeviceFolder, fleet: "Fleet", rng: random.Random,
                 connectivity: Connectivity, ward: list[str]) -> None:
        self.record = record
        self.folder = folder
        self.fleet = fleet
        self.rng = rng
        self.conn = connectivity
        self.ward = ward
        self.mqtt: DeviceMQTT | None = None
        self.online = False
        self._window_end = 0.0
        self._not_before = 0.0       # back-off after a refusal (monotonic time)
        self._upgrade_due = False    # a renewal was refused for posture: upgrade at the next step
        self.grace = fleet.grace_for(record)

    @property
    def stats(self):
        return self.fleet.stats

    def save(self) -> None:
        self.folder.save(self.record)

    # -- the life -------------------------------------------------------------------
    async def live(self, deadline: float) -> None:
        first = True
        while time.monotonic() < deadline:
            if not first:
                offline = min(self.conn.offline(), deadline - time.monotonic())
                self.stats.count("offline_windows")
                await asyncio.sleep(max(0.0, offline))
                if time.monotonic() >= deadline:
                    break
            first = False
            await self.online_until(min(time.monotonic() + self.conn.online(), deadline))

    async def online_until(self, end: float) -> None:
        self._window_end = end
        self.online = True
        self.fleet.online += 1
        try:
            if self.record.transport == "mqtt" and not await self._connect(end):
                return
            while time.monotonic() < end:
                await self.step()
                await self._wait_step(end)
        finally:
            self.online = False
            self.fleet.online -= 1
            if self.mqtt is not None:
                await self.mqtt.disconnect(graceful=self.rng.random() < 0.7)
                self.mqtt = None

    async def step(self) -> None:
        if self.mqtt is not None:
            await self._collect_answers()
            while not self.mqtt.notices.empty():
                notice = self.mqtt.notices.get_nowait()
                if notice.get("type") == "renew" and notice.get("serial") == self.record.serial:
                    self.record.renew_requested = True  # a notice about a replaced certificate is stale
                elif notice.get("type") == "revoked" and notice.get("serial") == self.record.serial:
                    self.record.state = State.REVOKED
                    self.save()
        before = self.record.state
        action = next_action(self.record, utc_now(), self.grace)
        if self.record.state is not before:
            self.save()  # expired or stranded: what the device concluded survives a restart
        if self.record.state is State.STRANDED:
            return
        if time.monotonic() < self._not_before:
            action = Action.NONE
        if action is Action.ENROLL and not self.record.pending:
            await self.fleet.limited(self.enroll())
        elif action is Action.RENEW and not self.record.pending:
            await self.fleet.limited(self.renew())
        if self._upgrade_due:
            self._upgrade_due = False
            await self.upgrade_firmware()   # proven before the renewal is tried again (after the back-off)
        if self.record.state is State.ENROLLED and self.rng.random() < PEER_CHECK_P:
            await self.check_peer()
        if self.record.state is State.ENROLLED and self.rng.random() < UPGRADE_P:
            await self.upgrade_firmware()

    async def _wait_step(self, end: float) -> None:
        await asyncio.sleep(max(0.0, min(STEP_S, end - time.monotonic())))

    # -- MQTT plumbing --------------------------------------------------------------
    async def _connect(self, end: float) -> bool:
        self.mqtt = DeviceMQTT(self.fleet.broker, self.record.device_id)
        for req_id in self.record.pending:  # answers that arrived while we were away come again
            self.mqtt.expect(req_id)
        try:
            # at least 5 s: a loaded broker or machine is slow to answer, not unreachable
            await self.mqtt.connect(timeout=max(5.0, end - time.monotonic()))
        except (asyncio.TimeoutError, OSError):
            self.stats.error("broker_unreachable")
            await self.mqtt.disconnect(graceful=False)
            self.mqtt = None
            return False
        # the plain report (shown as "reported" at the CA, it proves nothing), then the signed one
        await self.mqtt.report_posture(posture_of(self.record))
        await self.prove_posture()
        return True

    async def _collect_answers(self) -> None:
        for req_id, op in list(self.record.pending.items()):
            future = self.mqtt.expect(req_id)
            if not future.done():
                continue
            del self.record.pending[req_id]
            await self._mqtt_result(op, future.result(), started=None)
            await self.mqtt.ack(req_id)
            self.save()

    async def _mqtt_call(self, op: str, fields: dict) -> None:
        started = time.monotonic()
        req_id, future = await self.mqtt.request(op, fields)
        self.record.pending[req_id] = op
        self.save()
        queued_before = self.mqtt.queued
        try:
            # no longer than the online window lasts: the answer waits at the gateway otherwise
            timeout = max(0.5, min(20.0, self._window_end - time.monotonic()))
            answer = await asyncio.wait_for(asyncio.shield(future), timeout=timeout)
        except asyncio.TimeoutError:
            self.stats.count("queued" if self.mqtt.queued > queued_before else "waiting")
            return  # stays pending: the answer comes when the device is back
        finally:
            if self.mqtt.queued > queued_before:
                self.stats.count("queued_answers")
        del self.record.pending[req_id]
        await self._mqtt_result(op, answer, started)
        await self.mqtt.ack(req_id)
        self.save()

    async def _mqtt_result(self, op: str, answer: dict, started: float | None) -> None:
        try:
            result = DeviceMQTT.result(answer)
        except MQTTAnswerError as exc:
            self._refused(op, exc.code)
            if op == "simplereenroll":
                self.folder.discard_new()
            return
        cert = x509.load_der_x509_certificate(base64.b64decode(result["cert"]))
        if started is not None:
            self.stats.timed(f"mqtt_{op}", time.monotonic() - started)
        await self._accept(cert, renewed=op == "simplereenroll")

    # -- operations -----------------------------------------------------------------
    async def enroll(self) -> None:
        record = self.record
        if record.transport == "mqtt":
            key = generate_key("ec-p256")
            self.folder.write_key(key, new=True)
            csr = make_csr(key, record.device_id).public_bytes(serialization.Encoding.DER)
            await self._mqtt_call("simpleenroll", {"csr": b64(csr), "token": record.token})
            return
        started = time.monotonic()
        try:
            if record.model in SERVER_KEYGEN_MODELS:
                hint = make_csr(generate_key("ec-p256"), record.device_id)
                key_der, cert = await self.fleet.est.serverkeygen(record.device_id, record.token, hint)
                self.folder.write_key(serialization.load_der_private_key(key_der, None), new=True)
                op = "http_serverkeygen"
            else:
                key = generate_key("ec-p256")
                self.folder.write_key(key, new=True)
                cert = await self.fleet.est.simpleenroll(record.device_id, record.token,
                                                         make_csr(key, record.device_id))
                op = "http_simpleenroll"
        except ESTError as exc:
            self._refused("simpleenroll", exc.code, exc.retry_after)
            return
        except (OSError, asyncio.TimeoutError) as exc:
            self.stats.error("est_unreachable")
            log.debug("%s: %s", record.device_id, exc)
            return
        self.stats.timed(op, time.monotonic() - started)
        await self._accept(cert, renewed=False)

    async def renew(self) -> None:
        record = self.record
        expired = record.state is State.EXPIRED
        key = generate_key("ec-p256")
        self.folder.write_key(key, new=True)
        csr = make_csr(key, record.device_id)
        if record.transport == "mqtt":
            signed = cms_sign(csr.public_bytes(serialization.Encoding.DER), self.folder.load_cert(),
                              self.folder.load_key())
            self.stats.count("grace_attempts" if expired else "renew_attempts")
            await self._mqtt_call("simplereenroll", {"cms": b64(signed)})
            return
        started = time.monotonic()
        try:
            cert = await self.fleet.est.simplereenroll(self.folder.cert, self.folder.key, csr)
        except ESTError as exc:
            self.folder.discard_new()
            self._refused("simplereenroll", exc.code, exc.retry_after)
            return
        except (OSError, asyncio.TimeoutError):
            self.folder.discard_new()
            self.stats.error("est_unreachable")
            return
        self.stats.timed("http_simplereenroll", time.monotonic() - started)
        await self._accept(cert, renewed=True, grace=expired)

    async def _accept(self, cert: x509.Certificate, *, renewed: bool, grace: bool | None = None) -> None:
        """Keep the old pair until the new one has worked once, then switch."""
        record = self.record
        grace = record.state is State.EXPIRED if grace is None else grace
        self.folder.write_cert(cert, new=True)
        try:
            if record.transport == "http":
                # one real use, which also proves the new certificate: posture over mutual TLS with it
                await self.fleet.est.posture(self.folder.new_cert, self.folder.new_key, posture_of(record))
                self.stats.count("postures_proven")
            else:
                self._check_pair(cert)
        except Exception as exc:
            self.stats.error("new_certificate_unusable")
            log.info("%s: new certificate not usable, keeping the old one: %s", record.device_id, exc)
            self.folder.discard_new()
            return
        self.folder.promote()
        adopt(record, cert, utc_now())
        self.fleet.certificates[record.device_id] = cert
        self.stats.count("renewed" if renewed else "enrolled")
        if grace:
            self.stats.count("grace_renewals")
        self.save()

    def _check_pair(self, cert: x509.Certificate) -> None:
        issuer = self.fleet.issuer
        cert.verify_directly_issued_by(issuer)
        new_key = self.folder.load_key(new=True)
        if new_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise ValueError("certificate does not carry our new key")

    def _refused(self, op: str, code: str, retry_after: int | None = None) -> None:
        self.stats.error(code)
        self._not_before = time.monotonic() + (retry_after or 2.0)  # no hammering after a refusal
        record = self.record
        if code == "revoked":
            record.state = State.REVOKED
        elif code == "posture_noncompliant":
            self.stats.count("posture_refusals")
            self._upgrade_due = True
        elif code == "unauthorized" and op == "simplereenroll" and record.state is State.EXPIRED:
            record.state = State.STRANDED
        self.save()

    async def upgrade_firmware(self) -> None:
        """A firmware update, then proven with the current key: the CA's `min_firmware` gate reads
        only proven firmware (a signed `req/posture` over MQTT, `POST /iomt/v1/posture` over mutual TLS)."""
        self.record.firmware = bump(self.record.firmware)
        self.stats.count("firmware_upgrades")
        self.save()
        if self.mqtt is not None:
            await self.mqtt.report_posture(posture_of(self.record))
        await self.prove_posture()

    async def prove_posture(self) -> bool:
        """Send the posture signed with the current certificate and key; True once the CA accepted it.
        A device with no usable certificate proves nothing (its next certificate's first use will):
        it signs with a certificate valid now, or (to pass the renewal gate) one it knows has expired
        within the grace period."""
        record = self.record
        now = utc_now()
        in_grace = (record.state is State.EXPIRED and record.not_after is not None
                    and now <= from_rfc3339(record.not_after) + self.grace)
        if not (has_valid_certificate(record, now) or in_grace) or not self.folder.cert.exists():
            return False
        started = time.monotonic()
        try:
            if record.transport == "http":
                await self.fleet.est.posture(self.folder.cert, self.folder.key, posture_of(record))
            elif self.mqtt is not None:
                await self._mqtt_posture()
            else:
                return False
        except (MQTTAnswerError, ESTError) as exc:
            self.stats.error(exc.code)
            if exc.code == "revoked":
                record.state = State.REVOKED  # decommissioned or revoked: nothing to renew
                self.save()
            return False
        except asyncio.TimeoutError:
            self.stats.count("posture_unanswered")   # the CA away: the next connect signs a fresh one
            return False
        except Exception as exc:   # the transport failed (connection lost, refused...): try again later
            self.stats.error("est_unreachable" if record.transport == "http" else "posture_failed")
            log.info("%s: posture not delivered: %s %s", record.device_id, type(exc).__name__, exc)
            return False
        self.stats.timed(f"{record.transport}_posture", time.monotonic() - started)
        self.stats.count("postures_proven")
        return True

    async def _mqtt_posture(self) -> None:
        """The signed `req/posture`; its answer is published once, so it is not kept pending."""
        signed = cms_sign(json.dumps(posture_of(self.record)).encode(), self.folder.load_cert(),
                          self.folder.load_key())
        req_id, future = await self.mqtt.request("posture", {"cms": b64(signed)})
        try:
            timeout = max(0.5, min(POSTURE_WAIT_S, self._window_end - time.monotonic()))
            DeviceMQTT.result(await asyncio.wait_for(asyncio.shield(future), timeout))
        finally:
            self.mqtt.forget(req_id)

    async def check_peer(self) -> None:
        now = utc_now()
        peers = [p for p in self.ward if p != self.record.device_id and p in self.fleet.certificates
                 and self.fleet.certificates[p].not_valid_after_utc > now]  # nobody checks an expired one
        if not peers:
            return
        peer = self.rng.choice(peers)
        cert = self.fleet.certificates[peer]
        started = time.monotonic()
        try:
            if self.mqtt is not None:
                resp = await self.mqtt.ocsp(format(cert.serial_number, "x"), timeout=3)
                op = "mqtt_ocsp"
            else:
                resp = await self.fleet.est.ocsp(ocsp_url(cert), cert, self.fleet.issuer)
                op = "http_ocsp"
            status = verified_status(resp, self.fleet.issuer, cert.serial_number)
        except (asyncio.TimeoutError, OSError, ESTError, OCSPVerifyError, ValueError) as exc:
            self.stats.error("ocsp_check_failed")
            log.debug("%s: OCSP check of %s failed: %s", self.record.device_id, peer, exc)
            return
        self.stats.timed(op, time.monotonic() - started)
        self.stats.count("ocsp_checks")
        if status == "revoked":
            self.stats.count("revocations_seen")
            self.fleet.revoked_seen.add(peer)
