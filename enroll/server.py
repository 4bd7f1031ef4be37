"""`iomtca serve`: run the HTTPS (EST, RA API) and plain-HTTP (OCSP, CRL) listeners until signalled.

With `--workers N` (or `[enroll] workers`) above 1, this process becomes a supervisor: it reads
the CA passphrase once, runs the database migrations and rotates the OCSP responder if due, binds
both listening sockets itself and starts N worker processes (`python -m enroll.server --worker`)
that inherit those sockets (pass_fds) and get the passphrase on a pipe. Each worker runs the same
aiohttp applications on the shared sockets. See docs/EST.md "Several worker processes".

Service certificates: the server certificate (and the OCSP responder) is renewed at start when due,
then by worker 0 at each renewal point (`ca/service_certs.py`); every worker watches server.pem and
server.key and gives new connections the new certificate without a restart (docs/EST.md "Service
certificates").
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from aiohttp import web

from ca import audit_anchor
from ca.authority import Authority
from ca.config import CAPaths, load_config
from ca.errors import CAError, ConfigError
from ca.keystore import read_passphrase
from common import logsafe
from ca.service_certs import renew_at, renew_server_certificate, server_renewal_point

from console.app import create_console_app
from console.config import load_console_config

from .app import create_app, create_responder_app
from .channel_binding import exporter_available
from .config import EnrollConfig, load_enroll_config, parse_listen
from .limits import ConnectionCounter, ensure_descriptors
from .publication import Publisher
from .tls import ServerContext

log = logging.getLogger("enroll.server")  # also when run as __main__ (a worker)

# How long workers get to start (import, open the database, load keys) and to stop.
WORKER_START_TIMEOUT = 60.0
WORKER_STOP_TIMEOUT = 10.0
READY = "ready"
# The renewal task wakes at the next renewal point, or after this long at the latest.
RENEWAL_CHECK_MAX_S = 60.0
RENEWAL_RETRY_S = 5.0


class Listeners(NamedTuple):
    """The listening sockets of each listener (one per address its host resolves to)."""

    est: list[socket.socket]       # HTTPS: EST, the RA API
    http: list[socket.socket]      # plain HTTP: OCSP and CRL
    console: list[socket.socket]   # HTTPS: the web console and the admin API (console/)

    def all(self) -> list[socket.socket]:
        return self.est + self.http + self.console


async def serve(home: Path, *, listen: str | None = None, http_listen: str | None = None,
                console_listen: str | None = None, workers: int | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit status (non-zero when a worker died)."""
    paths = CAPaths(Path(home))
    passphrase = read_passphrase(load_config(paths).passphrase_file)  # the one read of the passphrase
    config = load_enroll_config(paths)
    config = replace(config, listen=listen or config.listen, http_listen=http_listen or config.http_listen,
                     workers=workers or config.workers)
    console_listen = console_listen or load_console_config(paths).listen
    parse_listen(console_listen)
    # refuse a connection limit this process could not keep, on each of its listeners
    ensure_descriptors(config.connections, len(Listeners._fields))
    # Opening the authority runs the migrations; the responder is rotated now if due (not on a
    # first request, and not by N workers at once).
    authority = await Authority.open(home, passphrase=passphrase)
    try:
        await authority.responder()
        await _renew_server_certificate(authority, at_start=True)
        listeners = Listeners(bind(config.listen), bind(config.http_listen), bind(console_listen))
    except BaseException:
        await authority.close()
        raise
    urls = (_url("https", listeners.est[0]), _url("http", listeners.http[0]), _url("https", listeners.console[0]))
    if config.workers == 1:
        await run_worker(authority, config, listeners, index=0, duties=True, ready=lambda: _print_listening(*urls))
        return 0
    await authority.close()
    try:
        return await _supervise(Path(home), config, passphrase, listeners, urls)
    finally:
        for sock in listeners.all():
            sock.close()


