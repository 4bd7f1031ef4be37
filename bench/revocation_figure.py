"""Figure 6: revocation latency. With many certificates in the database, the real `iomtca serve`,
a private mosquitto and the real `iomtca gateway` run; the operator's `iomtca cert revoke` CLI
revokes one certificate at a time, and from the moment it returns we measure when the revoked
status is visible (1) in an OCSP answer from the server, (2) in the server's /crl, (3) in the
retained `iomt/v1/pki/ocsp/{serial}` message a subscriber receives.

OCSP and /crl are polled (POLL_S apart: that bounds their resolution); the MQTT subscriber is
told by the broker, so its time is the arrival time. There is no baseline process: the bar is
absolute (p99 under 1 s).
"""
from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path

import aiohttp
from cryptography import x509

from .common import IOMTCA, Figure, Server, init_ca
from .ocsp_figure import fetch, requests_for
from .seed import seed
from .stack import Broker, Gateway, Watcher, last_in_sweep, status_of

NUMBERS = (6,)
# What bounds the latency, by design (the bar was met in the runs so far, so no profile of a miss):
MISS = ("where the time goes: the server learns of a revocation made by the CLI (another process) by polling the "
        "store's status-change feed every `status_poll` (250 ms), then drops the cached OCSP answers, wakes the "
        "gateway's long poll and re-signs the CRL; the gateway then fetches the new response over the RA API and "
        "publishes it. Samples far above 250 ms point at a busy server (the gateway's 30 s sweep over every "
        "certificate, or its start-up publication); what would move it: a shorter status_poll, or the CLI "
        "notifying the server (e.g. a NOTIFY-style wake-up on a local socket) instead of being polled for.")
POLL_S = 0.01
DEADLINE_S = 10.0        # per revocation and channel: not visible by then counts as DEADLINE_S
SPACING_S = 0.3          # between revocations


