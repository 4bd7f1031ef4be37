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
import json
import logging
from datetime import datetime

from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp

from ca.timefmt import Clock, from_rfc3339, to_rfc3339, utc_now

from .config import GatewayConfig
from .durable import Durable
from .mqtt import MQTTLink
from .ra_client import CAUnreachableError, RAClient
from .topics import Topics

log = logging.getLogger(__name__)

LONG_POLL_S = 25
# A sweep fetches OCSP responses in batches (one request per BATCH serials, a few in flight): one
# request per certificate made a start-up sweep over 100,000 certificates take about two minutes
SWEEP_BATCH = 250
SWEEP_CONCURRENCY = 4
EVENT_TYPES = {"revoked": "revoked", "hold": "hold", "good": "released"}


def _refresh_at(this_update: datetime, next_update: datetime | None) -> datetime | None:
    return None if next_update is None else this_update + (next_update - this_update) / 2


class PKIPublisher:
    def __init__(self, config: GatewayConfig, link: MQTTLink, ra: RAClient, durable: Durable,
                 clock: Clock = utc_now) -> None:
        self._config = config
        self._topics = Topics(config.topic_root)
        self._link = link
        self._ra = ra
        self._db = durable
        self._clock = clock
        self._ocsp_due: dict[str, datetime | None] = {}   # serial -> when to re-publish
        self._crl_due: datetime | None = None
        self.published_changes = 0

    async def run(self) -> None:
        await asyncio.gather(self._follow(), self._sweep_forever())

    # -- status changes, within a second -------------------------------------------
    async def _follow(self) -> None:
        cursor = await self._db.cursor("status", default=-1)
        while cursor < 0:
            # first run: the sweep publishes every current status; history is not replayed as events
            try:
                cursor = await self._skip_history()
            except CAUnreachableError:
                await asyncio.sleep(self._config.retry_every.total_seconds())
        while True:
            try:
                data = await self._ra.status_changes(cursor, LONG_POLL_S)
            except CAUnreachableError:
                await asyncio.sleep(self._config.retry_every.total_seconds())
                continue
            except Exception:
                log.exception("status-change poll failed")
                await asyncio.sleep(self._config.retry_every.total_seconds())
                continue
            if data["changes"]:
                try:
                    await self._apply(data["changes"])
                except CAUnreachableError:
                    continue  # same cursor next time: nothing is skipped
                cursor = data["last"]
                await self._db.set_cursor("status", cursor)

    async def _skip_history(self) -> int:
        cursor = 0
        while True:
            data = await self._ra.status_changes(cursor, 0)
            if not data["changes"]:
                await self._db.set_cursor("status", cursor)
                return cursor
            cursor = data["last"]

    async def _apply(self, changes: list[dict]) -> None:
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
        await self._publish_crl()
        log.info("published %d status change(s)", len(changes))

    async def certificate_issued(self, serial: str) -> None:
        """A certificate this gateway just handed out: its OCSP response goes up now, not at the next sweep."""
        if serial not in self._ocsp_due:
            try:
                await self._publish_ocsp(serial)
            except Exception as exc:  # the sweep will catch up
                log.info("OCSP publication of %s deferred: %s", serial, exc)

    async def _publish_ocsp(self, serial: str) -> None:
        await self._publish_response(serial, await self._ra.ocsp(serial))

    async def _publish_response(self, serial: str, der: bytes) -> None:
        await self._link.publish(self._topics.ocsp(serial), der, retain=True, wait=False)
        try:
            resp = x509_ocsp.load_der_ocsp_response(der)
            self._ocsp_due[serial] = _refresh_at(resp.this_update_utc, resp.next_update_utc)
        except ValueError:
            self._ocsp_due[serial] = None

    async def _publish_crl(self) -> None:
        der = await self._ra.crl()
        await self._link.publish(self._topics.crl, der, retain=True, wait=False)
        crl = x509.load_der_x509_crl(der)
        self._crl_due = _refresh_at(crl.last_update_utc, crl.next_update_utc)

    # -- the sweep: every certificate, renew notices, refreshes --------------------
    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except CAUnreachableError as exc:
                log.info("sweep postponed: %s", exc)
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(self._config.sweep_every.total_seconds())

    async def sweep(self) -> None:
        now = self._clock()
        if self._crl_due is None or now >= self._crl_due:
            await self._publish_crl()
        seen, after = set(), ""
        while True:
            page = await self._ra.certificates(after=after)
            due_now = []
            for cert in page:
                serial = cert["serial"]
                seen.add(serial)
                due = self._ocsp_due.get(serial, now)
                if serial not in self._ocsp_due or (due is not None and now >= due):
                    due_now.append(serial)
            await self._publish_many(due_now)
            for cert in page:
                await self._maybe_notify_renew(cert, now)
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
        stays published)."""
        pending = iter([serials[i:i + SWEEP_BATCH] for i in range(0, len(serials), SWEEP_BATCH)])
        errors: list[BaseException] = []

        async def worker() -> None:
            for batch in pending:
                if errors:
                    return
                try:
                    for serial, der in (await self._ra.ocsp_many(batch)).items():
                        await self._publish_response(serial, der)
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
