"""The only module that imports paho: an MQTT 5 client driven by the asyncio event loop.

paho's socket is registered with the loop (`add_reader`/`add_writer`), so no
network thread exists and thousands of clients fit in one process (the fleet
simulator uses this too). Messages become our own `Message` type here. Each
QoS 1 publish is tracked by message id with a future that is always resolved
or failed. On a lost connection the client reconnects by itself with back-off
(1 s to 30 s) and re-subscribes.

`mqtts://` is TLS 1.2 or newer with the broker's certificate and host name verified
(`BrokerAuth.ca_file`, else the system's CAs); a client certificate and a username and
password are optional. A broker that refuses the credentials before the link was ever
connected is a configuration error (`BrokerRefusedError` out of `connected.wait()`); once
connected, a refusal on reconnect is retried with the same back-off.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
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


# CONNACK reason codes (MQTT 5, 3.2.2.2) that mean "these credentials are wrong", not "try later"
_REFUSED_CREDENTIALS = {134, 135, 140}  # bad user name or password, not authorized, bad auth method


class BrokerRefusedError(ConnectionError):
    """The broker refused the link's credentials, or its TLS certificate failed verification."""


@dataclass(frozen=True)
class BrokerAuth:
    """How the link checks the broker (mqtts) and proves itself to it. Secrets stay out of repr."""

    ca_file: Path | None = None          # the broker's CA; None: the system's trust store
    cert_file: Path | None = None        # client certificate (PEM), with key_file
    key_file: Path | None = None
    key_passphrase: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls_files(self) -> list[str]:
        return [name for name, value in (("broker_ca", self.ca_file), ("broker_cert", self.cert_file),
                                         ("broker_key", self.key_file)) if value is not None]

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2+, the broker's certificate and host name verified. Raises OSError/ssl.SSLError."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(self.ca_file) if self.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            # a callable, so that an encrypted key without passphrase fails instead of prompting on a tty
            context.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None,
                                    password=self._passphrase)
        return context

    def _passphrase(self) -> bytes:
        if self.key_passphrase is None:
            raise ssl.SSLError("the broker client key is encrypted: set IOMTCA_BROKER_KEY_PASSPHRASE")
        return self.key_passphrase.encode()


class _Connected(asyncio.Event):
    """Set while connected. `wait()` raises the link's fatal error instead, once it has given up."""

    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None
        self._failed = asyncio.Event()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._failed.set()

    async def wait(self) -> bool:
        if not self.is_set() and self.error is None:
            waiters = [asyncio.ensure_future(super().wait()), asyncio.ensure_future(self._failed.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if self.error is not None and not self.is_set():
            raise self.error
        return True


def parse_broker(url: str) -> tuple[str, int, bool]:
    """mqtt://host:1883 or mqtts://host:8883 -> (host, port, tls)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://127.0.0.1:1883")
    if parts.username is not None or parts.password is not None:
        # a password in the URL would sit on command lines and in log lines
        raise ValueError("broker URL must not carry credentials: use broker_username and "
                         "IOMTCA_BROKER_PASSWORD or broker_password_file")
    return parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883), parts.scheme == "mqtts"


class MQTTLink:
    def __init__(self, broker_url: str, client_id: str, subscriptions: list[str], *,
                 session_expiry: int = 7 * 24 * 3600, will: Will | None = None,
                 on_connect: Callable[[], None] | None = None, quiet: bool = False,
                 manual_ack: bool = False, max_queued: int = 10_000, auth: BrokerAuth | None = None) -> None:
        self._host, self._port, tls = parse_broker(broker_url)
        self._url = f"{'mqtts' if tls else 'mqtt'}://{self._host}:{self._port}"
        auth = auth or BrokerAuth()
        if auth.tls_files and not tls:
            raise ValueError(f"{', '.join(auth.tls_files)} need an mqtts:// broker URL, not {broker_url}")
        self._username = auth.username
        self._ever_connected = False
        self._refused = False      # the last CONNACK was a refusal: back off before the next attempt
        self._delay = 1.0
        self.client_id = client_id
        self._subscriptions = subscriptions
        self._session_expiry = session_expiry
        self._on_connect_hook = on_connect
        self._quiet = quiet
        self._loop: asyncio.AbstractEventLoop | None = None
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = _Connected()
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
            c.tls_set_context(auth.ssl_context())
        if auth.username is not None:
            c.username_pw_set(auth.username, auth.password)
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
        while not self._stopping:
            if self._sock is None:
                if self._refused:  # the broker said no: wait as for an unreachable one
                    self._refused = False
                    await self._back_off()
                    continue
                try:
                    await self._loop.run_in_executor(None, self._connect_blocking)
                except ssl.SSLCertVerificationError as exc:
                    if not self._ever_connected:
                        self._give_up(BrokerRefusedError(
                            f"TLS: the certificate of broker {self._url} failed verification ({exc.verify_message}); "
                            "check broker_ca and the host name in the broker URL"))
                        return
                    log.warning("TLS: the certificate of broker %s failed verification (%s); retrying in %.0f s",
                                self._url, exc.verify_message, self._delay)
                    await self._back_off()
                    continue
                except (OSError, paho.WebsocketConnectionError) as exc:
                    if not self._quiet:
                        log.info("broker %s not reachable (%s); retrying in %.0f s", self._url, exc, self._delay)
                    await self._back_off()
                    continue
            await asyncio.sleep(0.5)

    async def _back_off(self) -> None:
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, 30.0)

    def _give_up(self, error: BrokerRefusedError) -> None:
        log.error("%s", error)
        self._stopping = True
        self.connected.fail(error)

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
        # TLS: what is already decrypted in the SSL object does not make the socket readable again
        sock = self._sock
        while sock is not None and sock is self._sock and getattr(sock, "pending", None) and sock.pending() > 0:
            if self._client.loop_read() != paho.MQTT_ERR_SUCCESS:
                break

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
            who = f"user {self._username!r}" if self._username is not None else "an anonymous client"
            if reason_code.value in _REFUSED_CREDENTIALS and not self._ever_connected:
                self._give_up(BrokerRefusedError(
                    f"broker {self._url} refused {self.client_id} as {who}: {reason_code} "
                    "(check broker_username and its password in IOMTCA_BROKER_PASSWORD or "
                    "broker_password_file, or broker_cert)"))
                return
            self._refused = True
            log.warning("broker %s refused connection of %s as %s: %s; retrying in %.0f s",
                        self._url, self.client_id, who, reason_code, self._delay)
            return
        self._ever_connected = True
        self._delay = 1.0
        if self._subscriptions:
            client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._subscriptions])
        if not self._quiet:
            log.info("connected to %s as %s%s (session present: %s)", self._url, self.client_id,
                     f" (user {self._username})" if self._username is not None else "", flags.session_present)
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
