"""The [enroll] section of config.toml: listeners, limits, trust for client certificates."""
from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta

from cryptography import x509

from ca.config import CAPaths
from ca.errors import BadRequestError, ConfigError
from ca.timefmt import parse_duration

from . import idevid_crl
from .idevid_crl import ManufacturerCRLs
from .limits import ConnectionLimits, parse_connection_limits

_KEYS = {"listen", "http_listen", "max_body", "labels", "channel_binding", "idevid", "trusted_proxies",
         "proxy_cert_header", "source_failures", "device_source_failures", "ocsp_cache_size", "status_poll",
         "workers", "connections"}
MAX_WORKERS = 64
_IDEVID_KEYS = {"manufacturer", "file", "crl", "crl_url"}


@dataclass(frozen=True)
class IDevIDIssuer:
    """A manufacturer whose IDevID certificates may onboard devices (IEEE 802.1AR)."""

    manufacturer: str
    certificates: tuple[x509.Certificate, ...]   # root and intermediates that issue IDevIDs
    # `crl`/`crl_url`: the manufacturer's CRLs, live (re-read and re-fetched while the server
    # runs, enroll/idevid_crl.py); None when the entry configures none
    revocation: ManufacturerCRLs | None = field(default=None, compare=False)


@dataclass(frozen=True)
class EnrollConfig:
    listen: str = "127.0.0.1:8443"
    http_listen: str = "127.0.0.1:8080"
    max_body: int = 64 * 1024
    # EST label -> CA profile; a label naming a device-type profile selects it too.
    labels: dict[str, str] = field(default_factory=dict)
    # Profiles whose CSRs must carry the TLS channel binding in challengePassword (RFC 7030 3.5).
    channel_binding: frozenset[str] = frozenset()
    idevid: tuple[IDevIDIssuer, ...] = ()
    # Reverse proxies whose client-certificate header is believed; nobody else's is.
    trusted_proxies: tuple[ipaddress._BaseNetwork, ...] = ()
    proxy_cert_header: str = "X-SSL-Client-Cert"
    # Failed token attempts per source address, and per device from one source, before they
    # must wait (15-minute windows, ca/failures.py).
    source_failures: int = 20
    device_source_failures: int = 5
    ocsp_cache_size: int = 50_000
    status_poll: timedelta = timedelta(milliseconds=250)
    # Server processes sharing the listening sockets (`iomtca serve --workers`); see docs/EST.md.
    workers: int = 1
    # [enroll.connections]: slow clients, idle keep-alives, connections per source (enroll/limits.py)
    connections: ConnectionLimits = ConnectionLimits()

    def idevid_trust_files(self) -> list[x509.Certificate]:
        return [c for issuer in self.idevid for c in issuer.certificates]


def parse_listen(text: str) -> tuple[str, int]:
    """"127.0.0.1:8443" or "[::1]:8443" -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise ConfigError(f"listen address {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def parse_workers(value) -> int:
    """A worker count: 1..MAX_WORKERS, or "auto" for one per CPU."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if isinstance(value, bool) or not 1 <= count <= MAX_WORKERS or str(count) != str(value).strip():
        raise ConfigError(f'workers must be a whole number from 1 to {MAX_WORKERS} or "auto", not {value!r}')
    return count


def _count(raw: dict, name: str, default: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000_000:
        raise ConfigError(f"[enroll] {name} must be a whole number from 1 to 1000000000, not {value!r}")
    return value


def load_enroll_config(paths: CAPaths) -> EnrollConfig:
    try:
        raw = tomllib.loads(paths.config.read_text()).get("enroll", {})
    except (FileNotFoundError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{paths.config}: {exc}") from exc
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"unknown setting(s) in [enroll]: {', '.join(sorted(unknown))}")
    d = EnrollConfig()
    idevid = []
    for entry in raw.get("idevid", []):
        try:
            name, file = entry["manufacturer"], paths.home / entry["file"]
            if not isinstance(name, str) or not name.strip():
                raise TypeError
            certs = tuple(x509.load_pem_x509_certificates(file.read_bytes()))
        except (KeyError, TypeError):
            raise ConfigError('each [[enroll.idevid]] needs manufacturer = "..." and file = "roots.pem"') from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[[enroll.idevid]] {entry.get('file')}: {exc}") from exc
        if unknown := set(entry) - _IDEVID_KEYS:
            raise ConfigError(f"unknown setting(s) in [[enroll.idevid]] {name}: {', '.join(sorted(unknown))}")
        idevid.append(IDevIDIssuer(name, certs, idevid_crl.load(name, certs, entry, paths.home)))
    try:
        proxies = tuple(ipaddress.ip_network(p) for p in raw.get("trusted_proxies", []))
        poll = parse_duration(raw["status_poll"]) if "status_poll" in raw else d.status_poll
    except (ValueError, BadRequestError) as exc:
        raise ConfigError(f"[enroll]: {exc}") from exc
    cfg = EnrollConfig(
        listen=raw.get("listen", d.listen), http_listen=raw.get("http_listen", d.http_listen),
        max_body=int(raw.get("max_body", d.max_body)), labels=dict(raw.get("labels", {})),
        channel_binding=frozenset(raw.get("channel_binding", [])), idevid=tuple(idevid),
        trusted_proxies=proxies, proxy_cert_header=raw.get("proxy_cert_header", d.proxy_cert_header),
        source_failures=_count(raw, "source_failures", d.source_failures),
        device_source_failures=_count(raw, "device_source_failures", d.device_source_failures),
        ocsp_cache_size=int(raw.get("ocsp_cache_size", d.ocsp_cache_size)), status_poll=poll,
        workers=parse_workers(raw.get("workers", d.workers)),
        connections=parse_connection_limits(raw.get("connections", {})))
    parse_listen(cfg.listen)
    parse_listen(cfg.http_listen)
    return cfg
