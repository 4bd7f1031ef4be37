"""Manufacturer CRLs for IDevID onboarding: the `crl` files and `crl_url`s of [[enroll.idevid]].

Each is loaded and verified at start (a file that is missing, unparsable or not signed by one of
the manufacturer's CAs refuses the config), then kept fresh while the server runs: a file is
re-read when it changes on disk, a URL is fetched again before its CRL's nextUpdate. A CRL that
fails to load later (bad signature, older than the one held, unreachable) leaves the last good
one in force until its nextUpdate. The rules a CRL and an IDevID are judged by are pure and live
in ca/idevid.py; this module owns the files, the fetches, the schedule and the logging (once per
change of state, never per request). docs/EST.md "IDevID onboarding" has the behaviour.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import urllib.parse
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from cryptography import x509

from ca import idevid
from ca.errors import ConfigError, UnavailableError
from ca.idevid import CRLError, ManufacturerCRL

if TYPE_CHECKING:
    from .config import EnrollConfig

log = logging.getLogger(__name__)

FILE_POLL_S = 2.0                 # a stat of each CRL file this often
FETCH_TIMEOUT_S = 10.0            # the whole of one fetch: connect, headers, body
MAX_CRL_BYTES = 16 * 1024 * 1024  # a larger answer is refused (about 400k entries)
REFETCH_MIN_S, REFETCH_MAX_S = 1.0, 3600.0   # after a good fetch: half the time left to nextUpdate, within these
RETRY_MIN_S, RETRY_MAX_S = 5.0, 300.0        # after a failed one: doubling from 5 s to 5 min
MAX_REDIRECTS = 3


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """PEM or DER."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def _accept(data: bytes, cas: Sequence[x509.Certificate]) -> ManufacturerCRL:
    try:
        crl = parse_crl(data)
    except (ValueError, x509.InvalidVersion) as exc:   # InvalidVersion is no ValueError
        raise CRLError(f"not a CRL in PEM or DER ({exc})") from None
    return idevid.accept_crl(crl, cas)


def _read_and_accept(path: Path, cas: Sequence[x509.Certificate]) -> ManufacturerCRL:
    return _accept(path.read_bytes(), cas)


def _file_stamp(path: Path) -> tuple | None:
    """What changes when the file is rewritten or replaced (a rename gives a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class CRLSource:
    """One `crl` file or `crl_url` of a manufacturer, and the last good CRL it gave."""

    def __init__(self, manufacturer: str, location: str, *, path: Path | None = None) -> None:
        self.manufacturer = manufacturer
        self.location = location          # as configured: what the log names
        self.path = path                  # a file; None for a URL
        self.held: ManufacturerCRL | None = None
        self.stamp: tuple | None = None   # of the file as last read
        self.due = 0.0                    # URLs: monotonic time of the next fetch
        self._failures = 0
        self._problem: str | None = None  # the last refusal logged, so each is logged once

    def take(self, crl: ManufacturerCRL) -> bool:
        """Hold `crl` unless it is older than the one held (a replayed or stale copy); whether
        it is a CRL not held before."""
        if self.held is not None and crl.older_than(self.held):
            raise CRLError(f"it is older than the CRL in force ({crl.describe()}; in force: {self.held.describe()})")
        new = self.held is None or crl.fingerprint != self.held.fingerprint
        self.held = crl
        if new:
            log.info("IDevID CRL of %s from %s loaded: %s", self.manufacturer, self.location, crl.describe())
        if self._problem is not None:
            log.info("IDevID CRL of %s from %s loads again", self.manufacturer, self.location)
            self._problem = None
        self._failures = 0
        return new

    def refused(self, why: str) -> None:
        """A load or fetch that failed: the last good CRL stays in force until its nextUpdate."""
        self._failures += 1
        if why != self._problem:
            if self.held is None:
                kept = f"IDevID logins from {self.manufacturer} are refused until one loads"
            elif self.held.next_update <= datetime.now(timezone.utc):
                kept = f"the CRL held ({self.held.describe()}) is out of date too"
            else:
                kept = f"keeping the CRL in force ({self.held.describe()}) until its next update"
            log.warning("IDevID CRL of %s from %s not used: %s; %s", self.manufacturer, self.location, why, kept)
            self._problem = why

    def schedule(self, monotonic: float, now: datetime) -> None:
        """URLs: the next fetch, before the held CRL's nextUpdate (or a retry with backoff)."""
        left = (self.held.next_update - now).total_seconds() if self.held is not None else 0.0
        if self._failures or left <= 0:
            backoff = RETRY_MIN_S * 2 ** min(max(0, self._failures - 1), 16)
            self.due = monotonic + min(RETRY_MAX_S, backoff)
        else:
            self.due = monotonic + min(REFETCH_MAX_S, max(REFETCH_MIN_S, left / 2))

    async def poll_file(self, cas: Sequence[x509.Certificate]) -> None:
        stamp = _file_stamp(self.path)
        if stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            self.take(await asyncio.to_thread(_read_and_accept, self.path, cas))
        except OSError as exc:
            self.refused(f"cannot read it ({exc.strerror or exc})")
        except CRLError as exc:
            self.refused(str(exc))

    async def fetch(self, session: aiohttp.ClientSession, cas: Sequence[x509.Certificate]) -> None:
        try:
            data = await _download(session, self.location)
            self.take(await asyncio.to_thread(_accept, data, cas))
        except CRLError as exc:
            self.refused(str(exc))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            self.refused(f"fetch failed ({type(exc).__name__}: {exc})" if str(exc) else
                         f"fetch failed ({type(exc).__name__})")
        finally:   # whatever happened, the next fetch is scheduled (no retry loop on a bug)
            self.schedule(time.monotonic(), datetime.now(timezone.utc))