def bind(address: str) -> list[socket.socket]:
    """Listening sockets for HOST:PORT (one per address the host resolves to, as asyncio does)."""
    host, port = parse_listen(address)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE):
            if (family, sockaddr[:2]) in seen:
                continue
            seen.add((family, sockaddr[:2]))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
            sock.listen(1024)
            sock.set_inheritable(True)
            if port == 0:  # the OS picked a port: the other addresses of this host take the same one
                port = sock.getsockname()[1]
    except socket.gaierror as exc:
        raise ConfigError(f"listen address {address!r}: {exc}") from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _url(scheme: str, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _print_listening(est_url: str, ocsp_url: str, console_url: str) -> None:
    # machine-readable lines: tests and scripts wait for the first instead of sleeping
    print(f"iomtca serve: listening est={est_url} ocsp={ocsp_url}", flush=True)
    print(f"iomtca serve: console={console_url}", flush=True)


# -- one worker: the aiohttp applications on (possibly shared) listening sockets -------------------

async def run_worker(authority: Authority, config: EnrollConfig, listeners: Listeners, *, index: int,
                     duties: bool, ready) -> None:
    """Serve until signalled. `duties`: this worker also runs the once-per-server background tasks."""
    publisher = Publisher(authority, cache_size=config.ocsp_cache_size, poll=config.status_poll)
    await publisher.start()
    if config.channel_binding and not exporter_available() and duties:  # self-check now, not on a first request
        log.warning("TLS 1.3 channel binding (tls-exporter) is unavailable; profiles %s need TLS 1.2",
                    ", ".join(sorted(config.channel_binding)))
    keygen = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    tasks = [asyncio.create_task(publisher.follow(), name="status-follower")]
    if duties:  # once per server, not once per worker
        tasks.append(asyncio.create_task(_attendance(authority), name="attendance"))
        tasks.append(asyncio.create_task(audit_anchor.anchor_task(authority), name="audit-anchor"))
        tasks.append(asyncio.create_task(_anonymous_failures(authority), name="anonymous-failure-audit"))
    runners = []
    try:
        server_ctx = ServerContext(authority.paths, config, authority.key_passphrase)
        # the console asks for no client certificate (people log in); the same server certificate
        console_ctx = ServerContext(authority.paths, config, authority.key_passphrase, client_certs=False)
        tls_sites: dict[ServerContext, list[SharedSocketSite]] = {server_ctx: [], console_ctx: []}
        for app, socks, tls in (
            (create_app(authority, config, publisher, keygen), listeners.est, server_ctx),
            (create_responder_app(authority, config, publisher), listeners.http, None),
            (create_console_app(authority, load_console_config(authority.paths), config), listeners.console,
             console_ctx),
        ):
            ctx = tls.context if tls is not None else None
            # shutdown_timeout: long polls from the gateway must not hold up a stop for their 25 s
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0,
                                   access_log=log if log.isEnabledFor(logging.DEBUG) else None,
                                   **config.connections.runner_args())
            await runner.setup()
            runners.append(runner)
            counter = ConnectionCounter(config.connections, config.trusted_proxies)   # one per listener
            _count_connections(runner.server, counter)
            for sock in socks:
                site = SharedSocketSite(runner, sock, ssl_context=ctx, counter=counter)
                await site.start()
                if tls is not None:
                    tls_sites[tls].append(site)
        certificates = _ServerCertificate(tls_sites, index)
        tasks.append(asyncio.create_task(certificates.follow(), name="server-certificate-reload"))
        if duties:  # one renewal per due point, not one per worker
            tasks.append(asyncio.create_task(_renew_service_certificates(authority, certificates),
                                             name="service-certificate-renewal"))
        log.info("worker %d (pid %d) serving", index, os.getpid())
        ready()
        await _until_signalled()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in reversed(runners):
            await runner.cleanup()
        keygen.shutdown(cancel_futures=True)
        if duties:   # the head as the server leaves it; a failure is logged, never raised
            await audit_anchor.final_anchor(authority)
        await authority.close()


