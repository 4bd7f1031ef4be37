"""`iomtca serve`: run the HTTPS (EST, RA API) and plain-HTTP (OCSP, CRL) listeners until signalled."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from ca.authority import Authority

from .app import create_app, create_responder_app
from .channel_binding import exporter_available
from .config import load_enroll_config, parse_listen
from .publication import Publisher
from .tls import server_context

log = logging.getLogger(__name__)


async def serve(home: Path, *, listen: str | None = None, http_listen: str | None = None) -> None:
    authority = await Authority.open(home)
    config = load_enroll_config(authority.paths)
    config = replace(config, listen=listen or config.listen, http_listen=http_listen or config.http_listen)
    publisher = Publisher(authority, cache_size=config.ocsp_cache_size, poll=config.status_poll)
    await publisher.start()
    await authority.responder()  # rotate the OCSP responder now if due, not on a first request
    if config.channel_binding and not exporter_available():  # self-check now, not on a first request
        log.warning("TLS 1.3 channel binding (tls-exporter) is unavailable; profiles %s need TLS 1.2",
                    ", ".join(sorted(config.channel_binding)))
    keygen = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    follower = asyncio.create_task(publisher.follow(), name="status-follower")
    attendance = asyncio.create_task(_attendance(authority), name="attendance")
    runners = []
    try:
        ssl_ctx = server_context(authority.paths, config, authority.key_passphrase)
        for app, address, ctx in (
            (create_app(authority, config, publisher, keygen), config.listen, ssl_ctx),
            (create_responder_app(authority, config, publisher), config.http_listen, None),
        ):
            # shutdown_timeout: long polls from the gateway must not hold up a stop for their 25 s
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0,
                                   access_log=log if log.isEnabledFor(logging.DEBUG) else None)
            await runner.setup()
            host, port = parse_listen(address)
            await web.TCPSite(runner, host, port, ssl_context=ctx, backlog=1024).start()
            runners.append(runner)
        est_url = _url("https", runners[0])
        ocsp_url = _url("http", runners[1])
        # one machine-readable line: tests and scripts wait for it instead of sleeping
        print(f"iomtca serve: listening est={est_url} ocsp={ocsp_url}", flush=True)
        await _until_signalled()
    finally:
        for task in (follower, attendance):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in reversed(runners):
            await runner.cleanup()
        keygen.shutdown(cancel_futures=True)
        await authority.close()


async def _attendance(authority: Authority) -> None:
    """Put devices away longer than their non-attendance period on hold, every `check_every`."""
    while True:
        await asyncio.sleep(authority.config.attendance.check_every.total_seconds())
        try:
            await authority.enforce_attendance()
        except Exception:
            log.exception("attendance check failed; retrying next period")


def _url(scheme: str, runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
