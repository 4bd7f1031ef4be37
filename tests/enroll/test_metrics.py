"""`/metrics`, `/healthz` and `/readyz` of a real `iomtca serve` (enroll/metrics.py), scraped
with curl and parsed with prometheus-client's own parser: the counters move when a device enrolls
over EST and when security revokes through the admin API, the gauges read from the store follow,
with two workers the counts are the server's (not the answering worker's), readiness fails with
the reason while another process holds the database's write lock, and every request gets one
access-log line without its query string."""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.console.test_console_api import post_json, tokens  # noqa: F401


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("metrics")


def scrape(srv) -> dict[tuple[str, tuple], float]:
    reply = srv.curl(srv.http + "/metrics")
    assert reply.status == 200 and reply.header("content-type").startswith("text/plain"), reply
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_gauges_move_with_an_enrollment_and_a_revocation(srv, tokens):
    before = scrape(srv)
    device = srv.ca.unique("metrics-pump")
    issued = srv.enroll(device, srv.ca.add_device(device))
    after = scrape(srv)
    assert value(after, "iomtca_certificates_issued_total", edge="est", kind="enrollment") == \
        value(before, "iomtca_certificates_issued_total", edge="est", kind="enrollment") + 1
    assert value(after, "iomtca_certificates", status="good") == value(before, "iomtca_certificates", status="good") + 1
    assert value(after, "iomtca_devices", status="active") == value(before, "iomtca_devices", status="active") + 1
    assert value(after, "iomtca_group_commit_size_count") > value(before, "iomtca_group_commit_size_count")
    assert value(after, "iomtca_request_seconds_count", listener="est",
                 route="/.well-known/est/simpleenroll") >= 1

    reply = post_json(srv, f"/api/v1/certificates/{issued.serial_hex}/revoke", {"reason": "keyCompromise"},
                      token=tokens["security"])
    assert reply.status == 200, reply
    revoked = scrape(srv)
    assert value(revoked, "iomtca_status_changes_total", change="revoked", reason="keyCompromise") == \
        value(after, "iomtca_status_changes_total", change="revoked", reason="keyCompromise") + 1
    assert value(revoked, "iomtca_certificates", status="revoked") == value(after, "iomtca_certificates",
                                                                              status="revoked") + 1
    assert value(revoked, "iomtca_certificates", status="good") == value(after, "iomtca_certificates", status="good") - 1

    refused = srv.est_post("simpleenroll", b"not a CSR", user=(device, "wrong-token"))
    assert refused.status >= 400
    last = scrape(srv)
    codes = {dict(labels).get("code") for (name, labels), v in last.items()
             if name == "iomtca_refusals_total" and dict(labels).get("edge") == "est" and v > 0}
    assert codes, "a refused enrollment is counted by its error code"


def test_service_and_ca_certificates_report_their_time_left(srv):
    samples = scrape(srv)
    left = {dict(labels)["certificate"]: v for (name, labels), v in samples.items()
            if name == "iomtca_certificate_expiry_seconds"}
    assert {"server", "OCSP responder", "issuing CA", "root CA"} <= set(left), left
    assert all(v > 0 for v in left.values()) and left["root CA"] > left["issuing CA"] > left["server"]
    assert value(samples, "iomtca_certificates_expiring", within="7d") >= value(
        samples, "iomtca_certificates_expiring", within="24h")


def test_health_and_readiness_and_a_database_that_takes_no_write(srv):
    alive = srv.curl(srv.http + "/healthz")
    assert alive.status == 200 and json.loads(alive.body)["status"] == "alive"
    ready = json.loads(srv.curl(srv.http + "/readyz").body)
    assert ready["ready"] is True and set(ready["checks"]) == {"database", "issuing_key", "ocsp_responder",
                                                               "certificates"}
    assert all(c["ok"] for c in ready["checks"].values()), ready
    # another process holds the write lock: readiness says so (within its 5 s bound), then recovers
    conn = sqlite3.connect(srv.ca.home / "iomtca.db", isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        blocked = srv.curl(srv.http + "/readyz", "--max-time", "20", allow_5xx=(503,))
        assert blocked.status == 503, blocked
        checks = json.loads(blocked.body)["checks"]
        assert not checks["database"]["ok"] and "5 s" in checks["database"]["detail"]
        assert checks["issuing_key"]["ok"]
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    deadline = time.monotonic() + 30
    while srv.curl(srv.http + "/readyz", allow_5xx=(503,)).status != 200:   # the blocked write went through meanwhile
        assert time.monotonic() < deadline, "readiness did not come back"
        time.sleep(0.5)


def test_each_request_is_one_access_line_without_its_query(srv, tokens):
    marker = srv.ca.unique("access")
    srv.curl(srv.http + f"/healthz?secret={marker}")
    srv.curl(srv.console + f"/api/v1/devices/{marker}", "--cacert", srv.ca.root,
             "-H", f"Authorization: Bearer {tokens['auditor']}")
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in srv.log.read_text().splitlines() if "iomtca.access" in line]
        if any(marker in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    health = [line for line in lines if " GET /healthz " in line]
    assert health and all("secret" not in line for line in lines), lines[-5:]
    [device_line] = [line for line in lines if f"/api/v1/devices/{marker}" in line]
    assert re.search(rf"console GET /api/v1/devices/{marker} 404 [0-9.]+ms source=127\.0\.0\.1 device={marker}",
                     device_line), device_line
    assert tokens["auditor"] not in srv.log.read_text()


def test_with_two_workers_a_scrape_counts_the_whole_server(start_server):
    srv = start_server("metrics-workers", enroll="workers = 2")
    enrolled = []

    def one(n: int) -> None:
        device = srv.ca.unique(f"w{n}")
        enrolled.append(srv.enroll(device, srv.ca.add_device(device)))
    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(enrolled) == 6
    totals = {value(scrape(srv), "iomtca_certificates_issued_total", edge="est", kind="enrollment")
              for _ in range(6)}   # whichever worker answers each scrape
    assert totals == {6.0}, totals
