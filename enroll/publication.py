"""What the responders serve, kept fresh: signed OCSP responses cached per certificate,
and the current CRL, both renewed when a status changes and before they go stale.

A follower task polls the store's status-change feed (every 250 ms by default), so a
revocation made by any process (the CLI, another worker) reaches OCSP and /crl
within a second. A lookup without a nonce is served from the cache: no signing on
the hot path.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp as x509_ocsp

from ca import metrics

from ca.authority import Authority
from ca.model import CertStatus, Issued
from ca.ocsp import OCSPAnswer
from ca.ocsp import error_response as ocsp_error

log = logging.getLogger(__name__)

# CertID hash algorithms a cached response may be keyed by (cryptography's names).
CERT_ID_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512")
# Signings of one OCSP response that may each be overtaken by a status change before the answer is
# served without being cached (see Publisher.cached_response).
SIGN_ATTEMPTS = 3
# Signed `unknown` answers (serials this CA never issued) per source and minute; then `unauthorized`.
UNKNOWN_PER_MINUTE = 60


@dataclass(frozen=True)
class Published:
    der: bytes
    this_update: datetime
    next_update: datetime

    @cached_property
    def http_dates(self) -> tuple[str, str]:
        """(Last-Modified, Expires) as HTTP dates: formatted once, not on every answer."""
        return _http_date(self.this_update), _http_date(self.next_update)


def _http_date(when: datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S GMT")


class _Recorder:
    """The cache handed to Authority.ocsp for one request: notes which cache entry that
    request's bytes resolved to, so the same bytes next time skip parsing and the issuer check."""

    __slots__ = ("_publisher", "request", "key", "item", "source")

    def __init__(self, publisher: "Publisher", request_der: bytes, source: str | None) -> None:
        self._publisher, self.request, self.key, self.source = publisher, request_der, None, source
        self.item: Published | None = None

    async def cached(self, serial: int, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
        algorithm = algorithm or hashes.SHA1()
        try:
            self.item = await self._publisher.cached_response(serial, algorithm, source=self.source)
        except _NotOurs as unknown:   # a serial this CA never issued: nothing of it is kept
            return unknown.der
        self.key = (serial, algorithm.name)
        return self.item.der


class _NotOurs(Exception):
    """cached_response for a serial this CA never issued: its answer, which nothing keeps."""

    def __init__(self, der: bytes) -> None:
        self.der = der


class _PerMinute:
    """At most `limit` events per key in any minute; bounded memory (the oldest keys go first)."""

    def __init__(self, limit: int, max_keys: int = 10_000) -> None:
        self._limit, self._max_keys = limit, max_keys
        self._times: OrderedDict[str, deque] = OrderedDict()

    def allow(self, key: str, now: datetime) -> bool:
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= self._max_keys:
                self._times.popitem(last=False)
            times = self._times[key] = deque()
        while times and times[0] <= now - timedelta(minutes=1):
            times.popleft()
        if len(times) >= self._limit:
            return False
        times.append(now)
        return True


class Publisher:
    def __init__(self, authority: Authority, *, cache_size: int, poll: timedelta) -> None:
        self._authority = authority
        self._unknown_counter = _PerMinute(UNKNOWN_PER_MINUTE)
        self._cache: OrderedDict[tuple[int, str], Published] = OrderedDict()
        # exact request bytes (no nonce, this issuer) -> their key in _cache; the bytes decide
        # the serial and hash algorithm, so the mapping never goes stale, only the response does
        self._requests: OrderedDict[bytes, tuple[int, str]] = OrderedDict()
        self._cache_size = cache_size
        self._poll = poll.total_seconds()
        self._crl: Published | None = None
        self._crl_seen = -1   # the _seen value when self._crl was fetched: it covers every change up to it
        self._crl_lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._seen = 0
        self.changed = asyncio.Condition()   # notified after each batch of status changes

    @property
    def cache_entries(self) -> int:
        """Signed OCSP responses held (each worker holds its own)."""
        return len(self._cache)

    @property
    def last_change(self) -> int:
        return self._seen

    # Versioning by the applied change id. `_seen` only grows, and a change id n is applied (its
    # serials' cache keys popped, then `_seen` advanced, with no await in between) only after that
    # change committed. So a store read begun when `_seen` was v reflects every change up to v; a
    # change it missed has an id above v and is either applied before the result is kept (`_seen`
    # moved past v: the result is thrown away) or after (it pops or replaces what was kept).

    async def start(self) -> None:
        self._seen = await self._authority.last_status_change()
        await self.crl()

    async def follow(self) -> None:
        """Run until cancelled: apply status changes as they appear in the store."""
        while True:
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("status follower failed; retrying")
            await asyncio.sleep(self._poll)

    async def catch_up(self) -> None:
        """Apply status changes now if the store has any this publisher has not seen. With several
        server workers, another worker's follower may have woken the gateway's long poll while this
        one's has not polled yet: a cached answer served then would be the old status, and the
        gateway would publish it as the retained response until its next refresh."""
        if await self._authority.last_status_change() > self._seen:
            await self.refresh_once()

    async def refresh_once(self) -> None:
        async with self._refresh_lock:   # the follower and catch_up() must not apply a batch twice
            await self._refresh()

    async def _refresh(self) -> None:
        changes = await self._authority.status_changes(self._seen)
        if changes:
            for _, serial in changes:
                for name in CERT_ID_HASHES:
                    self._cache.pop((serial, name), None)
            self._seen = changes[-1][0]
            # OCSP answers are right from here on: wake the long polls (the gateway) now rather than
            # after the CRL is re-signed. crl(force=True) takes the CRL lock before anything else
            # runs, so a /crl asked for by a woken poller waits for the new CRL, never gets the old.
            async with self.changed:
                self.changed.notify_all()
            await self.crl(force=True)
            log.info("status changes applied up to %d (%d serials)", self._seen, len(changes))
        elif self._crl and (self._stale(self._crl) or self._crl_seen < self._seen):
            # behind _seen: the re-signing after the last batch failed; retried on every poll
            await self.crl(force=True)

    def _stale(self, item: Published) -> bool:
        # renew at half of the validity, so relying parties never hold an expired answer
        return self._authority.now() >= item.this_update + (item.next_update - item.this_update) / 2

    async def crl(self, force: bool = False) -> Published:
        if not force and self._crl is not None:
            await self.catch_up()
        async with self._crl_lock:
            if force or self._crl is None or self._stale(self._crl) or self._crl_seen < self._seen:
                seen = self._seen   # before the store read: the CRL fetched covers at least this
                der = await self._authority.current_crl()
                crl = x509.load_der_x509_crl(der)
                self._crl, self._crl_seen = Published(der, crl.last_update_utc, crl.next_update_utc), seen
            return self._crl

    async def ocsp(self, request_der: bytes) -> bytes:
        """Answer one DER OCSP request; nonce requests are signed fresh, others come from the cache."""
        return (await self.answer(request_der))[0]

    async def answer(self, request_der: bytes, source: str | None = None) -> tuple[bytes, Published | None]:
        """The DER answer and, when it came from the cache (no nonce), its Published entry:
        what an HTTP cache may be told about it, without parsing the response again. `source`
        (the client address) bounds the signed answers for serials this CA never issued."""
        key = self._requests.get(request_der)
        if key is not None:
            item = self._cache.get(key)
            if item is not None and not self._stale(item):
                self._cache.move_to_end(key)
                metrics.OCSP_ANSWERS.labels("cache").inc()
                return item.der, item
        recorder = _Recorder(self, bytes(request_der), source)
        der = await self._authority.ocsp(request_der, cache=recorder)
        if recorder.key is None:
            metrics.OCSP_ANSWERS.labels("uncached").inc()
            return der, None   # signed afresh (nonce) or an error response: nothing to reuse
        metrics.OCSP_ANSWERS.labels("store").inc()
        self._requests[recorder.request] = recorder.key
        if len(self._requests) > self._cache_size:
            self._requests.popitem(last=False)
        return der, recorder.item   # exactly the answer given, cached or not (see cached_response)

    async def cached(self, serial: int, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
        try:
            return (await self.cached_response(serial, algorithm)).der
        except _NotOurs as unknown:
            return unknown.der

    async def cached_response(self, serial: int, algorithm: hashes.HashAlgorithm | None = None, *,
                              source: str | None = None) -> Published:
        algorithm = algorithm or hashes.SHA1()
        key = (serial, algorithm.name)
        item = self._cache.get(key)
        if item is not None:
            await self.catch_up()   # one indexed read; the fast path in answer() does not come here
            item = self._cache.get(key)
        if item is not None and not self._stale(item):
            self._cache.move_to_end(key)
            return item
        seen = self._seen
        answer = await self._authority.ocsp_answer(serial)
        if answer.status is None:
            raise _NotOurs(await self._unknown(serial, algorithm, source))
        for attempt in range(SIGN_ATTEMPTS):
            # A status change committed after the status was read, and applied by the follower
            # before the insert, would otherwise leave the old status cached (nothing left to
            # pop) and served until half its validity. Keep the answer only if no change was
            # applied meanwhile (see "Versioning" above); else sign again from a fresh read.
            if attempt:
                seen, answer = self._seen, None
            item = Published(*await self._authority.ocsp_signed(serial, hash_algorithm=algorithm, answer=answer))
            if self._keep(key, item, seen):
                return item
        # overtaken every time (a burst of changes): answer from the latest read, keep nothing
        log.debug("OCSP response for serial %x not cached: status changes kept arriving", serial)
        return item

    async def _unknown(self, serial: int, algorithm: hashes.HashAlgorithm, source: str | None) -> bytes:
        """A serial this CA never issued: a signed `unknown` (RFC 6960 2.2) for the first
        UNKNOWN_PER_MINUTE such requests of a source each minute, then the unsigned `unauthorized`
        (RFC 5019 2.2.3) that costs no signature; never cached, so a flood of random serials
        neither signs without bound nor pushes real answers out of the cache."""
        if not self._unknown_counter.allow(source or "unknown", self._authority.now()):
            log.info("OCSP for serials never issued: over %d a minute from %s; answering unauthorized",
                     UNKNOWN_PER_MINUTE, source)
            return ocsp_error(x509_ocsp.OCSPResponseStatus.UNAUTHORIZED)
        return (await self._authority.ocsp_signed(serial, answer=OCSPAnswer(None), hash_algorithm=algorithm))[0]

    async def issued(self, issued: Issued, seen: int) -> bytes:
        """The OCSP response (SHA-1 CertID) to hand out with a certificate. One just issued is good
        and is signed from what is in hand, without a store read; kept in the cache only if no
        status change was applied since `seen`, this publisher's `last_change` read before the
        issuance began (a change to the new serial can only come after). A repeated request's
        certificate may have changed status since: that one goes the usual way."""
        if not issued.new:
            return await self.cached(issued.serial)
        serial = issued.serial
        item = Published(*await self._authority.ocsp_signed(serial, answer=OCSPAnswer(CertStatus.GOOD)))
        self._keep((serial, "sha1"), item, seen)
        return item.der

    def _keep(self, key: tuple[int, str], item: Published, seen: int) -> bool:
        if self._seen != seen:
            return False
        self._cache[key] = item
        self._cache.move_to_end(key)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        metrics.OCSP_CACHE.set(len(self._cache))
        return True