async def _observe(http_url: str, request_der: bytes, serial: int, deadline: float,
                   channels: set[str]) -> dict[str, float]:
    seen: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as session:
        async def ocsp() -> None:
            while time.monotonic() < deadline:
                async with session.post(http_url + "/ocsp", data=request_der,
                                        headers={"Content-Type": "application/ocsp-request"}) as r:
                    body = await r.read()
                if status_of(body) == "revoked":
                    seen["ocsp"] = time.monotonic()
                    return
                await asyncio.sleep(POLL_S)

        async def crl() -> None:
            while time.monotonic() < deadline:
                async with session.get(http_url + "/crl") as r:
                    body = await r.read()
                if x509.load_der_x509_crl(body).get_revoked_certificate_by_serial_number(serial) is not None:
                    seen["crl"] = time.monotonic()
                    return
                await asyncio.sleep(POLL_S)

        await asyncio.gather(*([ocsp()] if "ocsp" in channels else []), *([crl()] if "crl" in channels else []))
    return seen


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(work: Path, quick: bool) -> list[Figure]:
    count, samples = (1_000, 6) if quick else (100_000, 40)
    startup_deadline = 60.0 if quick else 900.0
    home = init_ca(work / "fig6")
    serials = seed(home / "iomtca.db", count, count // 100, (home / "issuing.pem").read_bytes())
    issuer = x509.load_pem_x509_certificate((home / "issuing.pem").read_bytes())
    good = serials[count // 100:]
    chosen = [good[i * len(good) // samples] for i in range(samples)]
    latency: dict[str, list[float]] = {"ocsp": [], "crl": [], "mqtt": []}
    timeouts = {k: 0 for k in latency}
    early = {k: 0 for k in latency}   # visible at or before the CLI returned (its exit takes a while)
    last = last_in_sweep(home / "iomtca.db")
    with Broker(work / "fig6-broker") as broker, Server(home) as server:
        http_url = f"http://127.0.0.1:{server.http_port}"
        watcher = Watcher(broker.port)
        try:
            watcher.watch(last)
            started = time.monotonic()
            with Gateway(home, broker, server):
                # the start-up sweep publishes every unexpired certificate's OCSP response, in serial order
                done_at = watcher.wait_for(last, None, startup_deadline)
                startup = (done_at - started) if done_at else None
                time.sleep(1.0)  # let the last publications and the gateway's first CRL settle
                for i, serial in enumerate(chosen):
                    # a /crl request makes the server catch up with the store at once, which would
                    # speed up the other channels: /crl is measured on revocations of its own
                    channels = {"ocsp", "mqtt"} if i % 2 == 0 else {"crl"}
                    hexs = format(serial, "x")
                    watcher.watch(hexs)
                    watcher.wait_for(hexs, "good", 10)
                    request_der = requests_for(issuer, [serial])[0]
                    # a relying party that asked before: the server holds a cached "good" answer, so
                    # what is measured is that answer being replaced, not a first, fresh signature
                    if status_of(fetch(http_url + "/ocsp", request_der, "POST")) != "good":
                        raise RuntimeError(f"serial {hexs} is not good before its revocation")
                    subprocess.run([IOMTCA, "cert", "revoke", hexs, "--dir", str(home), "--reason",
                                    "keyCompromise"], check=True, stdout=subprocess.DEVNULL, timeout=60)
                    t0 = time.monotonic()
                    seen = asyncio.run(_observe(http_url, request_der, serial, t0 + DEADLINE_S, channels))
                    if "mqtt" in channels:
                        seen["mqtt"] = watcher.wait_for(hexs, "revoked",
                                                        max(0.0, t0 + DEADLINE_S - time.monotonic()))
                    for channel in channels:
                        at = seen.get(channel)
                        if at is None:
                            timeouts[channel] += 1
                            latency[channel].append(DEADLINE_S * 1000)
                        else:
                            # the MQTT message may arrive while the CLI process is still exiting: 0
                            latency[channel].append(max(0.0, at - t0) * 1000)
                            early[channel] += at <= t0 + POLL_S
                    watcher.unwatch(hexs)
                    time.sleep(SPACING_S)
        finally:
            watcher.close()
    startup_note = (f"gateway start-up published {count:,} retained OCSP responses in {startup:.1f} s "
                    f"(waited for before measuring)" if startup is not None else
                    f"gateway start-up publication of {count:,} responses not finished within {startup_deadline:.0f} s "
                    f"(measured anyway, while it went on)")
    base_note = (f"{count:,} certificates ({count // 100:,} revoked, so the CRL has {count // 100:,}+ entries); "
                 f"{samples} revocations by `iomtca cert revoke` (subprocess), {SPACING_S} s apart, half measuring "
                 f"OCSP and MQTT, half /crl; latency from the CLI returning")
    names = {"ocsp": ("OCSP answer from the server", f"polled every {POLL_S * 1000:.0f} ms (resolution), the "
                      "same request asked once before the revocation (its good answer cached, as for a relying "
                      "party that asked before); the server's status follower polls the store every 250 ms"),
             "crl": ("/crl from the server", f"polled every {POLL_S * 1000:.0f} ms (resolution); a /crl request "
                     "makes the server catch up with the store's status changes (one indexed read), so this is "
                     "bounded by how often /crl is asked, not by the 250 ms follower; measured on every other "
                     "revocation, the others measure OCSP and MQTT without /crl requests"),
             "mqtt": ("retained MQTT OCSP message", "subscriber time of arrival (no polling); the gateway "
                      "long-polls the CA's status-change feed, then fetches and publishes the response; "
                      + startup_note)}
    figures = []
    for channel, (label, how) in names.items():
        values = latency[channel]
        p50, p99 = statistics.median(values), _pct(values, 0.99)
        met = p99 < 1000 and not timeouts[channel]
        figures.append(Figure(
            6, f"Revocation latency to {label}, {count:,} certificates (p99 ms)", round(max(p99, 0.1), 1), None,
            "ms", "none (absolute bar)", "p99 < 1 s", met, "python -m bench.run --only 6",
            notes=f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {max(values):.0f} ms ({early[channel]} of {len(values)} "
                  f"already visible when the CLI returned, counted as 0 to {POLL_S * 1000:.0f} ms); {how}; {base_note}"
                  + (f"; {timeouts[channel]} not visible within {DEADLINE_S:.0f} s" if timeouts[channel] else ""),
            miss="" if met else MISS,
            runs={"ms": [round(v, 1) for v in values], "gateway_startup_s": startup and round(startup, 1)}))
    return figures
