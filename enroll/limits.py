"""[enroll.connections]: how long and how many connections a client may hold.

What each limit bounds, and where it is enforced:

- `handshake_timeout`: a TLS handshake not finished by then is dropped (asyncio's
  `ssl_handshake_timeout`, in enroll/server.py's acceptor).
- `idle_timeout`: a connection that has no complete request headers this long after it was
  opened, or after its previous answer, is closed. That bounds idle keep-alives and clients that
  trickle their headers (slowloris) alike: aiohttp's keep-alive timer runs from the connection's
  start and from each answer until the next request is fully parsed, and bytes arriving meanwhile
  do not restart it.
- `body_timeout`: a request body not complete this long after its headers is answered
  408 and its connection closed (`body_deadline` in enroll/middleware.py).
- `max_header_bytes`, `max_headers`: one header line (and the request line) longer than this, or
  more header lines, is answered 400 by aiohttp's parser before any handler runs.
- `per_source`: open connections from one address, per listener and server process; one more is
  closed at once. Trusted proxies (`trusted_proxies`) are exempt: they carry many clients.
- `max_connections`: open connections per listener and server process (each listener counts its
  own); at the limit that listener stops accepting until one closes (the rest wait in the listen queue, or go to another worker).
"""
from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass, fields

from ca.errors import BadRequestError, ConfigError
from ca.timefmt import parse_duration

log = logging.getLogger(__name__)

# File descriptors a server process needs besides its connections (database, logs, keys, pipes).
FD_HEADROOM = 64
# A source refused for too many connections is logged at most this often.
REFUSAL_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0   # above the 15 s idle time of aiohttp's client pool: clients close first
    body_timeout: float = 30.0
    max_header_bytes: int = 8190
    max_headers: int = 64
    per_source: int = 128
    max_connections: int = 1000

    def runner_args(self) -> dict:
        """The aiohttp request-handler settings these limits map to (web.AppRunner's kwargs)."""
        return {"keepalive_timeout": self.idle_timeout, "max_line_size": self.max_header_bytes,
                "max_field_size": self.max_header_bytes, "max_headers": self.max_headers}


_DURATIONS = {"handshake_timeout", "idle_timeout", "body_timeout"}
_BOUNDS = {"max_header_bytes": (1024, 1 << 20), "max_headers": (8, 1024), "per_source": (1, 1 << 20),
           "max_connections": (1, 1 << 20)}


def parse_connection_limits(raw) -> ConnectionLimits:
    if not isinstance(raw, dict):
        raise ConfigError("[enroll.connections] must be a table")
    known = {f.name for f in fields(ConnectionLimits)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in [enroll.connections]: {', '.join(sorted(unknown))}")
    values = {}
    for name, value in raw.items():
        if name in _DURATIONS:
            try:
                seconds = parse_duration(value).total_seconds() if isinstance(value, str) else None
            except BadRequestError as exc:
                raise ConfigError(f"[enroll.connections] {name}: {exc}") from None
            if not seconds:
                raise ConfigError(f'[enroll.connections] {name} must be a duration of at least 1s, e.g. "15s", '
                                  f"not {value!r}")
            values[name] = seconds
        else:
            low, high = _BOUNDS[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"[enroll.connections] {name} must be a whole number from {low} to {high}, "
                                  f"not {value!r}")
            values[name] = value
    limits = ConnectionLimits(**values)
    if limits.per_source > limits.max_connections:
        raise ConfigError("[enroll.connections] per_source cannot be above max_connections")
    return limits


def ensure_descriptors(limits: ConnectionLimits, listeners: int = 1) -> None:
    """Raise this process's open-file limit to what `max_connections` on each of its `listeners`
    needs, or refuse the setting: a limit the kernel would undercut (accept failing with EMFILE)
    is not a limit."""
    needed = listeners * limits.max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(f"[enroll.connections] max_connections = {limits.max_connections} on {listeners} "
                          f"listener(s) needs {needed} open files, but this process may open at most {hard} "
                          "(ulimit -Hn); lower max_connections or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class ConnectionCounter:
    """Open connections of one server process, in all and per source address."""

    def __init__(self, limits: ConnectionLimits, exempt: tuple[ipaddress._BaseNetwork, ...] = ()) -> None:
        self.limits = limits
        self._exempt = exempt
        self._open: Counter[str] = Counter()
        self.total = 0
        self.refused = 0
        self._logged: dict[str, float] = {}
        self._listeners: list = []

    def on_release(self, callback) -> None:
        """`callback()` after each released connection (a paused acceptor resumes)."""
        self._listeners.append(callback)

    def full(self) -> bool:
        return self.total >= self.limits.max_connections

    def admit(self, source: str) -> bool:
        """Count a new connection from `source`; False (and nothing counted) when over `per_source`."""
        if self._open[source] >= self.limits.per_source and not self._is_exempt(source):
            self.refused += 1
            now = time.monotonic()
            if now - self._logged.get(source, -REFUSAL_LOG_EVERY_S) >= REFUSAL_LOG_EVERY_S:
                self._logged[source] = now
                log.warning("refusing connections from %s: %d open, the per_source limit; %d refused so far",
                            source, self._open[source], self.refused)
            return False
        self._open[source] += 1
        self.total += 1
        return True

    def release(self, source: str) -> None:
        if self._open[source] <= 0:
            return
        self._open[source] -= 1
        self.total -= 1
        if not self._open[source]:
            del self._open[source]
        for callback in self._listeners:
            callback()

    def open_from(self, source: str) -> int:
        return self._open[source]

    def _is_exempt(self, source: str) -> bool:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(address in net for net in self._exempt)
