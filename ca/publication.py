"""What the CA publishes about its certificates: signed CRLs and OCSP responses.

A part of `Authority` (it inherits these methods), apart because issuance and publication are
separate concerns: nothing here issues or changes a status; it reads statuses and signs them.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from cryptography import x509
from cryptography.x509 import ocsp as x509_ocsp

from . import metrics
from . import crl as crl_mod
from . import ocsp as ocsp_mod
from .errors import BadRequestError
from .model import CertStatus
from .ocsp_signer import OCSPResponder, load_or_rotate_responder

log = logging.getLogger("ca.authority")

# Recorded for completeness, but not issued by the issuing CA: no OCSP or CRL status here.
CA_PROFILES = ("root-ca", "issuing-ca")


class Publication:
    """CRL and OCSP signing for `Authority`, over its store, clock, issuer, config and responder."""

    async def crl(self) -> bytes:
        """A freshly signed CRL (DER) with the next CRL number, kept as the latest."""
        now = self._clock()
        async with self.store.write() as tx:
            number = await tx.next_crl_number()
            covers = await tx.last_status_change()
        # read after the number is taken: a higher number never lists an older state
        async with self.store.read() as tx:
            entries = await tx.crl_entries(now)
        der = await asyncio.to_thread(
            crl_mod.build_crl, issuer_cert=self.issuer.certificate, signer=self.issuer.signer, entries=entries,
            number=number, this_update=now, next_update=now + self.config.crl_next_update)
        async with self.store.write() as tx:
            await tx.store_crl(der, number, covers)
            tx.on_commit(metrics.CRLS.inc)
        return der

    async def current_crl(self, *, refresh_at: float = 0.5) -> bytes:
        """The CRL to publish: the latest one signed, by this process or another serving the same
        CA, while it covers every status change and is younger than `refresh_at` of its validity;
        otherwise a new one. Several server workers so publish one series whose numbers only rise."""
        async with self.store.read() as tx:
            latest = await tx.latest_crl()
            last_change = await tx.last_status_change()
        if latest is not None:
            der, _, covers = latest
            crl = x509.load_der_x509_crl(der)
            this_update, next_update = crl.last_update_utc, crl.next_update_utc
            if covers >= last_change and self._clock() < this_update + (next_update - this_update) * refresh_at:
                return der
        await self.crl()
        async with self.store.read() as tx:
            return (await tx.latest_crl())[0]  # the highest number, ours or a faster process's

    async def responder(self) -> OCSPResponder:
        """The delegated OCSP responder, rotated once 2/3 of its lifetime has passed."""
        now = self._clock()
        if self._responder is None or self._responder.needs_rotation(now):
            async with self._responder_lock:  # one coroutine loads or rotates, the others wait for it
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
        return (await self.ocsp_signed(serial, nonce=nonce, hash_algorithm=hash_algorithm))[0]

    async def ocsp_signed(self, serial: int, *, nonce: bytes | None = None, hash_algorithm=None,
                          answer: ocsp_mod.OCSPAnswer | None = None) -> tuple[bytes, datetime, datetime]:
        """(DER, thisUpdate, nextUpdate) of a signed OCSP response. `answer`: the status already in
        hand (a certificate just issued is good); else read from the store."""
        now = self._clock().replace(microsecond=0)   # the response carries whole seconds
        next_update = (now + self.config.ocsp_validity).replace(microsecond=0)
        responder = await self.responder()
        if answer is None:
            answer = await self.ocsp_answer(serial)
        der = await self._signing(
            responder.signer, ocsp_mod.build_response, serial=serial, answer=answer, issuer_cert=self.issuer.certificate,
            responder_cert=responder.certificate, responder_signer=responder.signer,
            this_update=now, next_update=next_update, hash_algorithm=hash_algorithm, nonce=nonce)
        metrics.OCSP_SIGNED.labels("unknown" if answer.status is None else answer.status.value).inc()
        return der, now, next_update

    async def ocsp(self, request_der: bytes, *, cache=None) -> bytes:
        """Answer a DER OCSP request; protocol errors become OCSP error responses (RFC 6960 2.3).

        With `cache` (an object with `async cached(serial, algorithm) -> bytes`), requests
        without a nonce are answered from it instead of being signed afresh.
        """
        try:
            query = ocsp_mod.parse_request(request_der)
        except BadRequestError as exc:
            log.info("malformed OCSP request: %s", exc)
            return ocsp_mod.error_response(x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        if not ocsp_mod.is_for_issuer(query, self.issuer.certificate):
            return ocsp_mod.error_response(x509_ocsp.OCSPResponseStatus.UNAUTHORIZED)
        if cache is not None and query.nonce is None:
            return await cache.cached(query.serial, query.hash_algorithm)
        return await self.ocsp_response(query.serial, nonce=query.nonce, hash_algorithm=query.hash_algorithm)
