"""[enroll.connections] against a real `iomtca serve`: slow and idle clients are cut off on time,
one source cannot hold more than its share of connections, and a real device enrolls meanwhile.

The hostile clients are asyncio sockets bound to their own loopback addresses (127.0.0.x, each a
source as the server sees it); the real device is curl with an openssl-made CSR.
"""
from __future__ import annotations

import asyncio
import functools
import ssl
import subprocess
import time

import pytest

from tests.enroll.conftest import IOMTCA, env

LIMITS = """
[enroll.connections]
handshake_timeout = "3s"
idle_timeout = "10s"
body_timeout = "2s"
max_header_bytes = 4096
per_source = 20
max_connections = 900
"""
SLOW_SOURCES = [f"127.0.0.{n}" for n in range(2, 17)]   # 15 sources x 20 connections = 300
# generous: the server's timers are 2-10 s; a loaded CI machine adds seconds, not a quarter minute
# (idle_timeout is long enough for all 300 slow clients to be open at once while the device enrolls)
CUT_OFF_WITHIN = 25.0


@pytest.fixture(scope="module")
def est(start_server):
    return start_server("limits", enroll=LIMITS)


@pytest.fixture(scope="module")
def ca(est):
    return est.ca


def address(est) -> tuple[str, int]:
    host, port = est.est.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


