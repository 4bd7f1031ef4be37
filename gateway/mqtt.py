"""The only module that imports paho: an MQTT 5 client bridged to asyncio.

paho runs its network loop in its own thread; everything it hands us crosses to
the event loop with `call_soon_threadsafe` and becomes our own `Message` type.
Each QoS 1 publish is tracked by message id with a future that is always
resolved or failed. paho reconnects by itself (1 s to 30 s back-off) when the
broker goes away; subscriptions are renewed on every connect.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import urllib.parse
from dataclasses import dataclass

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


def parse_broker(url: str) -> tuple[str, int, bool]:
    """mqtt://host:1883 or mqtts://host:8883 -> (host, port, tls)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://127.0.0.1:1883")
    return parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883), parts.scheme == "mqtts"


class MQTTLink:
    def __init__(self, broker_url: str, client_id: str, subscriptions: list[str], *,
                 session_expiry: int = 7 * 24 * 3600, max_queued: int = 0) -> None:
        self._host, self._port, tls = parse_broker(broker_url)
        self._subscriptions = subscriptions
        self._loop: asyncio.AbstractEventLoop | None = None
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._early_acks: set[int] = set()
        self._lock = threading.Lock()
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(max_queued)
        self._client.reconnect_delay_set(1, 30)
        self._session_expiry = session_expiry
        if tls:
            self._client.tls_set()
        c = self._client
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        c.on_publish, c.on_socket_open = self._on_publish, self._on_socket_open

    async def start(self) -> None:
        """Start connecting in the background; `connected` is set once the broker answers."""
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        self._client.connect_async(self._host, self._port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()

    async def stop(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError("MQTT client stopped"))

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                      wait: bool = True) -> None:
        """Publish; with `wait`, return once the broker acknowledged it (PUBACK)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0 or not wait:
            return
        future = self._loop.create_future()
        with self._lock:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                return
            self._pending[info.mid] = future
        await future

    # -- paho callbacks (network thread) ---------------------------------------------
    def _on_socket_open(self, client, userdata, sock) -> None:
        # Without it every request/response round trip waits on Nagle + delayed ACK (~40-90 ms).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused connection: %s", reason_code)
            return
        options = SubscribeOptions(qos=1)
        if self._subscriptions:
            client.subscribe([(f, options) for f in self._subscriptions])
        log.info("connected to mqtt://%s:%d (session present: %s)", self._host, self._port, flags.session_present)
        self._loop.call_soon_threadsafe(self.connected.set)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        log.warning("disconnected from broker: %s", reason_code)
        self.reconnects += 1
        self._loop.call_soon_threadsafe(self.connected.clear)

    def _on_message(self, client, userdata, msg) -> None:
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        self._loop.call_soon_threadsafe(self.messages.put_nowait, message)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            future = self._pending.pop(mid, None)
            if future is None:
                self._early_acks.add(mid)
                return
        self._loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
