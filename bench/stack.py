"""A private mosquitto, `iomtca gateway` and a retained-message watcher for the benchmarks that
need the MQTT side (figures 6 and 9). Every process is stopped by its own pid; every wait has a
deadline. Load stays on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as paho
from cryptography.x509 import ocsp

from .common import IOMTCA, Listener, Server, Service, free_port

TOPIC_ROOT = "iomt/v1"


class Broker(Listener):
    """mosquitto on a free loopback port with its own config (no persistence: retained messages in
    memory), sized for a storm of devices as docs/GATEWAY.md recommends."""

    scheme = "mqtt"
    timeout = 10.0

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true", "persistence false",
                 # per client: QoS 1 messages queued for an offline session (default 1,000, then
                 # dropped silently) and in flight to an online one (default 20: the gateway's
                 # single subscription would receive 20 requests per round trip)
                 "max_queued_messages 1000000", "max_inflight_messages 1000",
                 "log_dest stderr", "log_type error", "log_type warning"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf = work / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.work = work
        super().__init__(["mosquitto", "-c", str(conf)], port, work / "mosquitto.log", "mosquitto")


class Gateway(Service):
    """`iomtca gateway` against a Server and a Broker, ready once it printed its connected line."""

    ready = "connected"

    def __init__(self, home: Path, broker: Broker, server: Server, *, publish_pki: bool = True,
                 name: str = "bench-gateway") -> None:
        ca_url = f"https://127.0.0.1:{server.est_port}"
        # set up as an operator would: registered at the CA, enrolled into its own directory
        self.gwdir = home.parent / f"{home.name}-{name}"
        if not (self.gwdir / "gateway.toml").exists():
            added = subprocess.run([IOMTCA, "gateway", "add", name, "--json", "--dir", str(home)], check=True,
                                   capture_output=True, text=True, timeout=60)
            subprocess.run([IOMTCA, "gateway", "init", "--dir", str(self.gwdir), "--ca", ca_url, "--root",
                            str(home / "root.pem"), "--name", name, "--token", "-"], check=True, capture_output=True,
                           text=True, timeout=60, input=json.loads(added.stdout)["token"] + "\n")
        argv = [IOMTCA, "gateway", "run", "--dir", str(self.gwdir), "--broker", broker.url,
                "--ca", ca_url, "--client-id", name]
        if not publish_pki:
            argv.append("--no-publish-pki")
        self.home = home
        super().__init__(argv, home / f"{name}.log", "iomtca gateway")


def status_of(der: bytes) -> str | None:
    """'good' / 'revoked' / 'unknown' of a DER OCSP response, None for an empty or unsuccessful one."""
    if not der:
        return None
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError:
        return None
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return None
    return resp.certificate_status.name.lower()


class Watcher:
    """An MQTT subscriber (paho's network thread) that notes, per serial, when the retained
    `pki/ocsp/{serial}` message first said good and first said revoked (time.monotonic())."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self.seen: dict[str, dict[str, float]] = {}
        self._subscribed = threading.Event()
        c = self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}",
                                       protocol=paho.MQTTv5)
        c.on_message = self._on_message
        c.on_subscribe = lambda *a, **k: self._subscribed.set()
        c.connect("127.0.0.1", port)
        c.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        now = time.monotonic()
        serial = message.topic.rsplit("/", 1)[-1]
        status = status_of(message.payload)
        with self._lock:
            entry = self.seen.setdefault(serial, {})
            if status is not None and status not in entry:
                entry[status] = now

    def watch(self, serial_hex: str, timeout: float = 10) -> None:
        self._subscribed.clear()
        self._client.subscribe(f"{TOPIC_ROOT}/pki/ocsp/{serial_hex}", qos=1)
        if not self._subscribed.wait(timeout):
            raise RuntimeError("the broker did not acknowledge a subscription")

    def unwatch(self, serial_hex: str) -> None:
        self._client.unsubscribe(f"{TOPIC_ROOT}/pki/ocsp/{serial_hex}")

    def when(self, serial_hex: str, status: str | None) -> float | None:
        """When `status` (None: any status) was first seen for this serial."""
        with self._lock:
            entry = self.seen.get(serial_hex, {})
            return min(entry.values(), default=None) if status is None else entry.get(status)

    def wait_for(self, serial_hex: str, status: str | None, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.when(serial_hex, status)
            if at is not None:
                return at
            time.sleep(0.005)
        return None

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def last_in_sweep(db: Path) -> str | None:
    """The serial the gateway's start-up sweep publishes last (it pages through unexpired device
    certificates in the store's serial order); None when there is none."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT MAX(c.serial) FROM certificates c JOIN devices d ON d.id = c.device_id "
                            "WHERE c.not_after > ?", (now,)).fetchone()[0]
    finally:
        conn.close()
