"""A hospital's mosquitto with the dynamic-security plugin, and devices that log in to it.

The broker's accounts live in the plugin's JSON (made with `mosquitto_ctrl dynsec init`, then
changed with `mosquitto_ctrl dynsec ...` against the running broker, as an operator would):
- the gateway's account (`iomtca-gateway`): the admin role `init` makes (`$CONTROL/dynamic-security/#`)
  plus a role for the contract's topics;
- one account per device (user name = device id) in the group `iomt-devices`, whose role lets it
  read `iomt/v1/pki/#`, and a role of its own confining it to `iomt/v1/dev/<id>/#`: the plugin of
  mosquitto 2.0.11 does not substitute `%u` in its ACLs (a publish to `iomt/v1/dev/%u/#` is denied).
Device sessions are paho clients (MQTT 5), so the test sees the broker's DISCONNECT and CONNACK codes.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from tests.gateway import gwkit
from tests.gateway.gwkit import ROOT, Device, Proc, Sub, free_port, run

GW_USER = "iomtca-gateway"
GW_PASSWORD = "gw-dynsec-S3cret-5190"
DEVICE_GROUP = "iomt-devices"
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"

# role -> ACLs (mosquitto_ctrl dynsec addRoleACL <role> <acltype> <topic> allow)
ROLES = {
    "iomt-gateway": [("publishClientSend", f"{ROOT}/#"), ("publishClientReceive", f"{ROOT}/#"),
                     ("subscribePattern", f"{ROOT}/#"), ("unsubscribePattern", f"{ROOT}/#")],
    "iomt-device": [("publishClientReceive", f"{ROOT}/pki/#"), ("subscribePattern", f"{ROOT}/pki/#")],
}


def device_acls(device_id: str) -> list[tuple[str, str]]:
    """The ACLs of a device's own role: its subtree of the contract, nothing else."""
    own = f"{ROOT}/dev/{device_id}/#"
    return [("publishClientSend", own), ("publishClientReceive", own), ("subscribePattern", own),
            ("unsubscribePattern", own)]


