"""Figure 9: resident size of the server with many devices and certificates in the database,
against the same server with an empty registry (the baseline)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cryptography import x509

from .common import Figure, Server, init_ca, rss_mb
from .ocsp_figure import load, requests_for
from .seed import seed

NUMBERS = (9,)


def measure(home: Path, serials: list[int]) -> float:
    issuer = x509.load_pem_x509_certificate((home / "issuing.pem").read_bytes())
    with Server(home) as server:
        if serials:
            # touch OCSP for many certificates so the response cache fills as in service
            asyncio.run(load(f"http://127.0.0.1:{server.http_port}/ocsp", requests_for(issuer, serials[:5000]), 3.0))
        time.sleep(0.5)
        return rss_mb(server.pid)


def run(work: Path, quick: bool) -> Figure:
    count = 10_000 if quick else 100_000
    empty = init_ca(work / "fig9-empty")
    full = init_ca(work / "fig9-full")
    serials = seed(full / "iomtca.db", count, count // 100, (full / "issuing.pem").read_bytes())
    base, ours = measure(empty, []), measure(full, serials)
    return Figure(9, f"Server resident memory, {count:,} devices and certificates (MB)", round(ours, 1),
                  round(base, 1), "MB", "same server, empty registry", "< 200 MB", ours < 200,
                  "python -m bench.run --only 9",
                  notes="gateway memory not measured yet; ratio > 1 is the cost of the data (lower is better)")
