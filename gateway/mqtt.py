"""The only module that imports paho: an MQTT 5 client driven by the asyncio event loop.

paho's socket is registered with the loop (`add_reader`/`add_writer`), so no
network thread exists and thousands of clients fit in one process (the fleet
simulator uses this too). Messages become our own `Message` type here. Each
QoS 1 publish is tracked by message id with a future that is always resolved
or failed. On a lost connection the client reconnects by itself with back-off
(1 s to 30 s) and re-subscribes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    mid: int = 0          # for `MQTTLink.ack` when the link acknowledges by hand
    qos: int = 0


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


def parse_broker(url: str) -> tuple[str, int, bool]:
    """mqtt://host:1883 or mqtts://host:8883 -> (host, port, tls)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://127.0.0.1:1883")
    return parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883), parts.scheme == "mqtts"


class MQTTLink:
    def __init__(self, broker_url: str, client_id: str, subscriptions: list[str], *,
                 session_expiry: int = 7 * 24 * 3600, will: Will | None = None,
                 on_connect: Callable[[], None] | None = None, quiet: bool = False,
                 manual_ack: bool = False, max_queued: int = 10_000) -> None:
        self._host, self._port, tls = parse_broker(broker_url)
        self.client_id = client_id
        self._subscriptions = subscriptions
        self._session_expiry = session_expiry
        self._on_connect_hook = on_connect
        self._quiet = quiet
        self._loop: asyncio.AbstractEventLoop | None = None
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._sock = None
        self._misc: asyncio.Task | None = None
        self._reconnector: asyncio.Task | None = None
        self._stopping = False
        # manual_ack: the broker hears PUBACK only after `ack()`, i.e. after the message is stored
        c = self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                       protocol=paho.MQTTv5, manual_ack=manual_ack)
        # paho looks through every in-flight message on each PUBACK while more wait behind them:
        # a window of 1,000 made a 10,000-answer burst quadratic; 100 keeps the pipe full on loopback
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(max_queued)  # while disconnected; what is durable elsewhere is re-sent
        if tls:
            c.tls_set()
        if will is not None:
            c.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        c.on_publish = self._on_publish
        c.on_socket_open, c.on_socket_close = self._on_socket_open, self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write

    async def start(self, *, wait: bool = False, timeout: float = 10) -> None:
        """Connect (retrying in the background if the broker is not there yet)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        self._client.connect_async(self._host, self._port, keepalive=30, clean_start=False, properties=props)
        self._reconnector = self._loop.create_task(self._keep_connected())
        if wait:
            await asyncio.wait_for(self.connected.wait(), timeout)

    async def stop(self) -> None:
        self._stopping = True
        if self._reconnector:
            self._reconnector.cancel()
        if self.connected.is_set():
            self._client.disconnect()
            await asyncio.sleep(0)
        self._client.loop_misc()
        self._close_socket()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("MQTT client stopped"))
        self._pending.clear()

    async def drop(self) -> None:
        """Cut the connection without DISCONNECT (the broker sends the will), as a device losing power would."""
        self._stopping = True
        if self._reconnector:
            self._reconnector.cancel()
        self._close_socket()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                      wait: bool = True) -> None:
        """Publish; with `wait`, return once the broker acknowledged it (PUBACK).

        While disconnected paho queues the message and sends it after reconnecting.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0 or not wait:
            return
        future = self._loop.create_future()
        self._pending[info.mid] = future
        await future

    async def subscribe(self, topic_filter: str) -> None:
        self._subscriptions.append(topic_filter)
        if self.connected.is_set():
            self._client.subscribe(topic_filter, options=SubscribeOptions(qos=1))

    def ack(self, message: Message) -> None:
        """Acknowledge a received QoS 1 message (with manual_ack: once it is safely stored)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def unsubscribe(self, topic_filter: str) -> None:
        if topic_filter in self._subscriptions:
            self._subscriptions.remove(topic_filter)
        if self.connected.is_set():
            self._client.unsubscribe(topic_filter)

    # -- connection upkeep ----------------------------------------------------------
    async def _keep_connected(self) -> None:
        delay = 1.0
        while not self._stopping:
            if self._sock is None:
                try:
                    await self._loop.run_in_executor(None, self._connect_blocking)
                    delay = 1.0
                except (OSError, paho.WebsocketConnectionError) as exc:
                    if not self._quiet:
                        log.info("broker %s:%d not reachable (%s); retrying in %.0f s",
                                 self._host, self._port, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
            await asyncio.sleep(0.5)

    def _connect_blocking(self) -> None:
        # TCP connect off the loop; paho then calls _on_socket_open, which we hop back to the loop
        self._client.reconnect()

    def _on_socket_open(self, client, userdata, sock) -> None:
        with contextlib.suppress(OSError):
            # without it every request/response round trip waits on Nagle + delayed ACK (~40-90 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.call_soon_threadsafe(self._attach, sock)

    def _attach(self, sock) -> None:
        if sock.fileno() < 0:  # closed again before the loop got to it
            return
        self._sock = sock
        self._loop.add_reader(sock, self._read)
        if self._client.want_write():
            self._loop.add_writer(sock, self._write)
        self._misc = self._loop.create_task(self._misc_loop())

    def _read(self) -> None:
        self._client.loop_read()

    def _write(self) -> None:
        self._client.loop_write()

    def _on_loop(self, fn, *args) -> None:
        """Run `fn` on the loop's thread. paho calls back from the executor thread too, inside
        `reconnect()`; a selector changed from two threads at once loses registrations (it once
        failed with "FD is already registered")."""
        if threading.get_ident() == self._loop_thread and not self._loop.is_closed():
            fn(*args)
            return
        # paho's __del__ may call back after the loop is closed: then nothing is left to unregister
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_close(self, client, userdata, sock) -> None:
        self._on_loop(self._detach, sock)

    def _detach(self, sock) -> None:
        if sock is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._misc:
            self._misc.cancel()
        if self._sock is sock:
            self._sock = None

    def _close_socket(self) -> None:
        sock = self._sock
        self._detach(sock)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self.connected.clear()

    def _on_register_write(self, client, userdata, sock) -> None:
        self._on_loop(self._register_write, sock)

    def _register_write(self, sock) -> None:
        if self._sock is sock and sock.fileno() >= 0:
            self._loop.add_writer(sock, self._write)

    def _on_unregister_write(self, client, userdata, sock) -> None:
        self._on_loop(self._unregister_write, sock)

    def _unregister_write(self, sock) -> None:
        if self._sock is sock:
            with contextlib.suppress(ValueError):
                self._loop.remove_writer(sock)

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1)

    # -- paho callbacks (on the event loop) -------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused connection of %s: %s", self.client_id, reason_code)
            return
        if self._subscriptions:
            client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._subscriptions])
        if not self._quiet:
            log.info("connected to mqtt://%s:%d as %s (session present: %s)", self._host, self._port,
                     self.client_id, flags.session_present)
        self.connected.set()
        if self._on_connect_hook:
            self._on_connect_hook()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._stopping and not self._quiet:
            log.warning("%s disconnected from broker: %s", self.client_id, reason_code)
        self.reconnects += 1
        self.connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        self.messages.put_nowait(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)
