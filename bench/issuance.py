"""Figure 1: certificates/s through Authority.enroll (CSR, PoP, policy, build, sign, persist, audit)
against the raw cryptography build-and-sign of the same certificate in the same process."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ca import profiles
from ca.authority import Authority, OperatorAuth
from ca.issuance import issue_device_certificate, new_serial
from ca.registry import new_device
from ca.timefmt import utc_now

from .common import Figure, amedian_of, init_ca, make_csr

NUMBERS = (1,)


async def measure(home: Path, n: int, runs: int) -> Figure:
    csrs = [make_csr() for _ in range(n)]
    async with await Authority.open(home) as authority:
        await authority.registry.add(new_device("bench-1", model="m", owner="o"), actor="bench")
        device = await authority.registry.get("bench-1")

        async def ours_sequential() -> float:
            start = time.perf_counter()
            for csr in csrs:
                await authority.enroll("bench-1", csr, OperatorAuth("bench"))
            return n / (time.perf_counter() - start)

        async def ours_concurrent() -> float:
            gate = asyncio.Semaphore(8)

            async def one(csr):
                async with gate:
                    await authority.enroll("bench-1", csr, OperatorAuth("bench"))
            start = time.perf_counter()
            await asyncio.gather(*(one(csr) for csr in csrs))
            return n / (time.perf_counter() - start)

        async def raw() -> float:
            start = time.perf_counter()
            for csr in csrs:
                issue_device_certificate(csr, device, profiles.DEVICE, authority.issuer,
                                         trust_domain=authority.config.trust_domain, serial=new_serial(),
                                         now=utc_now())
            return n / (time.perf_counter() - start)

        raw_rate, raw_runs = await amedian_of(runs, raw)
        seq_rate, seq_runs = await amedian_of(runs, ours_sequential)
        con_rate, con_runs = await amedian_of(runs, ours_concurrent)
    best = max(seq_rate, con_rate)
    return Figure(
        1, "Issuance core (certificates/s)", round(best, 1), round(raw_rate, 1), "certs/s",
        "raw cryptography build+sign, same process", ">= 0.6 x raw", best / raw_rate >= 0.6,
        "python -m bench.run --only 1",
        notes=(f"sequential {seq_rate:.0f}/s, 8-way concurrent {con_rate:.0f}/s (one transaction per "
               f"certificate, synchronous=FULL); {n} certificates per run, median of {runs}"),
        runs={"raw": raw_runs, "sequential": seq_runs, "concurrent": con_runs})


def run(work: Path, quick: bool) -> Figure:
    home = init_ca(work / "fig1")
    return asyncio.run(measure(home, 100 if quick else 500, 3))
