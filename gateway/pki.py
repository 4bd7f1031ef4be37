"""Revocation publications (retained, for everyone) and renewal notices (to each device).

- `iomt/v1/pki/ocsp/{serial}`: the signed OCSP response of every unexpired certificate,
  re-published at half its validity and within a second of a status change;
  cleared when the certificate expires.
- `iomt/v1/pki/crl`: the current CRL (DER), after each change and at half its validity.
- `iomt/v1/pki/events`: one JSON event per revocation, hold or release.
- `iomt/v1/dev/{id}/notify`: `renew` once a certificate passes its renewal point,
  `revoked` / `hold` / `released` when its status changes.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp as x509_ocsp

from common.errors import CAError
from common.timefmt import Clock, from_rfc3339, to_rfc3339, utc_now

from .config import GatewayConfig
from .durable import Durable
from .mqtt import MQTTLink
from .ra_client import RAClient
from .supervise import backoff
from .topics import Topics

log = logging.getLogger(__name__)

LONG_POLL_S = 25
# A sweep fetches OCSP responses in batches (one request per BATCH serials, a few in flight): one
# request per certificate made a start-up sweep over 100,000 certificates take about two minutes
SWEEP_BATCH = 250
SWEEP_CONCURRENCY = 4
EVENT_TYPES = {"revoked": "revoked", "hold": "hold", "good": "released"}
# What a misbehaving CA gives the loops below: a refusal or an outage (CAError: RemoteError,
# CAUnreachableError, ...) or an answer of the wrong shape (not JSON, truncated DER, missing keys).
# Each is logged at WARNING and retried after a backoff; what was published stays published.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError)
RA_ERRORS = (CAError, *MALFORMED)
BACKOFF_CAP_S = 30.0


class GarbageError(ValueError):
    """An answer of the CA that the gateway will not publish: it does not parse or does not verify."""


def _refresh_at(this_update: datetime, next_update: datetime | None) -> datetime | None:
    return None if next_update is None else this_update + (next_update - this_update) / 2


def _describe(exc: BaseException) -> str:
    code = f"{exc.code}: " if isinstance(exc, CAError) and getattr(exc, "code", None) else ""
    return f"{type(exc).__name__} {code}{exc}"[:300]


def check_crl(der: bytes, issuer: x509.Certificate | None) -> x509.CertificateRevocationList:
    """The CRL in `der` if it parses and, with the issuing CA at hand, names it and is signed by it."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise GarbageError(f"CRL does not parse ({len(der)} bytes): {exc}") from None
    if issuer is not None:
        if crl.issuer != issuer.subject:
            raise GarbageError(f"CRL issuer {crl.issuer.rfc4514_string()} is not the issuing CA")
        try:
            valid = crl.is_signature_valid(issuer.public_key())
        except Exception as exc:   # an algorithm or key type cryptography cannot check
            raise GarbageError(f"CRL signature cannot be checked: {exc}") from None
        if not valid:
            raise GarbageError("CRL signature does not verify with the issuing CA's key")
    return crl


def check_ocsp(der: bytes, serial: str, issuer: x509.Certificate | None = None) -> x509_ocsp.OCSPResponse:
    """The OCSP response in `der` if it parses, is `successful`, is about `serial` (hex) and, with
    the issuing CA at hand, is signed by it or by a responder it authorised (RFC 6960 4.2.2.2:
    a certificate it issued with the OCSPSigning key purpose, carried in the response)."""
    try:
        resp = x509_ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise GarbageError(f"OCSP response for {serial} does not parse ({len(der)} bytes): {exc}") from None
    if resp.response_status != x509_ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise GarbageError(f"OCSP response for {serial} is {resp.response_status.name}")
    if resp.serial_number != int(serial, 16):
        raise GarbageError(f"OCSP response for {serial} is about {resp.serial_number:x}")
    # a responder the CA authorised is the usual signer (iomtca init makes one): tried first
    if issuer is not None:
        keys = [key for c in resp.certificates if (key := _authorised_key(c, issuer)) is not None]
        if not any(_signed_by(key, resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm)
                   for key in [*keys, _key(issuer)]):
            raise GarbageError(f"OCSP response for {serial} is not signed by the issuing CA or a responder it authorised")
    return resp