class DynsecBroker:
    """mosquitto on a free loopback port, no anonymous clients, accounts in the dynsec plugin."""

    def __init__(self, work: Path, *, plugin: bool = True) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dynsec_json = work / "dynamic-security.json"
        self.passwords: dict[str, str] = {}
        run(["mosquitto_ctrl", "dynsec", "init", self.dynsec_json, GW_USER, GW_PASSWORD])
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous false", "persistence false",
                 "set_tcp_nodelay true", "log_dest stderr", "log_type all", "connection_messages true",
                 f"plugin {PLUGIN}", f"plugin_opt_config_file {self.dynsec_json}"]
        if os.geteuid() == 0:
            lines.append("user root")   # else mosquitto drops to "mosquitto", which cannot write the JSON here
        self.conf = work / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = Proc("mosquitto-dynsec", ["mosquitto", "-c", self.conf], work)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> None:
        self.proc.start()
        gwkit.wait_listening(self.proc, [self.port], timeout)
        if self.proc.starts == 1:
            self._set_up_roles()

    def stop(self) -> None:
        self.proc.stop(grace=5)

    def log(self) -> str:
        return self.proc.stderr_text()

    def ctrl(self, *args) -> str:
        """`mosquitto_ctrl dynsec ARGS` as the gateway's account (the plugin's admin)."""
        proc = run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", self.port, "-u", GW_USER, "-P", GW_PASSWORD,
                    "dynsec", *args], timeout=15)
        return proc.stdout.decode(errors="replace")

    def _set_up_roles(self) -> None:
        for role, acls in ROLES.items():
            self.ctrl("createRole", role)
            for acltype, topic in acls:
                self.ctrl("addRoleACL", role, acltype, topic, "allow")
        self.ctrl("addClientRole", GW_USER, "iomt-gateway")
        self.ctrl("createGroup", DEVICE_GROUP)
        self.ctrl("addGroupRole", DEVICE_GROUP, "iomt-device")

    def add_device(self, device_id: str) -> str:
        password = f"pw-{device_id}-{time.monotonic_ns() % 100000}"
        role = f"device-{device_id}"
        self.ctrl("createRole", role)
        for acltype, topic in device_acls(device_id):
            self.ctrl("addRoleACL", role, acltype, topic, "allow")
        self.ctrl("createClient", device_id, "-p", password)
        self.ctrl("addClientRole", device_id, role)
        self.ctrl("addGroupClient", DEVICE_GROUP, device_id)
        self.passwords[device_id] = password
        return password

    def disabled(self, username: str) -> bool:
        """What the plugin saved (it writes its JSON after every change, in place: a read may
        catch the file empty or half written, and is then tried again)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                clients = json.loads(self.dynsec_json.read_text())["clients"]
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        (client,) = [c for c in clients if c["username"] == username]
        return bool(client.get("disabled", False))

    def control_publishes(self) -> list[str]:
        """Broker log lines of PUBLISH packets received on the dynamic-security control topic."""
        return [line for line in self.log().splitlines()
                if "Received PUBLISH" in line and "'$CONTROL/dynamic-security/v1'" in line]


def conn_args(port: int, user: str, password: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", password]


class LoginSub(Sub):
    """gwkit.Sub (background mosquitto_sub -d -v, ready at SUBACK) with a user name and password."""

    def __init__(self, conn: list[str], *topics: str, wait_s: int = 60) -> None:
        super().__init__(None, *topics, wait_s=wait_s, conn=conn)


class LoginDevice(Device):
    """gwkit.Device whose mosquitto_pub/sub log in with its own account (user name = device id)."""

    def __init__(self, device_id: str, broker: DynsecBroker, work: Path, token: str) -> None:
        super().__init__(device_id, broker.port, work, token)
        self.password = broker.add_device(device_id)
        self.conn = conn_args(broker.port, device_id, self.password)

    def send(self, op: str, body) -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        run(["mosquitto_pub", *self.conn, "-q", "1", "-t", gwkit.req(self.id, op), "-m", body], timeout=15)

    def subscribe(self, **kw) -> Sub:
        return LoginSub(self.conn, gwkit.resp(self.id))


def _client(client_id: str, user: str, password: str) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.username_pw_set(user, password)
    return client


def connect_once(port: int, user: str, password: str, timeout: float = 5) -> paho.ReasonCode:
    """One CONNECT with these credentials: the broker's CONNACK reason code (then disconnect)."""
    client = _client(f"probe-{user}-{time.monotonic_ns()}", user, password)
    codes: list = []
    client.on_connect = lambda c, u, flags, rc, props: codes.append(rc)
    client.connect("127.0.0.1", port, keepalive=10)
    deadline = time.monotonic() + timeout
    try:
        while not codes and time.monotonic() < deadline:
            client.loop(0.05)
    finally:
        client.disconnect()
        client.loop(0.05)
    assert codes, f"no CONNACK for {user} within {timeout}s"
    return codes[0]


class Session:
    """A device's live MQTT session (paho, its own network thread); remembers when the broker dropped it."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 5) -> None:
        self.user = user
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.dropped_at: float | None = None
        self.drop_reason: str | None = None
        self._client = _client(f"{user}-session", user, password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.reconnect_delay_set(5, 10)   # paho's thread would retry; not within the test's windows
        self._client.connect("127.0.0.1", port, keepalive=10)
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.close()
            raise AssertionError(f"session of {user} not connected within {timeout}s")

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        if not rc.is_failure:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props) -> None:
        if not self.dropped.is_set():
            self.dropped_at, self.drop_reason = time.monotonic(), str(rc)
            self.dropped.set()

    def wait_dropped(self, timeout: float) -> float:
        if not self.dropped.wait(timeout):
            raise AssertionError(f"session of {self.user} still open {timeout}s later")
        return self.dropped_at

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