@functools.cache
def client_tls() -> ssl.SSLContext:
    """One context for every hostile client: making one loads the system's CA bundle (tens of ms),
    which for 300 clients outlasted the server's idle timeout before the last had connected."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE   # these clients are attackers: the server's chain is not their concern
    return ctx


async def open_tls(est, source: str):
    host, port = address(est)
    return await asyncio.open_connection(host, port, ssl=client_tls(), local_addr=(source, 0))


async def opened(connecting) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    reader, writer = await connecting
    return reader, writer, time.monotonic()


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, trickle: bytes,
                           within: float, start: float) -> float:
    """Send `trickle` a byte at a time (every 0.2 s) until the server closes; seconds from `start`
    (when the connection was opened) until it did."""
    sent = 0
    while time.monotonic() - start < within:
        if writer is not None and sent < len(trickle):
            try:
                writer.write(trickle[sent:sent + 1])
                await writer.drain()
            except (ConnectionError, ssl.SSLError):
                return time.monotonic() - start
            sent += 1
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.2)
        except asyncio.TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError):
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start
        # an answer (400/408) is allowed before the close; keep reading to the end
    raise AssertionError(f"the server kept the connection open for {within} s")


def slowloris_headers(host: str) -> bytes:
    return (f"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: {host}\r\n" + "X-Pad: a\r\n" * 200).encode()


def test_hundreds_of_slow_connections_do_not_stop_a_real_device(est, ca):
    """300 clients that trickle their headers (slowloris) from 15 addresses, plus TCP connections
    that never start TLS: every one is closed within the limits, and a device enrolls meanwhile."""
    device = ca.unique("pump")
    token = ca.add_device(device)

    async def main():
        host, port = address(est)
        conns, trickles = [], []
        for src in SLOW_SOURCES:   # a source at a time: 300 handshakes at once would outlast handshake_timeout
            batch = await asyncio.gather(*(opened(open_tls(est, src)) for _ in range(20)))
            trickles += [asyncio.create_task(closed_by_server(r, w, slowloris_headers(host), CUT_OFF_WITHIN, t))
                         for r, w, t in batch]
            conns += batch
        silent = [await opened(asyncio.open_connection(host, port, local_addr=("127.0.0.17", 0)))
                  for _ in range(10)]
        handshakes = [asyncio.create_task(closed_by_server(r, None, b"", CUT_OFF_WITHIN, t)) for r, _, t in silent]
        issued = await asyncio.to_thread(est.enroll, device, token)
        enrolled_at = time.monotonic()
        times = await asyncio.gather(*trickles)
        handshake_times = await asyncio.gather(*handshakes)
        for _, w, _ in conns + silent:
            w.close()
        still_open = sum(t + took > enrolled_at for (_, _, t), took in zip(conns, times))
        return issued, times, handshake_times, still_open

    issued, times, handshake_times, still_open = asyncio.run(main())
    ca.openssl_verify(issued.cert_path)
    # the device enrolled while the slow connections were held, not after the server shed them
    assert still_open >= 250, still_open
    # cut off by the idle timer (10 s), not by the end of the trickle: 200 header lines take 40 s
    assert len(times) == 300 and max(times) < CUT_OFF_WITHIN and min(times) > 9.0, (min(times), max(times))
    assert max(handshake_times) < CUT_OFF_WITHIN and min(handshake_times) > 2.0, handshake_times


def test_one_source_holds_at_most_per_source_connections(est, ca):
    """The 21st connection from one address is closed before its TLS handshake; another address
    still connects, and the first one may connect again once one of its connections ends."""
    async def main():
        held = [await open_tls(est, "127.0.0.40") for _ in range(20)]
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(open_tls(est, "127.0.0.40"), 5)
        reader, writer = await open_tls(est, "127.0.0.41")   # another source is not affected
        writer.close()
        held.pop()[1].close()
        await asyncio.sleep(0.3)   # the server sees the close
        again = await asyncio.wait_for(open_tls(est, "127.0.0.40"), 5)
        for _, w in held + [again]:
            w.close()

    asyncio.run(main())
    assert "refusing connections from 127.0.0.40" in est.log_text()


def test_a_stalled_body_is_answered_408_and_closed(est):
    async def main():
        reader, writer = await open_tls(est, "127.0.0.50")
        host, _ = address(est)
        writer.write(f"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: {host}\r\n"
                     "Content-Type: application/pkcs10\r\nContent-Length: 1000\r\n\r\nMIIB".encode())
        await writer.drain()
        start = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), CUT_OFF_WITHIN)   # to EOF: the server closes
        writer.close()
        return answer, time.monotonic() - start

    answer, took = asyncio.run(main())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"request body not received within 2 s" in body, answer
    assert 1.0 < took < CUT_OFF_WITHIN, took


def test_an_oversized_header_is_refused_with_a_reason(est):
    header = "X-Big: " + "a" * 5000
    reply = est.https("/.well-known/est/cacerts", "-H", header)
    assert reply.status == 400, reply
    assert b"Traceback" not in reply.body
    small = est.https("/.well-known/est/cacerts", "-H", "X-Small: " + "a" * 1000)
    assert small.status == 200, small


def test_an_idle_keepalive_is_closed_after_idle_timeout(est):
    async def main():
        reader, writer = await open_tls(est, "127.0.0.60")
        host, _ = address(est)
        writer.write(f"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
        await reader.readexactly(length)
        start = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), CUT_OFF_WITHIN)
        writer.close()
        return head, rest, time.monotonic() - start

    head, rest, idle = asyncio.run(main())
    assert head.startswith(b"HTTP/1.1 200"), head
    assert rest == b"" and 9.0 < idle < CUT_OFF_WITHIN, (rest, idle)


# -- settings that cannot be kept are refused ----------------------------------------------------

def serve_refuses(ca, limits: str, preexec=None) -> str:
    text = ca.home.joinpath("config.toml").read_text()
    original = text
    try:
        assert LIMITS.strip() in text
        ca.home.joinpath("config.toml").write_text(text.replace(LIMITS.strip(), limits, 1))
        proc = subprocess.run([str(IOMTCA), "serve", "--dir", str(ca.home), "--listen", "127.0.0.1:0",
                               "--http-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60,
                              env=env(), preexec_fn=preexec)
    finally:
        ca.home.joinpath("config.toml").write_text(original)
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("limits, says", [
    ('[enroll.connections]\nidle_timeout = "soon"', "idle_timeout"),
    ('[enroll.connections]\nidle_timeout = "0s"', "at least 1s"),
    ("[enroll.connections]\nper_source = 0", "per_source must be a whole number"),
    ("[enroll.connections]\nper_source = 50\nmax_connections = 10", "per_source cannot be above"),
    ("[enroll.connections]\nslowloris = true", "unknown setting(s) in [enroll.connections]: slowloris"),
])
def test_bad_limits_are_refused(ca, limits, says):
    assert says in serve_refuses(ca, limits)


def test_max_connections_beyond_the_open_file_limit_is_refused(ca):
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    stderr = serve_refuses(ca, "[enroll.connections]\nmax_connections = 1000", preexec=low_limit)
    # each of the three listeners (EST, HTTP, console) may hold max_connections
    assert "max_connections = 1000 on 3 listener(s) needs 3064 open files" in stderr and "at most 256" in stderr, \
        stderr