class SharedSocketSite(web.SockSite):
    """An aiohttp site on a listening socket that other worker processes accept on too.

    asyncio's own server accepts every queued connection on each wake-up, so with several
    workers on one socket, whichever wakes first takes a whole burst (8 keep-alive clients could
    all land on one worker). This site accepts one connection per wake-up: a busy worker comes
    back to the socket later, and an idle one takes the next connection.
    """

    def __init__(self, runner, sock, *, ssl_context=None, counter: ConnectionCounter) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._counter = counter

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with its runner
        self._server = _Acceptor(self._sock, self._runner.server, self._ssl_context, self._counter)

    def use_ssl_context(self, ssl_context) -> None:
        """New connections get `ssl_context` (a renewed certificate); open ones keep theirs."""
        self._ssl_context = ssl_context
        if self._server is not None:
            self._server.ssl_context = ssl_context


class _Acceptor:
    """Accepts for one site within [enroll.connections] (enroll/limits.py): a connection over its
    source's limit is closed at once, and at `max_connections` this process stops accepting until
    one of its connections closes."""

    def __init__(self, sock: socket.socket, server: web.Server, ssl_context, counter: ConnectionCounter) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = server
        self.ssl_context = ssl_context   # read once per connection: a swap reaches new connections
        self._counter = counter
        self._handshake_timeout = counter.limits.handshake_timeout
        self._tasks: set[asyncio.Task] = set()
        self._reading = False
        self.sockets = (sock,)
        sock.setblocking(False)
        counter.on_release(self._resume)
        self._resume()

    def _accept(self) -> None:
        try:
            conn, peer = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return   # another worker took it
        except OSError as exc:   # out of file descriptors and the like: stop accepting for a second
            log.warning("accept failed (%s); pausing for 1 s", exc)
            self._pause()
            self._loop.call_later(1.0, self._resume)
            return
        source = _source(peer)
        if not self._counter.admit(source):
            conn.close()
            return
        if self._counter.full():
            self._pause()   # resumed by a connection's end (_count_connections)
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn, source))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _resume(self) -> None:
        if not self._reading and self._sock.fileno() >= 0 and not self._counter.full():
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    async def _connect(self, conn: socket.socket, source: str) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self.ssl_context,
                                                     ssl_handshake_timeout=self._handshake_timeout
                                                     if self.ssl_context is not None else None)
        except BaseException as exc:   # failed TLS handshakes: the client's problem, as in asyncio's server
            log.debug("connection dropped before a request: %s", exc)
            conn.close()
            self._counter.release(source)   # never reached the server's connection_made
            if not isinstance(exc, Exception):
                raise

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._pause()
            self._sock.close()   # this process's descriptor; other workers keep theirs
        for task in self._tasks:
            task.cancel()


def _source(peer) -> str:
    return peer[0] if isinstance(peer, tuple) and peer else "unknown"


def _count_connections(server: web.Server, counter: ConnectionCounter) -> None:
    """Release a connection's count when aiohttp's server sees it end. aiohttp's request handler
    reports its start and end to the server (connection_made/connection_lost), and those are
    the only hooks it has; every site of one listener shares its server and its counter."""
    sources: dict[object, str] = {}
    made, lost = server.connection_made, server.connection_lost

    def connection_made(handler, transport) -> None:
        sources[handler] = _source(transport.get_extra_info("peername"))
        made(handler, transport)

    def connection_lost(handler, exc=None) -> None:
        lost(handler, exc)
        source = sources.pop(handler, None)
        if source is not None:
            counter.release(source)

    server.connection_made, server.connection_lost = connection_made, connection_lost


