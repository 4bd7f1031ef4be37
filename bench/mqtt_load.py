"""A lean MQTT 3.1.1 load generator: thousands of simulated devices in one asyncio process.

Why not paho: a paho client costs a Python object graph, a socket callback layer and a
per-packet parser written for generality; at 10,000 clients in one process the client
itself, not the broker or the gateway, would become what is measured. Why not several
processes: the machine has 2 cores, shared with mosquitto, the gateway and the CA, so
more generator processes only add context switches. What is here is the smallest client
the figures need: CONNECT (clean session on or off, optional will), SUBSCRIBE QoS 1,
PUBLISH QoS 0/1, PUBACK both ways, DISCONNECT, with TCP_NODELAY on every socket, each
device its own connection and client id, as asyncio Protocols (no stream objects).

`python -m bench.mqtt_load echo PORT SIZE` runs the baseline responder: it answers every
request on `iomt/v1/dev/{id}/req/{op}` with a SIZE-byte payload on `.../resp/{op}`, as the
gateway would, doing no other work.
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time
from typing import Callable

ROOT = "iomt/v1"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


class Client(asyncio.Protocol):
    """One MQTT connection. `on_message(client, topic, payload)` gets every PUBLISH (QoS 1 ones are
    PUBACKed right after the callback returns)."""

    def __init__(self, client_id: str, on_message: Callable[["Client", str, bytes], None] | None = None) -> None:
        self.client_id = client_id
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._pid = 0
        self._waiting: dict[int, asyncio.Future] = {}   # packet id -> PUBACK/SUBACK
        self._connack: asyncio.Future | None = None
        self.closed = asyncio.Event()

    # -- connection ----------------------------------------------------------------
    async def connect(self, port: int, *, clean: bool, will: tuple[str, bytes] | None = None,
                      keepalive: int = 0, timeout: float = 10) -> bool:
        """Connect and wait for CONNACK; True if the broker had a session for us."""
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        await asyncio.wait_for(loop.create_connection(lambda: self, "127.0.0.1", port), timeout)
        flags = (0x02 if clean else 0) | ((0x04 | 0x08 | 0x20) if will else 0)  # will: QoS 1, retained
        body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _str(self.client_id)
        if will:
            body += _str(will[0]) + _str(will[1])
        self.transport.write(_packet(0x10, body))
        return await asyncio.wait_for(self._connack, timeout)

    def connection_made(self, transport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed.set()
        for fut in [self._connack, *self._waiting.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"{self.client_id}: connection lost"))
        self._waiting.clear()

    def disconnect(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\xe0\x00")
            self.transport.close()

    # -- packets out -----------------------------------------------------------------
    def _next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def subscribe(self, topic_filter: str) -> asyncio.Future:
        pid = self._next_pid()
        fut = self._waiting[pid] = asyncio.get_running_loop().create_future()
        self.transport.write(_packet(0x82, struct.pack("!H", pid) + _str(topic_filter) + b"\x01"))
        return fut

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> asyncio.Future | None:
        """Send; for QoS 1 the future resolves on PUBACK."""
        first = 0x30 | (qos << 1) | (1 if retain else 0)
        if qos == 0:
            self.transport.write(_packet(first, _str(topic) + payload))
            return None
        pid = self._next_pid()
        fut = self._waiting[pid] = asyncio.get_running_loop().create_future()
        self.transport.write(_packet(first, _str(topic) + struct.pack("!H", pid) + payload))
        return fut

    # -- packets in ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            length, mult, i = 0, 1, 1
            while True:
                if i >= len(buf):
                    return
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            end = i + length
            if len(buf) < end:
                return
            self._handle(buf[0], bytes(buf[i:end]))
            del buf[:end]

    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:  # PUBLISH
            qos = (first >> 1) & 3
            tlen = struct.unpack_from("!H", body)[0]
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            pid = None
            if qos:
                pid = struct.unpack_from("!H", body, pos)[0]
                pos += 2
            if self.on_message is not None:
                self.on_message(self, topic, body[pos:])
            if pid is not None:
                self.transport.write(b"\x40\x02" + struct.pack("!H", pid))
        elif kind in (4, 9):  # PUBACK, SUBACK
            fut = self._waiting.pop(struct.unpack_from("!H", body)[0], None)
            if fut is not None and not fut.done():
                if kind == 9 and body[2] == 0x80:
                    fut.set_exception(ConnectionError(f"{self.client_id}: subscription refused"))
                else:
                    fut.set_result(None)
        elif kind == 2:  # CONNACK
            if body[1] != 0:
                self._connack.set_exception(ConnectionError(f"{self.client_id}: CONNACK {body[1]}"))
            elif not self._connack.done():
                self._connack.set_result(bool(body[0] & 1))


async def connect_all(clients: list[Client], port: int, *, clean: bool, concurrency: int = 64,
                      deadline: float, wills: bool = False, subscribe: Callable[[Client], str] | None = None
                      ) -> list[Client]:
    """Connect (and subscribe) every client, at most `concurrency` handshakes at a time (mosquitto
    listens with a short backlog; overflowing it costs a 1 s SYN retransmit). Returns those that
    made it before `deadline` (time.monotonic())."""
    gate = asyncio.Semaphore(concurrency)
    ok: list[Client] = []

    async def one(c: Client) -> None:
        async with gate:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            will = (f"{ROOT}/dev/{c.client_id}/presence", b"offline") if wills else None
            try:
                await c.connect(port, clean=clean, will=will, timeout=left)
                if subscribe is not None:
                    await asyncio.wait_for(c.subscribe(subscribe(c)), max(0.1, deadline - time.monotonic()))
            except (OSError, asyncio.TimeoutError, ConnectionError):
                c.disconnect()
                return
            ok.append(c)

    await asyncio.gather(*(one(c) for c in clients))
    return ok


# -- the baseline responder ---------------------------------------------------------------
async def echo(port: int, size: int, seconds: float) -> None:
    """Answer every request with `size` bytes on its response topic until `seconds` have passed."""
    prefix = f"{ROOT}/dev/"
    pad_to = size

    def on_message(c: Client, topic: str, payload: bytes) -> None:
        parts = topic[len(prefix):].split("/")
        if len(parts) != 3 or parts[2] == "ack":
            return
        req_id = json.loads(payload)["id"]
        answer = json.dumps({"id": req_id, "status": "ok", "pad": ""}).encode()
        answer = answer[:-2] + b"x" * max(0, pad_to - len(answer)) + answer[-2:]
        c.publish(f"{prefix}{parts[0]}/resp/{parts[2]}", answer)  # QoS 1, PUBACK not awaited

    responder = Client(f"bench-echo-{port}", on_message)
    await responder.connect(port, clean=True)
    await responder.subscribe(f"{ROOT}/dev/+/req/+")
    print("echo: ready", flush=True)
    await asyncio.wait_for(responder.closed.wait(), seconds) if seconds else None


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "echo":
    try:
        asyncio.run(echo(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
    except (asyncio.TimeoutError, KeyboardInterrupt):
        pass