async def _download(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url, max_redirects=MAX_REDIRECTS) as resp:
        if resp.status != 200:
            raise CRLError(f"the server answered HTTP {resp.status}")
        if resp.content_length is not None and resp.content_length > MAX_CRL_BYTES:
            raise CRLError(f"the answer is over {MAX_CRL_BYTES} bytes")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_CRL_BYTES:
                raise CRLError(f"the answer is over {MAX_CRL_BYTES} bytes")
        return bytes(body)


class ManufacturerCRLs:
    """The CRL sources of one [[enroll.idevid]] entry, and the check of its IDevIDs against them."""

    def __init__(self, manufacturer: str, cas: Sequence[x509.Certificate], sources: Sequence[CRLSource]) -> None:
        self.manufacturer, self.cas, self.sources = manufacturer, tuple(cas), tuple(sources)
        self.followed = False             # a refresher runs for these sources (start)
        self._states: dict[str, str] = {}  # what was last logged per subject: once per change of state

    def held(self) -> list[ManufacturerCRL]:
        return [s.held for s in self.sources if s.held is not None]

    def check(self, cert: x509.Certificate, issuer: x509.Certificate, now: datetime) -> None:
        """Raises UnauthorizedError (revoked, not covered) or UnavailableError (a CRL not loaded
        yet, or out of date: the server cannot tell, so it refuses)."""
        pending = [s.location for s in self.sources if s.held is None]
        if pending:
            if not self.followed:   # else the failed fetch said so already
                self._note("sources", "pending", f"IDevID logins from {self.manufacturer} are refused: its CRL "
                                                 f"from {', '.join(pending)} is not fetched in this process "
                                                 "(enroll/idevid_crl.start was not called)")
            raise UnavailableError(f"IDevID onboarding from {self.manufacturer} is not available yet: the "
                                   "manufacturer's CRL has not been loaded; retry later or enroll with a token",
                                   retry_after=idevid.CRL_RETRY_AFTER)
        try:
            idevid.check_revocation(cert, issuer, self.cas, self.held(), now, self.manufacturer)
        except UnavailableError:
            self.review(now)
            raise

    def review(self, now: datetime) -> None:
        """Log each manufacturer CA whose CRLs went out of date, or became current again."""
        held = self.held()
        stale = idevid.stale_issuers(held, now)
        for issuer in {c.issuer for c in held}:
            name = issuer.subject.rfc4514_string()
            if issuer in stale:
                newest = max((c for c in held if c.issuer == issuer), key=lambda c: c.next_update)
                self._note(f"crl:{name}", "stale",
                           f"IDevID logins from {self.manufacturer} under {name!r} are refused: its CRL is "
                           f"out of date (newest held: {newest.describe()}); load a current one")
            else:
                self._note(f"crl:{name}", "current", f"the CRL of {name!r} ({self.manufacturer}) is current "
                                                     f"again; its IDevID logins are accepted")

    def _note(self, subject: str, state: str, message: str = "") -> None:
        before = self._states.get(subject)
        if before == state:
            return
        self._states[subject] = state
        if state in ("stale", "pending"):
            log.warning("%s", message)
        elif before is not None and message:   # a recovery; a first "all is well" says nothing
            log.info("%s", message)

    def next_expiry(self, now: datetime) -> float | None:
        """Seconds to the earliest nextUpdate still ahead (to log it when it passes)."""
        ahead = [(c.next_update - now).total_seconds() for c in self.held() if c.next_update > now]
        return min(ahead) if ahead else None