@functools.lru_cache(maxsize=16)   # certificates compare by their bytes: the same responder, checked once
def _authorised_key(cert: x509.Certificate, issuer: x509.Certificate):
    """The responder's public key if `issuer` issued `cert` for OCSP signing, else None. The key
    object is kept too: verifying with a key loaded afresh costs about 50 us more per response."""
    try:
        cert.verify_directly_issued_by(issuer)
        purposes = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except Exception:   # not issued by it, or no key purposes
        return None
    return cert.public_key() if x509.ExtendedKeyUsageOID.OCSP_SIGNING in purposes else None


@functools.lru_cache(maxsize=4)
def _key(cert: x509.Certificate):
    return cert.public_key()


def _signed_by(key, signature: bytes, data: bytes, algorithm) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, data)
        else:
            return False
    except Exception:   # InvalidSignature, or an algorithm that does not fit the key
        return False
    return True


def check_changes(data) -> tuple[list[dict], int]:
    """(changes, new cursor) of a status-change answer; KeyError/TypeError/ValueError if malformed."""
    changes, last = data["changes"], data["last"]
    if not isinstance(changes, list) or not isinstance(last, int) or isinstance(last, bool):
        raise TypeError(f"status changes of the wrong shape: {str(data)[:200]}")
    for change in changes:
        if not isinstance(change, dict) or not isinstance(change["serial"], str):
            raise TypeError(f"status change of the wrong shape: {str(change)[:200]}")
        int(change["serial"], 16)
        for key in ("status", "device_id", "reason", "at"):
            change[key]
    return changes, last


def check_page(page) -> list[dict]:
    """A page of the certificate list: a list of objects, each with a hex `serial`."""
    if not isinstance(page, list):
        raise TypeError(f"certificate list of the wrong shape: {str(page)[:200]}")
    for cert in page:
        if not isinstance(cert, dict) or not isinstance(cert.get("serial"), str):
            raise TypeError(f"certificate entry of the wrong shape: {str(cert)[:200]}")
        int(cert["serial"], 16)
    return page