class _ServerCertificate:
    """This worker's view of server.pem/server.key: polled, and swapped into its TLS sites (each
    TLS listener has its own context: the console's asks for no client certificate)."""

    def __init__(self, sites: dict[ServerContext, list[SharedSocketSite]], index: int) -> None:
        self._sites, self._index = sites, index

    def reload(self) -> bool:
        reloaded = None
        for ctx, sites in self._sites.items():
            context = ctx.reload()
            if context is None:
                continue
            for site in sites:
                site.use_ssl_context(context)
            reloaded = ctx
        if reloaded is None:
            return False
        log.info("worker %d reloaded the server certificate serial=%x: new connections get it", self._index,
                 reloaded.serial or 0)
        return True

    async def follow(self) -> None:
        first = next(iter(self._sites))
        while True:
            await asyncio.sleep(first.poll_interval())
            try:
                self.reload()
            except Exception:
                log.exception("reloading the server certificate failed; retrying at the next poll")


def _now() -> datetime:
    # the renewal schedule uses the precise time: the Authority's clock has whole seconds
    return datetime.now(timezone.utc)


async def _renew_server_certificate(authority: Authority, *, at_start: bool = False) -> bool:
    """At start, before any worker loads it: a failure is logged and the current one served."""
    try:
        return await renew_server_certificate(authority, _now(), check_key=at_start)
    except CAError as exc:
        log.error("could not renew the server certificate at start: %s; serving the current one", exc)
        return False


async def _renew_service_certificates(authority: Authority, certificates: _ServerCertificate) -> None:
    """Worker 0: renew the server certificate and rotate the OCSP responder at their renewal
    points (checked at least every minute, so a short lifetime or a changed file is seen)."""
    while True:
        delay = RENEWAL_RETRY_S
        try:
            if await renew_server_certificate(authority, _now()):
                certificates.reload()   # this worker at once; the others at their next poll
            responder = await authority.responder()   # rotates the responder when it is due
            points = [p for p in (server_renewal_point(authority), renew_at(responder.certificate)) if p]
            delay = (min(points) - _now()).total_seconds() if points else RENEWAL_RETRY_S
        except CAError as exc:
            log.error("service certificate renewal failed: %s; retrying in %.0f s", exc, RENEWAL_RETRY_S)
        except Exception:
            log.exception("service certificate renewal failed; retrying in %.0f s", RENEWAL_RETRY_S)
        await asyncio.sleep(min(max(delay, 0.25), RENEWAL_CHECK_MAX_S))


async def _attendance(authority: Authority) -> None:
    """Put devices away longer than their non-attendance period on hold, every `check_every`."""
    while True:
        await asyncio.sleep(authority.config.attendance.check_every.total_seconds())
        try:
            await authority.enforce_attendance()
        except Exception:
            log.exception("attendance check failed; retrying next period")


async def _anonymous_failures(authority: Authority) -> None:
    """Audit failed anonymous logins per source and ended window (ca/failures.py), every minute."""
    while True:
        await asyncio.sleep(60)
        try:
            await authority.audit_anonymous_failures()
        except Exception:
            log.exception("auditing failed anonymous logins failed; retrying in a minute")


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")


# -- the supervisor of several workers ------------------------------------------------------------

