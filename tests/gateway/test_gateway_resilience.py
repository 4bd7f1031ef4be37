"""The gateway across failures: the CA down, the gateway killed, the broker restarted, two
gateways on one shared subscription. Each test has its own broker, server and gateway(s).
"""
from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from tests.gateway import gwkit
from tests.gateway.gwkit import ROOT, Gateway, Sub, pub_json, req, resp


ALL_RESPONSES = f"{ROOT}/dev/+/resp/#"


def answers_by_id(sub: Sub, prefix: str) -> dict[str, list[dict]]:
    """Final answers (not `queued`) per request id, for devices whose id starts with prefix."""
    out: dict[str, list[dict]] = {}
    for msg in list(sub.messages):
        if msg.topic.startswith(f"{ROOT}/dev/{prefix}"):
            body = msg.json()
            if body.get("status") != "queued":
                out.setdefault(body["id"], []).append(body)
    return out


def send_enrollments(devs: dict, ids: dict[str, str]) -> None:
    for device_id, dev in devs.items():
        _, csr = dev.new_key_and_csr()
        dev.send("simpleenroll", dev.enroll_request(ids[device_id], csr))


# -- a revoked gateway -------------------------------------------------------------------------------
def test_a_revoked_gateway_keeps_requests_instead_of_answering_them_with_its_refusal(stack_factory):
    """After `iomtca gateway revoke`, the CA refuses the gateway itself (X-Refused: ra-credential):
    that is no answer for the device. Its request is told `queued` and kept, and the gateway says
    at ERROR why; nothing is issued."""
    stack = stack_factory().start("gw-revoked")
    dev = stack.devices(("rs-rv-1", "pumpx"))["rs-rv-1"]
    gwkit.iomtca(stack.home, "gateway", "revoke", "gw-revoked")
    _, csr = dev.new_key_and_csr()
    with Sub(stack.port, ALL_RESPONSES) as sub:
        dev.send("simpleenroll", dev.enroll_request("rv-1", csr))
        assert sub.answer("rv-1", 10, final=False)["status"] == "queued"
        sub.quiet_for(3)
    assert [m.json()["status"] for m in sub.messages if m.json().get("id") == "rv-1"] == ["queued"]
    gwkit.wait_until(lambda: "ERROR gateway.service CA unreachable, queueing requests: the CA refuses this gateway"
                     in stack.gateway.proc.stderr_text(), 10, what="the gateway to say it is refused")
    assert gwkit.certificates(stack.home, "rs-rv-1") == []


# -- 3. the CA down ----------------------------------------------------------------------------------
def test_ca_down_requests_are_queued_then_all_answered(stack_factory):
    """Every request gets `queued` at once, then its final ok answer with the same id, exactly once.

    Not asserted: that the final answers come in arrival order. The 8 forwarders send queued
    requests concurrently, so the CA issues and the gateway answers them in whatever order the
    calls finish (seen: rs-q-5 issued and answered before rs-q-4) — reported as a bug; a strict
    order check here would be flaky, not a reliable xfail.
    """
    stack = stack_factory().start()
    devs = stack.devices(*[(f"rs-q-{i}", "pumpx") for i in range(6)])
    keys = {}
    stack.ca.stop()
    with Sub(stack.port, ALL_RESPONSES) as sub:
        order = []
        for device_id, dev in devs.items():
            key, csr = dev.new_key_and_csr()
            keys[device_id] = key
            req_id = f"q-{device_id}"
            sent = time.monotonic()
            dev.send("simpleenroll", dev.enroll_request(req_id, csr))
            msg = sub.wait_for(lambda m, r=req_id: m.json().get("id") == r, 5, f"queued for {req_id}")
            assert msg.json() == {"id": req_id, "status": "queued"}
            assert msg.at - sent < 1.5, f"queued came {msg.at - sent:.2f}s after the request"
            order.append(req_id)
        assert answers_by_id(sub, "rs-q-") == {}, "answered while the CA was down?"

        stack.ca.restart_same_port()
        for req_id in order:
            sub.answer(req_id, 20)
        sub.quiet_for(0.5)
    finals = [m.json() for m in sub.messages if m.json().get("status") != "queued"]
    assert sorted(a["id"] for a in finals) == sorted(order), "a request answered twice or not at all"
    for answer in finals:
        assert answer["status"] == "ok", answer
        device_id = answer["id"][2:]
        cert = devs[device_id].adopt(answer, keys[device_id])
        gwkit.openssl_verify(stack.home, cert)


