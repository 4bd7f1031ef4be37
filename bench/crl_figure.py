"""Figure 5: CRL generation through Authority.crl() with 10k and 100k revoked entries, against
cryptography's CRL builder fed one entry at a time (the naive way, quadratic) on the same entries."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca.authority import Authority

from .common import Figure, init_ca, median_of
from .seed import seed

NUMBERS = (5,)


def naive(issuer: x509.Certificate, key, serials: list[int]) -> float:
    now = datetime.now(timezone.utc)
    start = time.perf_counter()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
               .last_update(now).next_update(now + timedelta(days=1)))
    for s in serials:
        entry = (x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now)
                 .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
        builder = builder.add_revoked_certificate(entry)
    builder.sign(key, hashes.SHA256())
    return time.perf_counter() - start


async def ours(home: Path, runs: int) -> tuple[float, list[float], int]:
    async with await Authority.open(home) as authority:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            der = await authority.crl()
            times.append(time.perf_counter() - start)
        count = len(x509.load_der_x509_crl(der))
        return sorted(times)[len(times) // 2], times, count


def run(work: Path, quick: bool) -> list[Figure]:
    figures = []
    for size in ((2_000, 10_000) if quick else (10_000, 100_000)):
        home = init_ca(work / f"fig5-{size}")
        der = (home / "issuing.pem").read_bytes()
        serials = seed(home / "iomtca.db", size, size, der)
        ours_s, ours_runs, listed = asyncio.run(ours(home, 3))
        assert listed == size, f"CRL lists {listed} of {size}"
        with asyncio.Runner() as runner:
            async def issuer():
                async with await Authority.open(home) as a:
                    return a.issuer.certificate, a.issuer.signer.private_key
            cert, key = runner.run(issuer())
        naive_n = min(size, 10_000)  # the naive builder is quadratic: 100k would take minutes
        naive_s, naive_runs = median_of(1, lambda: naive(cert, key, serials[:naive_n]))
        comparable = naive_n == size
        figures.append(Figure(
            5, f"CRL generation, {size:,} revoked (seconds)", round(ours_s, 3),
            round(naive_s, 3) if comparable else None, "s",
            "cryptography builder, one entry at a time" if comparable else
            f"none at this size (the naive builder took {naive_s:.2f} s for {naive_n:,})",
            "100k in < 0.5 s" if size >= 100_000 else "-", (ours_s < 0.5) if size >= 100_000 else None,
            "python -m bench.run --only 5",
            notes=("whole Authority.crl(): read the revocations, encode, sign; median of 3. "
                   "Ratio < 1 is better here (time, not rate)"),
            runs={"ours": ours_runs, "naive": naive_runs}))
    return figures