class PKIPublisher:
    def __init__(self, config: GatewayConfig, link: MQTTLink, ra: RAClient, durable: Durable,
                 clock: Clock = utc_now, *, issuer: x509.Certificate | None = None,
                 broker_control=None) -> None:
        self._config = config
        self._topics = Topics(config.topic_root)
        self._link = link
        self._ra = ra
        self._db = durable
        self._clock = clock
        self._issuer = issuer     # the issuing CA: what is published must be signed by it (or its responder)
        self._ocsp_due: dict[str, datetime | None] = {}   # serial -> when to re-publish
        self._crl_due: datetime | None = None
        self._crl_stale = False   # a CRL publication failed: try again (follower and sweep), with backoff
        self._crl_failures = 0
        self._crl_retry_at = 0.0  # loop time before which a stale CRL is not asked for again
        self._crl_published = False
        self.published_changes = 0
        self._broker_control = broker_control   # gateway.broker_control.BrokerControl, or None (off)

    async def run(self) -> None:
        # a TaskGroup, not gather: if one loop dies the other is cancelled too, so a restart by
        # the supervisor never leaves two copies running
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow(), name="pki-follow")
            tasks.create_task(self._sweep_forever(), name="pki-sweep")

    def _backoff(self, failures: int) -> float:
        """retry_every doubling per failure in a row, capped at 30 s, with jitter."""
        return backoff(failures, self._config.retry_every.total_seconds(), BACKOFF_CAP_S)

    async def _pause(self, what: str, exc: BaseException, failures: int) -> None:
        delay = self._backoff(failures)
        log.warning("%s failed (%s); retrying in %.1f s (failure %d in a row)",
                    what, _describe(exc), delay, failures)
        await asyncio.sleep(delay)

    # -- status changes, within a second -------------------------------------------
    async def _follow(self) -> None:
        cursor = await self._db.cursor("status", default=-1)
        failures = 0
        while cursor < 0:
            # first run: the sweep publishes every current status; history is not replayed as events
            try:
                cursor = await self._skip_history()
            except RA_ERRORS as exc:
                failures += 1
                await self._pause("skipping the status-change history", exc, failures)
        failures = 0
        while True:
            if self._crl_stale:
                await self._try_publish_crl(retry=True)
            try:
                changes, last = check_changes(await self._ra.status_changes(cursor, LONG_POLL_S))
                if changes:
                    # on any failure here the same cursor is used next time: nothing is skipped
                    await self._apply(changes)
                    cursor = last
                    await self._db.set_cursor("status", cursor)
                failures = 0
            except RA_ERRORS as exc:
                failures += 1
                await self._pause(f"following status changes after={cursor}", exc, failures)
            except Exception:   # our bug, or the disk: logged with its traceback, retried
                failures += 1
                delay = self._backoff(failures)
                log.exception("following status changes after=%d failed; retrying in %.1f s", cursor, delay)
                await asyncio.sleep(delay)

    async def _skip_history(self) -> int:
        cursor = 0
        while True:
            changes, last = check_changes(await self._ra.status_changes(cursor, 0))
            if not changes:
                await self._db.set_cursor("status", cursor)
                return cursor
            cursor = last

    async def _apply(self, changes: list[dict]) -> None:
        if self._broker_control is not None:
            self._broker_control.apply(changes)   # first, and it only queues: the broker drops a revoked device at once
        for change in changes:
            serial = change["serial"]
            await self._publish_ocsp(serial)
            kind = EVENT_TYPES.get(change["status"], change["status"])
            event = {"type": kind, "serial": serial, "device_id": change["device_id"],
                     "reason": change["reason"], "at": change["at"] or to_rfc3339(self._clock())}
            await self._link.publish(self._topics.events, json.dumps(event).encode(), wait=False)
            if change["device_id"]:
                await self._link.publish(self._topics.notify(change["device_id"]),
                                         json.dumps({"type": kind, "serial": serial, "reason": change["reason"]}
                                                    ).encode(), wait=False)
            self.published_changes += 1
        # the events are out: a CRL that cannot be had now is retried (follower and sweep), the
        # changes are not applied twice for it
        await self._try_publish_crl()
        log.info("published %d status change(s)", len(changes))

    async def certificate_issued(self, serial: str, der: bytes | None = None) -> None:
        """A certificate this gateway just handed out: its OCSP response goes up now, not at the next
        sweep. `der`: the response the CA sent with the certificate (RA batch), checked against the
        issuer like any other before it is published; without it (or if it does not check), asked for."""
        if serial in self._ocsp_due:
            return
        try:
            if der is not None:
                try:
                    await self._publish_response(serial, der)
                    return
                except GarbageError as exc:
                    log.warning("OCSP response sent with %s not published (%s); asking the CA", serial, exc)
            await self._publish_ocsp(serial)
        except Exception as exc:  # the sweep will catch up
            log.info("OCSP publication of %s deferred: %s", serial, _describe(exc))

    async def _publish_ocsp(self, serial: str) -> None:
        await self._publish_response(serial, await self._ra.ocsp(serial))

    async def _publish_response(self, serial: str, der: bytes) -> None:
        resp = check_ocsp(der, serial, self._issuer)   # never a garbage retained response: raises GarbageError
        await self._link.publish(self._topics.ocsp(serial), der, retain=True, wait=False)
        self._ocsp_due[serial] = _refresh_at(resp.this_update_utc, resp.next_update_utc)

    async def _publish_crl(self) -> None:
        der = await self._ra.crl()
        crl = check_crl(der, self._issuer)   # never a garbage retained CRL: raises GarbageError
        await self._link.publish(self._topics.crl, der, retain=True, wait=False)
        self._crl_due = _refresh_at(crl.last_update_utc, crl.next_update_utc)
        self._crl_stale, self._crl_failures, self._crl_published = False, 0, True

    async def _try_publish_crl(self, *, retry: bool = False) -> bool:
        """Publish the current CRL; on failure keep the one published and say so (False).
        The follower's retries (`retry`) wait for a backoff; the sweep asks at its own pace."""
        loop = asyncio.get_running_loop()
        if retry and loop.time() < self._crl_retry_at:
            return False
        try:
            await self._publish_crl()
            return True
        except RA_ERRORS as exc:
            self._crl_stale = True
            self._crl_failures += 1
            delay = self._backoff(self._crl_failures)
            self._crl_retry_at = loop.time() + delay
            log.warning("CRL publication failed (%s); %s; follower retries in %.1f s (failure %d in a row)", _describe(exc),
                        "the previous CRL stays published" if self._crl_published else "none published yet",
                        delay, self._crl_failures)
            return False

    # -- the sweep: every certificate, renew notices, refreshes --------------------
    async def _sweep_forever(self) -> None:
        failures = 0
        every = self._config.sweep_every.total_seconds()
        while True:
            try:
                await self.sweep()
                failures, delay = 0, every
            except RA_ERRORS as exc:
                failures += 1
                delay = min(self._backoff(failures), every)
                log.warning("sweep failed (%s); next one in %.1f s (failure %d in a row)",
                            _describe(exc), delay, failures)
            except Exception:   # our bug, or the disk: logged with its traceback, retried
                failures += 1
                delay = min(self._backoff(failures), every)
                log.exception("sweep failed; next one in %.1f s", delay)
            await asyncio.sleep(delay)

    async def sweep(self) -> None:
        now = self._clock()
        if self._crl_stale or self._crl_due is None or now >= self._crl_due:
            # each sweep asks for a stale CRL again (the sweep's own pace is its backoff); one
            # the CA cannot give now does not stop the rest of the sweep
            await self._try_publish_crl()
        seen, after = set(), ""
        while True:
            page = check_page(await self._ra.certificates(after=after))
            due_now = []
            for cert in page:
                serial = cert["serial"]
                seen.add(serial)
                due = self._ocsp_due.get(serial, now)
                if serial not in self._ocsp_due or (due is not None and now >= due):
                    due_now.append(serial)
            await self._publish_many(due_now)
            for cert in page:
                try:
                    await self._maybe_notify_renew(cert, now)
                except MALFORMED as exc:   # one odd entry does not hold back the others' notices
                    log.warning("no renew notice for serial=%s: entry of the wrong shape (%s)",
                                cert["serial"], _describe(exc))
            if len(page) < 1000:
                break
            after = page[-1]["serial"]
        for serial in [s for s in self._ocsp_due if s not in seen]:
            # expired: clear the retained message (an empty retained payload deletes it)
            await self._link.publish(self._topics.ocsp(serial), b"", retain=True, wait=False)
            del self._ocsp_due[serial]

    async def _publish_many(self, serials: list[str]) -> None:
        """Publish these serials' OCSP responses, fetched in batches with a few CA requests in
        flight; the first failure is raised once the others have finished (what was published
        stays published). A single response that does not check is skipped (and logged): its
        serial stays due, so the next sweep asks again."""
        pending = iter([serials[i:i + SWEEP_BATCH] for i in range(0, len(serials), SWEEP_BATCH)])
        errors: list[BaseException] = []

        async def worker() -> None:
            for batch in pending:
                if errors:
                    return
                try:
                    answers = await self._ra.ocsp_many(batch)
                    if not isinstance(answers, dict):
                        raise TypeError(f"OCSP batch answer of the wrong shape: {str(answers)[:200]}")
                    for serial in batch:
                        if serial not in answers:
                            continue
                        try:
                            await self._publish_response(serial, answers[serial])
                        except GarbageError as exc:
                            log.warning("OCSP response not published: %s", exc)
                except Exception as exc:
                    errors.append(exc)
                    return

        await asyncio.gather(*(worker() for _ in range(min(SWEEP_CONCURRENCY, len(serials)))))
        if errors:
            raise errors[0]

    async def _maybe_notify_renew(self, cert: dict, now: datetime) -> None:
        if cert["status"] != "good":
            return
        # from issuance, not notBefore: notBefore is backdated for clock skew
        start, end = from_rfc3339(cert.get("issued_at") or cert["not_before"]), from_rfc3339(cert["not_after"])
        fraction = self._config.renew_at_high if cert["criticality"] == "high" else self._config.renew_at
        if now >= start + (end - start) * fraction and await self._db.note_once(cert["serial"], "renew", now):
            notice = {"type": "renew", "serial": cert["serial"], "not_after": cert["not_after"]}
            await self._link.publish(self._topics.notify(cert["device_id"]), json.dumps(notice).encode(), wait=False)