# -- 4. the gateway killed mid-queue -----------------------------------------------------------------
def test_gateway_killed_mid_queue_loses_nothing_and_issues_once(stack_factory):
    # retry_every = 30s: once every request is queued the forwarders sleep and hold no claim, so
    # the SIGKILL cannot land inside a claim (that case is the claim_next bug, tested below with a
    # hanging CA; with the default 2 s it makes this test fail about one run in four)
    stack = stack_factory(gateway='retry_every = "30s"').start("gw-kill")
    devs = stack.devices(*[(f"rs-k-{i}", "pumpx") for i in range(8)])
    ids = {d: f"k-{d}" for d in devs}
    early = dict(list(devs.items())[:5])
    late = dict(list(devs.items())[5:])
    stack.ca.stop()
    with Sub(stack.port, ALL_RESPONSES) as sub:
        send_enrollments(early, ids)
        for device_id in early:
            assert sub.answer(ids[device_id], 5, final=False)["status"] == "queued"
        time.sleep(0.5)                            # the forwarders' last attempts are over
        stack.gateway.kill()                       # SIGKILL, requests in its inbox
        send_enrollments(late, ids)                # while no gateway runs: held by the broker session
        stack.ca.restart_same_port()
        stack.gateway.start()                      # same --client-id, same directory
        for device_id in devs:
            sub.answer(ids[device_id], 25)
        sub.quiet_for(1.0)
    finals = answers_by_id(sub, "rs-k-")
    assert set(finals) == set(ids.values())
    issued = gwkit.device_certs(stack.home, "rs-k-")
    for device_id, req_id in ids.items():
        certs = {a["cert"] for a in finals[req_id]}
        assert all(a["status"] == "ok" for a in finals[req_id]), finals[req_id]
        assert len(certs) == 1, f"{device_id} got different certificates for {req_id}"
        assert len(issued.get(device_id, [])) == 1, f"{device_id} has {len(issued.get(device_id, []))} certificates"
        assert issued[device_id][0]["serial"] == gwkit.cert_serial(finals[req_id][0])


# -- 5. the broker restarted -------------------------------------------------------------------------
def probe_until_served(stack, timeout: float = 40) -> float:
    """Publish cacerts probes until one is answered (the gateway is back); returns the time it took."""
    started = time.monotonic()
    deadline = started + timeout
    n = 0
    with Sub(stack.port, resp("rs-probe")) as sub:
        while time.monotonic() < deadline:
            n += 1
            pub_json(stack.port, req("rs-probe", "cacerts"), {"id": f"probe-{n}"})
            try:
                sub.wait_for(lambda m: True, 1.0, "a probe answer")
                return time.monotonic() - started
            except AssertionError:
                continue
    raise AssertionError(f"gateway did not serve again within {timeout}s")


def test_broker_restart_gateway_reconnects_and_serves(stack_factory):
    stack = stack_factory().start()
    dev = stack.devices(("rs-b-1", "pumpx"))["rs-b-1"]
    crl_before = gwkit.wait_until(lambda: gwkit.retained(stack.port, f"{ROOT}/pki/crl", 1), 5,
                                  what="the retained CRL")
    stack.broker.restart()
    # persistence is on: retained publications survive the broker restart
    assert gwkit.retained(stack.port, f"{ROOT}/pki/crl", 1) == crl_before
    probe_until_served(stack)
    answer = dev.enroll("b-1")
    assert answer["status"] == "ok", answer
    gwkit.openssl_verify(stack.home, dev.cert)
    assert stack.gateway.proc.alive


def test_request_published_before_the_gateway_reconnects_is_not_lost(stack_factory):
    stack = stack_factory().start()
    dev = stack.devices(("rs-b-2", "pumpx"))["rs-b-2"]
    _, csr = dev.new_key_and_csr()
    stack.broker.stop()
    time.sleep(2.5)             # the gateway's reconnect back-off has grown past its first 1 s step
    stack.broker.start()
    with dev.subscribe() as sub:
        dev.send("simpleenroll", dev.enroll_request("b-2", csr))
        log = stack.broker.log()
        published = log.find("'iomt/v1/dev/rs-b-2/req/simpleenroll'")
        reconnected = log.find(f"as {stack.gateway.client_id} ")
        if reconnected != -1 and reconnected < published:
            pytest.skip("the gateway reconnected before the request was published; nothing shown")
        answer = sub.answer("b-2", 6)
    assert answer["status"] == "ok"


