"""A burst of enrollments through the real stack (mosquitto, `iomtca gateway run`, `iomtca serve`):
the gateway forwards them in RA batches (POST /ra/v1/batch), every device gets exactly one
certificate (read from the CA's database), a bad request in the burst fails alone, and each new
certificate's OCSP response (handed to the gateway with it) is published retained and says good."""
from __future__ import annotations

import json
import re
import threading

import paho.mqtt.client as paho
import pytest

from tests.gateway import gwkit
from tests.gateway.gwkit import Sub, req

N = 30
BATCH_LINE = re.compile(r"RA batch of (\d+): (\d+) issued, (\d+) refused")


@pytest.fixture
def stack(stack_factory):
    return stack_factory().start()


def burst(port: int, messages: list[tuple[str, bytes]], timeout: float = 20) -> None:
    """Publish every message (QoS 1) from one connection as fast as it goes; back once all are PUBACKed."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="batch-burst", protocol=paho.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *a, **k: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK from the broker"
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout)
            assert info.is_published(), "the broker did not acknowledge a request"
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_burst_goes_in_batches_and_each_device_gets_one_certificate(stack):
    devices = stack.devices(*((f"bt-{i:02d}", "pumpx") for i in range(N)))
    keys, messages = {}, []
    for device_id, dev in devices.items():
        keys[device_id], csr = dev.new_key_and_csr()
        token = "not-the-token" if device_id == "bt-07" else None
        messages.append((req(device_id, "simpleenroll"), json.dumps(dev.enroll_request("b-1", csr, token)).encode()))
    with Sub(stack.port, f"{gwkit.ROOT}/dev/+/resp/simpleenroll") as sub:
        burst(stack.port, messages)
        answers = sub.wait_count(lambda m: m.json().get("status") in ("ok", "error"), N, 60, "final answers")
    by_device = {m.topic.split("/")[-3]: m.json() for m in answers}
    assert set(by_device) == set(devices)
    refused = by_device.pop("bt-07")
    assert refused["status"] == "error" and refused["error"]["code"] == "unauthorized", refused
    for device_id, answer in by_device.items():
        assert answer["status"] == "ok" and answer["id"] == "b-1", answer
        assert "ocsp" not in answer    # the OCSP response goes to the PKI publisher, not into the answer
        cert = devices[device_id].adopt(answer, keys[device_id])
        gwkit.openssl_verify(stack.home, cert)

    # exactly one certificate per device, none for the refused one
    certs = gwkit.device_certs(stack.home, "bt-")
    assert sorted(certs) == sorted(by_device)
    assert all(len(rows) == 1 for rows in certs.values()), {d: len(r) for d, r in certs.items() if len(r) != 1}
    issued = {d: rows[0]["serial"] for d, rows in certs.items()}
    assert issued == {d: gwkit.cert_serial(a) for d, a in by_device.items()}

    # every request went through the batch call, and the burst shared batches
    batches = [tuple(map(int, m.groups())) for m in BATCH_LINE.finditer(stack.ca.proc.stderr_text())]
    assert sum(b[0] for b in batches) == N and sum(b[1] for b in batches) == N - 1, batches
    assert max(b[0] for b in batches) > 1, batches

    # the OCSP response that came with each certificate is up, retained, and says good
    for device_id, answer in list(by_device.items())[:5]:
        der = gwkit.retained(stack.port, f"{gwkit.ROOT}/pki/ocsp/{gwkit.cert_serial(answer)}", wait_s=5)
        assert der is not None and gwkit.ocsp_status(der) == "good", device_id
