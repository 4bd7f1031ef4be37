"""What the CA counts as it works, in Prometheus' terms (prometheus-client): the counters and
histograms of events, updated where the event happens in the core, once it is committed.

- Issuance, revocation and CRL counters are incremented by `Tx.on_commit` callbacks, so a
  transaction that rolls back counts nothing and a count is never ahead of the database.
- `EDGE` names the edge a request came in by (`est`, `ra`: the RA API, which the MQTT gateways
  use; `console`: the web console and the admin API; `cli`: everything else, the default). Each
  edge's middleware sets it for its requests (enroll/metrics.py).
- Gauges of state (certificates and devices by status, expiries, ...) are not kept here: they are
  read from the store when scraped (enroll/metrics.py), so they are the whole server's and stay
  right across worker processes and restarts.
- With several worker processes, `iomtca serve` sets PROMETHEUS_MULTIPROC_DIR for them before
  this module is imported and a scrape adds up every worker's counts (prometheus-client's
  multiprocess mode).
"""
from __future__ import annotations

import contextvars

from prometheus_client import Counter, Gauge, Histogram

EDGE: contextvars.ContextVar[str] = contextvars.ContextVar("iomtca_edge", default="cli")

ISSUED = Counter("iomtca_certificates_issued_total",
                 "Device certificates issued and committed, by edge and kind (enrollment or renewal)",
                 ["edge", "kind"])
REFUSED = Counter("iomtca_refusals_total", "Requests refused with a protocol error (the CA's typed errors), by "
                  "edge, operation (the route, or an RA batch item's op) and error code", ["edge", "operation", "code"])


def refused(operation: str, code: str) -> None:
    """Count one refusal at the edge that answered it (each edge's error mapping calls this)."""
    REFUSED.labels(EDGE.get(), operation, code).inc()
STATUS_CHANGES = Counter("iomtca_status_changes_total",
                         "Certificate status changes committed: revocations by reason, holds and releases",
                         ["change", "reason"])
CRLS = Counter("iomtca_crls_signed_total", "CRLs signed (each with a new CRL number)")
OCSP_SIGNED = Counter("iomtca_ocsp_signed_total", "OCSP responses signed, by certificate status", ["status"])
OCSP_ANSWERS = Counter("iomtca_ocsp_answers_total",
                       "OCSP requests answered, by path: cache (the same request seen before), store (looked "
                       "up by serial, from the cache or signed), uncached (a nonce, or an error)", ["path"])
GROUP_SIZE = Histogram("iomtca_group_commit_size", "Write blocks committed together by one COMMIT",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
GROUP_SECONDS = Histogram("iomtca_group_commit_seconds", "Time of one group's COMMIT (its fsync)",
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
OCSP_CACHE = Gauge("iomtca_ocsp_cache_entries", "Signed OCSP responses held in memory, all workers together",
                   multiprocess_mode="livesum")