# -- 6. two gateways on the shared subscription ------------------------------------------------------
def test_two_gateways_answer_each_request_exactly_once(stack_factory):
    stack = stack_factory(gateway='share_group = "iomtca"').start("gw-a")  # $share: one answer each
    stack.add_gateway("gw-b", publish_pki=False)
    devs = stack.devices(*[(f"rs-t-{i:02d}", "pumpx") for i in range(20)])
    ids = {d: f"t-{d}" for d in devs}
    with Sub(stack.port, ALL_RESPONSES) as sub:
        send_enrollments(devs, ids)
        for req_id in ids.values():
            sub.answer(req_id, 20)
        sub.quiet_for(1.5)
    finals = answers_by_id(sub, "rs-t-")
    assert {k: len(v) for k, v in finals.items()} == {req_id: 1 for req_id in ids.values()}
    assert all(a[0]["status"] == "ok" for a in finals.values())
    issued = gwkit.device_certs(stack.home, "rs-t-")
    assert {d: len(c) for d, c in issued.items()} == {d: 1 for d in devs}
    # both gateways took part (the broker's log names the receiver of each request)
    log = stack.broker.log()
    per_gateway = {gw: len(re.findall(rf"Sending PUBLISH to {gw} \([^)]*'iomt/v1/dev/rs-t-\d+/req/", log))
                   for gw in ("gw-a", "gw-b")}
    assert sum(per_gateway.values()) == 20 and min(per_gateway.values()) > 0, per_gateway


# -- a gateway restarted after dying mid-call --------------------------------------------------------
class Tarpit:
    """Accepts TCP connections and never answers: a CA that hangs."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            self.accepted.append(conn)
            self.connected.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_restarted_gateway_takes_back_its_own_claims(stack_factory):
    stack = stack_factory()
    stack.broker.start()
    stack.ca.start()   # the gateway enrolls (gateway init) with the real CA first, then runs against the tarpit
    tarpit = Tarpit()
    try:
        gw = Gateway(stack.home, stack.broker, f"https://127.0.0.1:{tarpit.port}", "gw-claim", stack.logs,
                     publish_pki=False, enroll_url=stack.ca.est_url)
        stack.ca.stop()
        stack.gateways.append(gw)
        gw.start()
        dev = stack.devices(("rs-c-1", "pumpx"))["rs-c-1"]
        _, csr = dev.new_key_and_csr()
        with dev.subscribe() as sub:
            dev.send("simpleenroll", dev.enroll_request("c-1", csr))
            assert tarpit.connected.wait(5), "the gateway never called the CA"
            gw.kill()                                   # mid-call: the request is claimed
            tarpit.close()
            stack.ca.start(tarpit.port)                 # the real CA, same URL
            gw.start()
            answer = sub.answer("c-1", 8)
    finally:
        tarpit.close()
    assert answer["status"] == "ok"


def test_presence_to_a_hanging_ca_does_not_hold_up_other_requests(stack_factory):
    stack = stack_factory()
    stack.broker.start()
    stack.ca.start()   # the gateway enrolls (gateway init) with the real CA first
    ca_port = gwkit.free_port()            # nothing listens yet: the CA is down (refused)
    gw = Gateway(stack.home, stack.broker, f"https://127.0.0.1:{ca_port}", "gw-hang", stack.logs,
                 publish_pki=False, enroll_url=stack.ca.est_url)
    stack.ca.stop()
    stack.gateways.append(gw)
    gw.start()
    with Sub(stack.port, ALL_RESPONSES) as sub:
        pub_json(stack.port, req("rs-h-0", "cacerts"), {"id": "h-0"})
        assert sub.answer("h-0", 5, final=False)["status"] == "queued"   # the gateway knows the CA is down
        tarpit = Tarpit(ca_port)           # now the CA hangs instead
        try:
            gwkit.pub(stack.port, f"{ROOT}/dev/rs-h-a/presence", "online", retain=True)
            sent = time.monotonic()
            pub_json(stack.port, req("rs-h-b", "cacerts"), {"id": "h-b"})
            queued = sub.wait_for(lambda m: m.json().get("id") == "h-b", 4, "queued for h-b")
        finally:
            tarpit.close()
    assert queued.json()["status"] == "queued"
    assert queued.at - sent < 1.5


# -- the CA server's own shutdown while a gateway long-polls it --------------------------------------
def test_serve_exits_promptly_on_sigterm_while_a_gateway_long_polls(stack_factory):
    stack = stack_factory().start()
    dev = stack.devices(("rs-s-1", "pumpx"))["rs-s-1"]
    answer = dev.enroll("s-1")
    serial = gwkit.cert_serial(answer)
    with Sub(stack.port, f"{ROOT}/pki/events") as events:
        gwkit.iomtca(stack.home, "cert", "revoke", serial)
        events.wait_for(lambda m: m.json().get("serial") == serial, 5, "the revocation event")
    time.sleep(0.3)   # the gateway has started its next long poll
    took = stack.ca.stop(grace=5)
    assert took < 5, f"iomtca serve needed {took:.1f}s to stop"
