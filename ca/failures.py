"""Failed anonymous logins (a wrong enrollment token, an unknown device id), counted in the store.

Two counters, in fixed windows of 15 minutes, kept in the `auth_failures` table so that every
worker process and every restart sees the same numbers:

- per device and source (`device-source`): 5 failures for one device id from one source lock
  that pair only. A stranger guessing tokens for `pump-0001` locks out themselves, never the
  pump enrolling from its own address.
- per source (`source`): `[enroll] source_failures` (20) failures from one address, whatever
  device ids they name, lock that address. Relayed requests (the gateway's RA calls) are counted
  under `ra:GATEWAY` and not limited per source: a gateway speaks for a whole ward, and the broker
  has already confined each device to its own topics.

A key is refused while its failures in the current and the previous window reach the limit
(a window-and-a-half on average, at most two). Recording a failure is one upsert inside the
store's group commit, not an audit row per probe: `audit_windows` writes one audit entry per
source and ended window, with the count and the device ids named most often.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .errors import NotAcceptedError, RateLimitedError
from .model import AuditEvent

log = logging.getLogger(__name__)

WINDOW = timedelta(minutes=15)
DEVICE_SOURCE_LIMIT = 5   # the defaults of [enroll] device_source_failures and source_failures
SOURCE_LIMIT = 20


@dataclass(frozen=True)
class Limits:
    """Failed logins per key in the current and previous window before it must wait."""

    device_source: int = DEVICE_SOURCE_LIMIT
    source: int = SOURCE_LIMIT
KEEP = 4 * WINDOW   # counted windows older than this are deleted once audited
RA_PREFIX = "ra:"


@dataclass(frozen=True)
class Keys:
    """The counter keys of one anonymous attempt."""

    device_source: str
    source: str
    limited_source: bool   # False for relayed (RA) sources: counted, not limited


def keys(device_id: str, source: str | None) -> Keys:
    source = source or "unknown"
    return Keys(f"{device_id} {source}", source, not source.startswith(RA_PREFIX))


def window_start(now: datetime) -> datetime:
    epoch = int(now.astimezone(timezone.utc).timestamp())
    step = int(WINDOW.total_seconds())
    return datetime.fromtimestamp(epoch - epoch % step, timezone.utc)


async def check(tx, k: Keys, now: datetime, limits: Limits) -> None:
    """Refuse (RateLimitedError) a key whose failures reached its limit."""
    start = window_start(now)
    since = start - WINDOW
    retry = int((start + WINDOW - now).total_seconds()) + 1
    if await tx.count_failures("device-source", k.device_source, since) >= limits.device_source:
        raise RateLimitedError(f"too many failed attempts for this device from {k.source}; retry in {retry} s",
                               retry_after=retry)
    if k.limited_source and await tx.count_failures("source", k.source, since) >= limits.source:
        raise RateLimitedError(f"too many failed attempts from address {k.source}; retry in {retry} s",
                               retry_after=retry)


async def record(tx, k: Keys, now: datetime) -> None:
    start = window_start(now)
    await tx.add_failure("device-source", k.device_source, k.source, start)
    await tx.add_failure("source", k.source, k.source, start)


async def audit_windows(tx, now: datetime) -> int:
    """One `anonymous_failures` audit entry per source and ended window not yet audited; old
    windows forgotten. Returns the number of entries written."""
    ended = window_start(now)
    rows = await tx.unaudited_failures("source", ended)
    for source, start, count in rows:
        named = await tx.failures_in_window("device-source", source, start)
        devices = [key.rsplit(" ", 1)[0] for key, _ in sorted(named, key=lambda r: -r[1])[:10]]
        await tx.append_audit(AuditEvent("anonymous_failures", f"source:{source}", detail={
            "count": count, "window_start": start.isoformat(), "window_s": int(WINDOW.total_seconds()),
            "devices": devices, "distinct_devices": len(named)}), now)
        await tx.mark_failures_audited("source", source, start)
    await tx.forget_failures(ended - KEEP)
    return len(rows)


async def refused(store, k: Keys, now: datetime, exc, what: str) -> None:
    """An anonymous refusal (NotAcceptedError counted, RateLimitedError only logged): the one
    handling device-token and gateway-token logins share, instead of an audit row per probe."""
    if isinstance(exc, NotAcceptedError):
        async with store.write() as tx:
            await record(tx, k, now)
    log.info("anonymous %s refused key=%s: %s", what, k.device_source, getattr(exc, "why", exc.message))