async def _supervise(home: Path, config: EnrollConfig, passphrase: bytes, listeners: Listeners,
                     urls: tuple[str, str, str]) -> int:
    """Start the workers, print the listening line once all are up, stop them all on a signal.
    A worker that dies takes the server down with a non-zero status (no restart: see docs/EST.md)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fds = [s.fileno() for s in listeners.all()]
    argv_tail = ["--dir", str(home), *[arg for name, socks in zip(("est", "http", "console"), listeners)
                                       for arg in (f"--{name}-fds", ",".join(str(s.fileno()) for s in socks))],
                 "--log-level", str(logging.getLogger().getEffectiveLevel()),
                 "--log-format", "json" if _json_logs() else "text"]
    workers: list[asyncio.subprocess.Process] = []
    # every worker's counters in files of one directory, added up by a scrape (enroll/metrics.py)
    metrics_dir = tempfile.TemporaryDirectory(prefix="iomtca-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir.name}
    try:
        for index in range(config.workers):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "enroll.server", "--worker", str(index), *argv_tail,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=fds, env=env)
            workers.append(proc)
            proc.stdin.write(passphrase + b"\n")
            await proc.stdin.drain()
            proc.stdin.close()
        await _wait_ready(workers, stop)
        if stop.is_set():
            return 0
        _print_listening(*urls)
        exits = {asyncio.create_task(p.wait()): (i, p) for i, p in enumerate(workers)}
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for task in done:
            if task in exits:
                index, proc = exits[task]
                log.error("worker %d (pid %d) exited with status %s; stopping the server", index, proc.pid,
                          proc.returncode)
                print(f"iomtca serve: worker {index} (pid {proc.pid}) exited with status {proc.returncode}",
                      file=sys.stderr, flush=True)
                return 1
        log.info("stopping %d workers", len(workers))
        return 0
    finally:
        await _stop_workers(workers)
        metrics_dir.cleanup()


def _json_logs() -> bool:
    """Whether this process logs JSON lines (its root handler's formatter): workers log the same."""
    return any(isinstance(h.formatter, logsafe.JsonFormatter) for h in logging.getLogger().handlers)


async def _wait_ready(workers: list[asyncio.subprocess.Process], stop: asyncio.Event) -> None:
    async def one(index: int, proc: asyncio.subprocess.Process) -> None:
        line = await proc.stdout.readline()
        if line.decode(errors="replace").strip() != READY:
            await proc.wait()
            raise ConfigError(f"worker {index} exited with status {proc.returncode} before it was ready "
                              "(its log is above)")

    ready = asyncio.gather(*(one(i, p) for i, p in enumerate(workers)))
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([ready, stopping], timeout=WORKER_START_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            ready.result()
        elif not done:
            raise ConfigError(f"workers not ready within {WORKER_START_TIMEOUT:.0f} s")
    finally:
        stopping.cancel()
        if not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready


async def _stop_workers(workers: list[asyncio.subprocess.Process]) -> None:
    for proc in workers:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    for proc in workers:
        try:
            await asyncio.wait_for(proc.wait(), WORKER_STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.error("worker pid %d did not stop within %.0f s; killing it", proc.pid, WORKER_STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        # read the worker's stdout to its end: the process transport closes only once its pipes have,
        # and one still open when the loop closes is reported from its __del__ as a traceback
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.stdout.read(), 2.0)


# -- worker process entry point -------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: SIGTERM this worker if the supervisor dies without stopping it (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _worker_main(args: argparse.Namespace, passphrase: bytes) -> None:
    paths = CAPaths(args.dir)
    config = load_enroll_config(paths)
    ensure_descriptors(config.connections, len(Listeners._fields))
    listeners = Listeners(*([socket.socket(fileno=int(fd)) for fd in group.split(",") if fd]
                            for group in (args.est_fds, args.http_fds, args.console_fds)))
    authority = await Authority.open(args.dir, passphrase=passphrase)

    def ready() -> None:
        print(READY, flush=True)

    await run_worker(authority, config, listeners, index=args.worker, duties=args.worker == 0, ready=ready)


def worker_entry(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enroll.server", description="one worker of `iomtca serve --workers N`")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--est-fds", required=True)
    parser.add_argument("--http-fds", required=True)
    parser.add_argument("--console-fds", required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--log-format", choices=logsafe.FORMATS, default="text")
    args = parser.parse_args(argv)
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return 1
    passphrase = sys.stdin.buffer.readline().rstrip(b"\n")
    sys.stdin.close()
    logsafe.configure(args.log_level, args.log_format, role=f"worker-{args.worker}")
    try:
        asyncio.run(_worker_main(args, passphrase))
    except KeyboardInterrupt:
        return 0
    except (CAError, OSError) as exc:
        print(f"iomtca serve: worker {args.worker}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        log.exception("worker %d failed", args.worker)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(worker_entry())