# -- [[enroll.idevid]] crl / crl_url, read at start ------------------------------------------------

def _locations(entry: dict, key: str, manufacturer: str) -> list[str]:
    value = entry.get(key, [])
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f'[[enroll.idevid]] {manufacturer}: {key} must be a string or a list of strings')
    return values


def _check_url(url: str, manufacturer: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"[[enroll.idevid]] {manufacturer}: crl_url {url!r} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"[[enroll.idevid]] {manufacturer}: crl_url must not carry credentials")


def load(manufacturer: str, cas: Sequence[x509.Certificate], entry: dict, home: Path) -> ManufacturerCRLs | None:
    """The CRL sources of one [[enroll.idevid]] entry, files loaded now; None when it has none."""
    files, urls = _locations(entry, "crl", manufacturer), _locations(entry, "crl_url", manufacturer)
    if not files and not urls:
        return None
    sources = []
    for name in files:
        source = CRLSource(manufacturer, name, path=home / name)
        source.stamp = _file_stamp(source.path)
        try:
            source.take(_read_and_accept(source.path, cas))
        except OSError as exc:
            raise ConfigError(f"[[enroll.idevid]] {manufacturer}: crl {name!r}: {exc.strerror or exc}") from None
        except CRLError as exc:
            raise ConfigError(f"[[enroll.idevid]] {manufacturer}: crl {name!r}: {exc}") from None
        sources.append(source)
    for url in urls:
        _check_url(url, manufacturer)
        sources.append(CRLSource(manufacturer, url))
    return ManufacturerCRLs(manufacturer, cas, sources)


# -- while the server runs -------------------------------------------------------------------------

def start(app: web.Application, config: "EnrollConfig") -> None:
    """Keep the manufacturer CRLs of `config` fresh while `app` runs: the first fetch of every
    `crl_url` before the app serves, then file polls and fetches in a task (aiohttp cleanup_ctx)."""
    makers = [m.revocation for m in config.idevid if m.revocation is not None]
    if makers:
        app.cleanup_ctx.append(functools.partial(_follow_ctx, makers))


async def _follow_ctx(makers: list[ManufacturerCRLs], app: web.Application):
    makers = [m for m in makers if not m.followed]   # one refresher per process, whatever the apps
    for maker in makers:
        maker.followed = True
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": "iomt-ca"}) as session:
        refresher = Refresher(makers, session)
        try:
            await refresher.once()   # the first fetch of every crl_url, before the app serves
        except Exception:
            log.exception("loading the IDevID CRLs failed; retrying in the background")
        task = asyncio.create_task(refresher.run(), name="idevid-crl-refresh")
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            for maker in makers:
                maker.followed = False


class Refresher:
    """Polls the files and fetches the URLs of some manufacturers' CRLs when they are due."""

    def __init__(self, makers: Sequence[ManufacturerCRLs], session: aiohttp.ClientSession) -> None:
        self.makers, self.session = makers, session

    async def once(self) -> None:
        steps = []
        for maker in self.makers:
            for source in maker.sources:
                if source.path is not None:
                    steps.append(source.poll_file(maker.cas))
                elif time.monotonic() >= source.due:
                    steps.append(source.fetch(self.session, maker.cas))
        await asyncio.gather(*steps)
        now = datetime.now(timezone.utc)
        for maker in self.makers:
            maker.review(now)

    def delay(self) -> float:
        now, monotonic = datetime.now(timezone.utc), time.monotonic()
        waits = [REFETCH_MAX_S]
        for maker in self.makers:
            expiry = maker.next_expiry(now)
            if expiry is not None:
                waits.append(expiry)
            for source in maker.sources:
                waits.append(FILE_POLL_S if source.path is not None else source.due - monotonic)
        return max(0.1, min(waits))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.delay())
            try:
                await self.once()
            except Exception:
                log.exception("refreshing the IDevID CRLs failed; retrying")
