"""CPU per item of the RA batch path, in one process: `enroll/ra_batch._one` (a relayed enrollment
and the new certificate's OCSP response, as `POST /ra/v1/batch` runs each item) over a fresh CA and
a real Publisher, in groups of 128 run concurrently as the handler runs them. No HTTP, TLS or JSON:
what the CA's event loop spends on issuance itself (bench/PROFILES.md has runs).

    python -m bench.batch_cpu [N]          (N = 2048)
    python -m bench.batch_cpu N profile    (and cProfile's top entries)
"""
from __future__ import annotations

import asyncio
import base64
import cProfile
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ca.authority import Authority
from ca.signer import generate_key
from enroll import ra_batch
from enroll.publication import Publisher
from firmware_sim.est_client import make_csr

from .common import IOMTCA
from .mqtt_storm import register

GROUP = 128


async def measure(home: Path, tokens: dict[str, str], profile: bool) -> str:
    items = [{"op": "simpleenroll", "device_id": d, "token": t, "request_id": "r1",
              "csr": base64.b64encode(make_csr(generate_key("ec-p256"), d).public_bytes(
                  serialization.Encoding.DER)).decode()} for d, t in tokens.items()]   # before the clock
    async with await Authority.open(home) as authority:
        publisher = Publisher(authority, cache_size=len(items) * 2, poll=timedelta(seconds=3600))
        await publisher.start()
        warm, items = items[:GROUP], items[GROUP:]
        await asyncio.gather(*(ra_batch._one(authority, publisher, i, item) for i, item in enumerate(warm)))
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(items), GROUP):
            group = items[start:start + GROUP]
            results = await asyncio.gather(*(ra_batch._one(authority, publisher, i, item) for i, item in enumerate(group)))
            assert all(r["status"] == "ok" and r.get("ocsp") for r in results), results[0]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    n = len(items)
    return f"{n} batch items: {wall * 1000 / n:.3f} ms wall, {cpu * 1000 / n:.3f} ms CPU per item"


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 2048
    with tempfile.TemporaryDirectory(prefix="iomtca-batchcpu-") as tmp:
        home = Path(tmp) / "ca"
        subprocess.run([IOMTCA, "init", "--dir", str(home), "--base-url", "http://127.0.0.1:8080"], check=True,
                       stdout=subprocess.DEVNULL)
        tokens = register(home / "iomtca.db", n + GROUP)
        # INFO, as `iomtca serve` logs, to nowhere: the formatting is paid, the terminal is not
        logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        print(asyncio.run(measure(home, tokens, "profile" in argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
