"""Figure 9: resident size of the server and of the gateway with many devices and certificates
in the database, against the same processes with an empty registry (the baseline).

The realistic case is measured: the gateway publishes PKI (the default), so at start it fetches and
publishes the signed OCSP response of every unexpired certificate and keeps each one's refresh
time; the server signs all of them for it (and keeps up to `ocsp_cache_size` in its cache). Both
are measured once that start-up sweep is over, the server also after relying parties asked it
about thousands of certificates over plain OCSP.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cryptography import x509

from .common import Figure, Server, init_ca, rss_mb
from .ocsp_figure import load, requests_for
from .seed import seed
from .stack import Broker, Gateway, Watcher, last_in_sweep

NUMBERS = (9,)


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(home: Path, serials: list[int], work: Path, deadline: float, ocsp_touch: float) -> dict:
    issuer = x509.load_pem_x509_certificate((home / "issuing.pem").read_bytes())
    out: dict = {}
    last = last_in_sweep(home / "iomtca.db")
    with Broker(work) as broker, Server(home) as server:
        # relying parties ask about many certificates, so the response cache fills as in service
        if serials:
            asyncio.run(load(f"http://127.0.0.1:{server.http_port}/ocsp", requests_for(issuer, serials[:5000]),
                             ocsp_touch))
        time.sleep(0.3)
        out["server_alone"] = rss_mb(server.pid)
        watcher = Watcher(broker.port)
        try:
            if last:
                watcher.watch(last)
            started = time.monotonic()
            with Gateway(home, broker, server) as gateway:
                done = watcher.wait_for(last, None, deadline) if last else started
                out["startup_s"] = None if done is None else round(done - started, 1)
                time.sleep(1.0)
                out["gateway"] = rss_mb(gateway.pid)
                out["gateway_peak"] = peak_mb(gateway.pid)
                out["server"] = rss_mb(server.pid)
                out["server_peak"] = peak_mb(server.pid)
        finally:
            watcher.close()
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in out.items()}


def run(work: Path, quick: bool) -> list[Figure]:
    count = 1_000 if quick else 100_000
    deadline = 60.0 if quick else 900.0
    touch = 1.0 if quick else 3.0
    empty = init_ca(work / "fig9-empty")
    full = init_ca(work / "fig9-full")
    serials = seed(full / "iomtca.db", count, count // 100, (full / "issuing.pem").read_bytes())
    base = measure(empty, [], work / "fig9-broker-empty", deadline, touch)
    ours = measure(full, serials, work / "fig9-broker-full", deadline, touch)
    startup = (f"gateway start-up sweep over {count:,} certificates took {ours['startup_s']} s"
               if ours["startup_s"] is not None else f"gateway start-up sweep not finished within {deadline:.0f} s "
                                                     "(measured while it went on)")
    common = (f"{count:,} devices with one certificate each ({count // 100:,} revoked); measured after the gateway's "
              f"start-up sweep; {startup}; ratio > 1 is the cost of the data (lower is better)")
    return [
        Figure(9, f"Server resident memory, {count:,} devices and certificates (MB)", ours["server"],
               base["server"], "MB", "same server, empty registry", "< 200 MB", ours["server"] < 200,
               "python -m bench.run --only 9",
               notes=(f"{common}; server alone after {min(count, 5000):,} plain OCSP lookups {ours['server_alone']} MB "
                      f"(empty {base['server_alone']} MB), after signing every response for the gateway "
                      f"{ours['server']} MB (its OCSP cache holds up to ocsp_cache_size = 50,000 responses), "
                      f"peak {ours['server_peak']} MB"),
               runs={"ours": ours, "empty": base}),
        Figure(9, f"Gateway resident memory, {count:,} devices and certificates (MB)", ours["gateway"],
               base["gateway"], "MB", "same gateway, empty registry", "< 200 MB", ours["gateway"] < 200,
               "python -m bench.run --only 9",
               notes=f"{common}; PKI publishing on (default); peak {ours['gateway_peak']} MB",
               runs={"ours": ours, "empty": base}),
    ]
