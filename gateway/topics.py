"""The MQTT contract's topic scheme (../shared/MQTT_CONTRACT.md v1), in one place."""
from __future__ import annotations

from dataclasses import dataclass

from common.ids import DEVICE_ID_RE

DEFAULT_ROOT = "iomt/v1"
# `posture` is the signed one (CMS over the posture JSON); the plain `posture` topic is a report only
OPS = ("cacerts", "csrattrs", "simpleenroll", "simplereenroll", "ack", "posture")


@dataclass(frozen=True)
class Topics:
    root: str = DEFAULT_ROOT

    def request(self, device_id: str, op: str) -> str:
        return f"{self.root}/dev/{device_id}/req/{op}"

    def response(self, device_id: str, op: str) -> str:
        return f"{self.root}/dev/{device_id}/resp/{op}"

    def presence(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/presence"

    def posture(self, device_id: str) -> str:
        """The plain (unsigned, reported-only) posture topic; signed posture is `request(id, "posture")`."""
        return f"{self.root}/dev/{device_id}/posture"

    def notify(self, device_id: str) -> str:
        return f"{self.root}/dev/{device_id}/notify"

    @property
    def crl(self) -> str:
        return f"{self.root}/pki/crl"

    def ocsp(self, serial_hex: str) -> str:
        return f"{self.root}/pki/ocsp/{serial_hex}"

    @property
    def events(self) -> str:
        return f"{self.root}/pki/events"

    # What the gateway subscribes to (wildcards over devices and ops).
    @property
    def requests_filter(self) -> str:
        return f"{self.root}/dev/+/req/+"

    @property
    def presence_filter(self) -> str:
        return f"{self.root}/dev/+/presence"

    @property
    def posture_filter(self) -> str:
        return f"{self.root}/dev/+/posture"

    def parse(self, topic: str) -> "DeviceTopic | None":
        """The device, kind ("req", "presence", "posture") and op of a device topic; None otherwise."""
        prefix = f"{self.root}/dev/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if not parts or not DEVICE_ID_RE.match(parts[0]):
            return None
        if len(parts) == 3 and parts[1] == "req":
            return DeviceTopic(parts[0], "req", parts[2])
        if len(parts) == 2 and parts[1] in ("presence", "posture"):
            return DeviceTopic(parts[0], parts[1], None)
        return None


@dataclass(frozen=True)
class DeviceTopic:
    device_id: str
    kind: str
    op: str | None


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: each message goes to one subscriber of the group."""
    return f"$share/{group}/{topic_filter}"
