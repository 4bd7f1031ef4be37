"""Clocks, RFC 3339 timestamps and human durations ("72h", "7d", "1d12h")."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Callable

from .errors import BadRequestError

Clock = Callable[[], datetime]

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
MAX_DURATION_SECONDS = 1000 * 31_536_000   # no setting or request needs more than a thousand years
_DURATION_RE = re.compile(r"(\d+)([wdhms])")


def utc_now() -> datetime:
    """The default clock: aware UTC, whole seconds (certificates carry seconds)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def to_rfc3339(when: datetime) -> str:
    if when.tzinfo is not timezone.utc:
        when = when.astimezone(timezone.utc)
    # by hand: strftime is several times slower, and every stored row carries timestamps
    return (f"{when.year:04d}-{when.month:02d}-{when.day:02d}T"
            f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}Z")


def from_rfc3339(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequestError(f"invalid timestamp {text!r}: expected RFC 3339") from exc
    if when.tzinfo is None:
        raise BadRequestError(f"timestamp {text!r} has no time zone")
    return when.astimezone(timezone.utc)


def parse_duration(text: str, *, cap: bool = False) -> timedelta:
    """Parse "90s", "30m", "72h", "7d", "2w" and concatenations such as "1d12h". Longer than
    MAX_DURATION_SECONDS is refused, or with `cap` (a filter such as "expiring within") taken as that."""
    t = text.strip().lower()
    pos, seconds = 0, 0
    for match in _DURATION_RE.finditer(t):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not t or pos != len(t):
        raise BadRequestError(f"invalid duration {text!r}: use e.g. 90s, 30m, 72h, 7d, 1d12h")
    if seconds > MAX_DURATION_SECONDS and cap:
        seconds = MAX_DURATION_SECONDS
    if seconds > MAX_DURATION_SECONDS:   # timedelta's own bound is near 2.7 million years: an OverflowError
        raise BadRequestError(f"duration {text[:40]!r} is longer than {MAX_DURATION_SECONDS // 31_536_000} years")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """Inverse of parse_duration for whole seconds: largest units first."""
    seconds = int(delta.total_seconds())
    if seconds < 0:
        raise ValueError("negative duration")
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in _UNITS.items():
        if unit == "w":  # "7d" reads better than "1w"
            continue
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
