"""What `iomtca serve` tells the people who watch it: `/metrics` (Prometheus text format),
`/healthz` and `/readyz` on the plain-HTTP listener, and one access-log line per request.

- Counters and histograms of events live in ca/metrics.py (and REQUEST_SECONDS here); with
  several workers each writes its own files under PROMETHEUS_MULTIPROC_DIR (set by the
  supervisor, enroll/server.py) and a scrape adds them up.
- Gauges of state are read from the store at scrape time (`state_families`): devices and current
  certificates by status, expiring within 24 h and 7 d, devices absent past their period, the
  seconds left on each service and CA certificate. They are the whole server's whichever worker
  answers, and cost a few indexed queries (store/sqlite_reports.py).
- `/readyz` answers 200 only when the database takes a write, the issuing key signs, the OCSP
  responder is loaded and no service or CA certificate has expired; the JSON says which failed.
- `access_log`: method, path (never the query string, which may carry a token or an OCSP request),
  status, milliseconds, client source and the device id of the route, at INFO on `iomtca.access`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import timedelta

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from ca import attendance, metrics
from ca.service_certs import active_gateway_certificates, directory_status

from .identity import client_source
from .middleware import route_of
from .state import AUTHORITY, CONFIG

access = logging.getLogger("iomtca.access")

REQUEST_SECONDS = Histogram("iomtca_request_seconds", "Time to answer one HTTP request, by listener and route",
                            ["listener", "route"],
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
READY_TIMEOUT = 5.0   # seconds per readiness check


def instrument(listener: str, edge: str | None = None, source=None):
    """The middleware of a listener: its edge for the counters of ca/metrics.py (`ra` for /ra/
    paths), the latency histogram, and the access-log line. `source(request)`: the client's
    address as the listener judges it (behind trusted proxies: the forwarded one)."""
    source = source or _source
    @web.middleware
    async def middleware(request: web.Request, handler):
        if edge is not None:
            metrics.EDGE.set("ra" if request.path.startswith("/ra/") else edge)
        started = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.monotonic() - started
            route = route_of(request)
            REQUEST_SECONDS.labels(listener, route).observe(elapsed)
            if access.isEnabledFor(logging.INFO):
                device = request.match_info.get("device_id", "-")
                access.info("%s %s %s %d %.1fms source=%s device=%s", listener, request.method, request.path[:200],
                            status, elapsed * 1000, _safe(source, request), str(device)[:64])
    return middleware


def _source(request: web.Request) -> str:
    return client_source(request, request.app[CONFIG]) or "-"


def _safe(source, request: web.Request) -> str:
    try:
        return source(request) or "-"
    except Exception:   # a malformed forwarding header: the log line still gets written
        return request.remote or "-"


# -- /metrics ------------------------------------------------------------------------------

async def state_families(authority) -> list[GaugeMetricFamily]:
    """The gauges of state, read from the store now."""
    now = authority.now()
    async with authority.store.read() as tx:
        devices = await tx.device_status_counts()
        certs = await tx.current_status_counts(now)
        _, soon = await tx.expiry_summary(now, [now + timedelta(hours=24), now + timedelta(days=7)], sample=0)
        away = await attendance.past_period(tx, authority.config, now)
    gateways = await active_gateway_certificates(authority.store)
    families = []
    g = GaugeMetricFamily("iomtca_devices", "Registered devices by status", labels=["status"])
    for status, n in sorted(devices.items()):
        g.add_metric([status], n)
    families.append(g)
    g = GaugeMetricFamily("iomtca_certificates", "Unexpired device certificates by status", labels=["status"])
    for status, n in sorted(certs.items()):
        g.add_metric([status], n)
    families.append(g)
    g = GaugeMetricFamily("iomtca_certificates_expiring", "Devices whose current certificate expires within",
                          labels=["within"])
    for label, (n, _) in zip(("24h", "7d"), soon):
        g.add_metric([label], n)
    families.append(g)
    g = GaugeMetricFamily("iomtca_devices_absent", "Active devices without proven contact for longer than their "
                          "non-attendance period, by criticality", labels=["criticality"])
    by_class: dict[str, int] = {}
    for device in away:
        by_class[device.criticality.value] = by_class.get(device.criticality.value, 0) + 1
    for criticality in ("low", "medium", "high"):
        g.add_metric([criticality], by_class.get(criticality, 0))
    families.append(g)
    g = GaugeMetricFamily("iomtca_certificate_expiry_seconds", "Seconds until a service or CA certificate expires "
                          "(negative: expired)", labels=["certificate"])
    for state in directory_status(authority.paths, authority.config, now, gateways):
        if state.cert is not None:
            g.add_metric([state.name], (state.cert.not_valid_after_utc - now).total_seconds())
    families.append(g)
    return families


class _Families:
    def __init__(self, families) -> None:
        self._families = families

    def collect(self):
        return self._families


async def metrics_page(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        events = CollectorRegistry()
        MultiProcessCollector(events)
    else:
        events = REGISTRY
    state = CollectorRegistry()
    state.register(_Families(await state_families(authority)))
    body = generate_latest(events) + generate_latest(state)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- /healthz, /readyz ---------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive", "pid": os.getpid()})


async def _database(authority) -> str:
    async with authority.store.write():   # takes the write lock and commits (an empty block)
        pass
    return "writable"


async def _issuing_key(authority) -> str:
    data = b"iomtca readiness"
    signer, cert = authority.issuer.signer, authority.issuer.certificate
    signature = await asyncio.to_thread(signer.sign, data)
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(signer.hash_algorithm))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), signer.hash_algorithm)
    else:   # Ed25519
        key.verify(signature, data)
    return "signs, and the issuing certificate verifies it"


async def _responder(authority) -> str:
    responder = await authority.responder()
    return f"OCSP responder certificate {responder.certificate.serial_number:x}"


async def _certificates(authority) -> str:
    now = authority.now()
    expired = [s.name for s in directory_status(authority.paths, authority.config, now)
               if s.cert is None or s.cert.not_valid_after_utc <= now]
    if expired:
        raise ValueError(f"expired, missing or damaged: {', '.join(expired)}")
    return "none expired"


CHECKS = {"database": _database, "issuing_key": _issuing_key, "ocsp_responder": _responder,
          "certificates": _certificates}


async def readyz(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = {"ok": True, "detail": await asyncio.wait_for(check(authority), READY_TIMEOUT)}
        except asyncio.TimeoutError:
            results[name] = {"ok": False, "detail": f"no answer within {READY_TIMEOUT:.0f} s"}
        except Exception as exc:   # readiness reports every failure; it never fails itself
            results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
    ready = all(r["ok"] for r in results.values())
    if not ready:
        logging.getLogger(__name__).warning("not ready: %s", ", ".join(
            f"{n}: {r['detail']}" for n, r in results.items() if not r["ok"]))
    return web.json_response({"ready": ready, "checks": results}, status=200 if ready else 503)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
