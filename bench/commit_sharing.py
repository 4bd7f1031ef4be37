"""Do relayed enrollments share the CA store's group commits when run concurrently, as the RA
batch call (enroll/ra_batch.py) runs its items? N through `Authority.enroll` one after another,
then N at once (asyncio.gather), on a fresh CA; store commits counted and CPU per enrollment.

    python -m bench.commit_sharing [N]        (N = 256; bench/PROFILES.md has a run)
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ca.authority import Authority
from ca.credentials import TokenAuth
from ca.signer import generate_key
from ca.store.sqlite import SQLiteStore
from firmware_sim.est_client import make_csr

from .common import IOMTCA
from .mqtt_storm import register


async def measure(home: Path, tokens: dict[str, str], concurrent: bool) -> str:
    commits = 0
    commit = SQLiteStore._commit

    async def counted(self) -> None:
        nonlocal commits
        commits += 1
        await commit(self)

    csrs = {d: make_csr(generate_key("ec-p256"), d) for d in tokens}   # before the clock
    SQLiteStore._commit = counted   # this process only, for this measurement
    try:
        async with await Authority.open(home) as authority:
            calls = (authority.enroll(d, csrs[d], TokenAuth(t), request_id="c1") for d, t in tokens.items())
            wall, cpu = time.perf_counter(), time.process_time()
            if concurrent:
                await asyncio.gather(*calls)
            else:
                for call in calls:
                    await call
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        SQLiteStore._commit = commit
    n = len(tokens)
    return (f"{'concurrent' if concurrent else 'one by one'}: {n} enrollments, {commits} commits, "
            f"{wall * 1000 / n:.2f} ms wall and {cpu * 1000 / n:.2f} ms CPU per enrollment")


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 256
    with tempfile.TemporaryDirectory(prefix="iomtca-commits-") as tmp:
        home = Path(tmp) / "ca"
        subprocess.run([IOMTCA, "init", "--dir", str(home), "--base-url", "http://127.0.0.1:8080"], check=True,
                       stdout=subprocess.DEVNULL)
        tokens = register(home / "iomtca.db", 2 * n)
        ids = list(tokens)
        print(asyncio.run(measure(home, {d: tokens[d] for d in ids[:n]}, concurrent=False)))
        print(asyncio.run(measure(home, {d: tokens[d] for d in ids[n:]}, concurrent=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
