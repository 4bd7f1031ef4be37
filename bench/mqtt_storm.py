"""Figures 7 and 8: MQTT enrollment storm and reconnect storm, through real mosquitto, the real
`iomtca gateway` and `iomtca serve`, against the bare broker doing the same round trips.

7. N devices (10,000; quick 500), connected and subscribed, publish a real `simpleenroll` (their
   own CSR and one-time token) at once. Measured: from the first publish until every device holds
   a certificate, and per-device latency. Baseline, same run, same generator: a fresh mosquitto
   with a responder that answers each request with a payload of the size of our answers.
8. The same devices, now enrolled, publish a real `simplereenroll` (CMS signed with the certificate
   they got in 7) over a clean session and go away before the answer, so the answer exists only in
   the gateway's durable outbox. Then all come back at once (persistent session, subscribe,
   presence `online`), the gateway re-publishes, each device acks. Measured: until the gateway has
   recorded every ack, and nothing is lost (count). Baseline: a fresh mosquitto that queued one
   same-size message per device in its persistent session; until every device has it and acked.

The devices run in this process on bench/mqtt_load.py; keys, CSRs and CMS are made before the
clock starts. CPU seconds of each process over the measured window are recorded (where the time goes).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import resource
import secrets
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from ca.signer import generate_key
from ca.store.sqlite import MIGRATIONS
from ca.timefmt import to_rfc3339, utc_now
from firmware_sim.est_client import make_csr
from firmware_sim.mqtt_client import b64
from gateway.service import BATCH, WORKERS

from . import stack
from .common import Figure, Server, init_ca, stop
from .mqtt_load import ROOT, Client, connect_all

NUMBERS = (7, 8)
BAR_DEVICES = 10_000
BAR_SECONDS = 10.0


# -- processes -------------------------------------------------------------------------------
class Gateway(stack.Gateway):
    """`iomtca gateway` whose durable store the storms read to know what it has recorded."""

    def __init__(self, home: Path, broker: stack.Broker, server: Server) -> None:
        super().__init__(home, broker, server)
        self.db = self.gwdir / "gateway.db"

    def count(self, sql: str) -> int:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU of a process and, unless told not to, its live children (`serve --workers N`)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + (sum(cpu_seconds(int(child)) for child in kids) if children else 0.0)


class CPU:
    """CPU seconds used by each named process between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def _now(self) -> dict[str, float]:
        # the generator is this process, whose children are the processes measured beside it
        return {name: cpu_seconds(pid, children=name != "generator") for name, pid in self.pids.items()}

    def start(self) -> None:
        self.t0 = self._now()

    def stop(self) -> dict[str, float]:
        return {name: round(sec - self.t0[name], 2) for name, sec in self._now().items()}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- devices ---------------------------------------------------------------------------------
def register(db: Path, count: int) -> dict[str, str]:
    """`count` devices with a live one-time token each, straight into the CA database (the rows
    Registry.add_many writes, without the audit entries): device id -> token."""
    now = utc_now().replace(microsecond=0)
    tokens = {f"storm-{i:05d}": secrets.token_urlsafe(24) for i in range(count)}
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS), "run iomtca init first"
    with conn:
        conn.executemany("INSERT INTO devices (id, model, owner, status, created_at) "
                         "VALUES (?, 'bench-pump', 'bench', 'active', ?)", ((d, to_rfc3339(now)) for d in tokens))
        conn.executemany("INSERT INTO tokens (device_id, digest, created_at, expires_at) VALUES (?, ?, ?, ?)",
                         ((d, hashlib.sha256(t.encode()).digest(), to_rfc3339(now),
                           to_rfc3339(now + timedelta(days=1))) for d, t in tokens.items()))
    conn.close()
    return tokens


class Device:
    """One simulated device: its own connection, client id and topics; a request and its answer."""

    __slots__ = ("id", "key", "cert", "new_key", "req_id", "op", "payload", "client", "sent", "got",
                 "answer", "acked", "queued")

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.key = self.cert = self.new_key = None
        self.client: Client | None = None
        self.reset("", "", b"")

    def reset(self, op: str, req_id: str, payload: bytes) -> None:
        self.op, self.req_id, self.payload = op, req_id, payload
        self.sent = self.got = self.acked = None
        self.answer = None
        self.queued = 0

    @property
    def resp_filter(self) -> str:
        return f"{ROOT}/dev/{self.id}/resp/+"


def enroll_requests(devices: list[Device], tokens: dict[str, str]) -> None:
    for d in devices:
        d.new_key = generate_key("ec-p256")
        csr = make_csr(d.new_key, d.id).public_bytes(serialization.Encoding.DER)
        d.reset("simpleenroll", "e1", json.dumps({"id": "e1", "csr": b64(csr), "token": tokens[d.id]}).encode())


def renew_requests(devices: list[Device]) -> None:
    """A new key and CSR signed (CMS, with signingTime) by the current certificate and key, as
    firmware_sim's devices do it."""
    for d in devices:
        d.new_key = generate_key("ec-p256")
        csr = make_csr(d.new_key, d.id).public_bytes(serialization.Encoding.DER)
        cms = (pkcs7.PKCS7SignatureBuilder().set_data(csr).add_signer(d.cert, d.key, hashes.SHA256())
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))
        d.reset("simplereenroll", "r1", json.dumps({"id": "r1", "cms": b64(cms)}).encode())


class Fleet:
    """The devices of one measurement, wired to their MQTT connections."""

    def __init__(self, devices: list[Device], port: int, *, ack: bool = True) -> None:
        self.devices = devices
        self.port = port
        self.ack = ack
        self.answered = 0
        self.acked = 0
        self.all_answered = asyncio.Event()
        self.all_acked = asyncio.Event()
        for d in devices:
            d.client = Client(d.id, self._on_message)
            d.client.device = d

    def _on_message(self, client: Client, topic: str, payload: bytes) -> None:
        d: Device = client.device
        if d.got is not None or not topic.endswith("/resp/" + d.op):
            return  # a repeat (re-published on presence and queued by the broker): the first one counts
        try:
            answer = json.loads(payload)
        except ValueError:
            return
        if answer.get("id") != d.req_id:
            return
        if answer.get("status") == "queued":
            d.queued += 1
            return
        d.got, d.answer = time.perf_counter(), answer
        self.answered += 1
        if self.answered == len(self.devices):
            self.all_answered.set()
        if self.ack and answer.get("status") == "ok":
            fut = client.publish(f"{ROOT}/dev/{d.id}/req/ack", json.dumps({"id": d.req_id}).encode())
            fut.add_done_callback(lambda f, d=d: self._acked(f, d))

    def _acked(self, fut: asyncio.Future, d: Device) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        d.acked = time.perf_counter()
        self.acked += 1
        if self.acked == len(self.devices):
            self.all_acked.set()

    async def connect(self, *, clean: bool, deadline: float, wills: bool = False, subscribe: bool = True) -> int:
        ok = await connect_all([d.client for d in self.devices], self.port, clean=clean, deadline=deadline,
                               wills=wills, subscribe=(lambda c: c.device.resp_filter) if subscribe else None)
        return len(ok)

    def publish_requests(self) -> list[asyncio.Future]:
        """Every connected device publishes its request now; the futures resolve on PUBACK."""
        pubacks = []
        for d in self.devices:
            if d.client.transport is not None and not d.client.transport.is_closing():
                d.sent = time.perf_counter()
                pubacks.append(d.client.publish(f"{ROOT}/dev/{d.id}/req/{d.op}", d.payload))
        return pubacks

    async def wait(self, event: asyncio.Event, deadline: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        for d in self.devices:
            d.client.disconnect()
        await asyncio.sleep(0.2)

    def latencies(self) -> list[float]:
        return sorted(d.got - d.sent for d in self.devices if d.got is not None and d.sent is not None)

    def ok(self) -> list[Device]:
        return [d for d in self.devices if d.answer is not None and d.answer.get("status") == "ok"]


def pct(values: list[float], p: float) -> float | None:
    return round(values[min(len(values) - 1, int(p * len(values)))], 3) if values else None


def issued_per_device(db: Path, devices: list[Device]) -> dict:
    """What the CA's database holds for these devices: certificates in all, and how many devices
    have exactly one (after figure 7) or two (after figure 8's renewals). Nothing issued twice."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = dict(conn.execute("SELECT device_id, count(*) FROM certificates WHERE device_id LIKE 'storm-%' "
                                 "GROUP BY device_id").fetchall())
    finally:
        conn.close()
    counts = [rows.get(d.id, 0) for d in devices]
    return {"certificates": sum(counts), "with_one": counts.count(1), "with_two": counts.count(2),
            "with_more": sum(1 for c in counts if c > 2)}


def adopt_certificates(devices: list[Device], issuer: x509.Certificate) -> int:
    """Check every answer outside the clock: a certificate signed by our CA for the device's new
    key. Devices then hold it (key and certificate) for the renewal of figure 8."""
    good = 0
    for d in devices:
        if d.answer is None or d.answer.get("status") != "ok":
            continue
        cert = x509.load_der_x509_certificate(base64.b64decode(d.answer["cert"]))
        cert.verify_directly_issued_by(issuer)
        if cert.public_key() != d.new_key.public_key():
            continue
        d.cert, d.key = cert, d.new_key
        good += 1
    return good


# -- measurements ----------------------------------------------------------------------------
async def enrollment_storm(devices: list[Device], port: int, limit: float, pids: dict[str, int] | None = None
                           ) -> dict:
    """Figure 7's storm (ours or the baseline, depending on who answers on `port`)."""
    fleet = Fleet(devices, port)
    connected = await fleet.connect(clean=False, deadline=time.monotonic() + limit)
    cpu = CPU(pids or {})
    cpu.start()
    deadline = time.monotonic() + limit
    start = time.perf_counter()
    fleet.publish_requests()
    complete = await fleet.wait(fleet.all_answered, deadline)
    end = max((d.got for d in devices if d.got is not None), default=time.perf_counter())
    used = cpu.stop()
    await fleet.wait(fleet.all_acked, time.monotonic() + min(10.0, limit))  # acks reach the gateway
    await fleet.close()
    lat = fleet.latencies()
    return {"devices": len(devices), "connected": connected, "answered": fleet.answered, "ok": len(fleet.ok()),
            "complete": complete, "seconds": round(end - start, 3), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
            "queued_notices": sum(d.queued for d in devices), "acked": fleet.acked, "cpu_s": used,
            "answer_bytes": int(statistics.median(len(json.dumps(d.answer, separators=(",", ":")))
                                                  for d in devices if d.answer) if fleet.answered else 0)}


async def leave_renewals(devices: list[Device], port: int, limit: float) -> dict:
    """Figure 8, before the clock: each device publishes its renewal over a clean session and
    leaves once the broker has it (PUBACK), so its answer can only come from the gateway's outbox."""
    fleet = Fleet(devices, port, ack=False)
    connected = await fleet.connect(clean=True, subscribe=False, deadline=time.monotonic() + limit)
    pubacks = fleet.publish_requests()
    done, _ = await asyncio.wait(pubacks, timeout=limit) if pubacks else (set(), set())
    await fleet.close()
    return {"connected": connected, "stored": sum(1 for f in done if f.exception() is None)}


async def reconnect_storm(devices: list[Device], port: int, limit: float, gateway: Gateway | None = None,
                          pids: dict[str, int] | None = None) -> dict:
    """Figure 8's storm: everyone back at once; until every answer is delivered and acknowledged
    (recorded by the gateway when there is one; PUBACKed by the broker for the baseline)."""
    for d in devices:
        d.reset(d.op, d.req_id, d.payload)
    fleet = Fleet(devices, port)
    cpu = CPU(pids or {})
    cpu.start()
    deadline = time.monotonic() + limit
    start = time.perf_counter()
    # persistent session, subscribe, then say `online` (retained) as the contract asks
    connected = await fleet.connect(clean=False, wills=gateway is not None, deadline=deadline)
    connect_s = time.perf_counter() - start
    if gateway is not None:
        for d in devices:
            if d.client.transport is not None and not d.client.transport.is_closing():
                d.client.publish(f"{ROOT}/dev/{d.id}/presence", b"online", retain=True)
    delivered = await fleet.wait(fleet.all_answered, deadline)
    delivered_at = time.perf_counter()
    acked = await fleet.wait(fleet.all_acked, deadline)
    recorded, gw_acked = acked, fleet.acked
    if gateway is not None:
        sql = "SELECT count(*) FROM requests WHERE op = 'simplereenroll' AND state = 'acked'"
        while (gw_acked := await asyncio.to_thread(gateway.count, sql)) < len(devices) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        recorded = gw_acked == len(devices)
    end = time.perf_counter()
    used = cpu.stop()
    await fleet.close()
    lat = sorted(d.acked - start for d in devices if d.acked is not None)
    return {"devices": len(devices), "connected": connected, "connect_s": round(connect_s, 3),
            "delivered": fleet.answered, "ok": len(fleet.ok()), "device_acked": fleet.acked, "acked": gw_acked,
            "complete": delivered and acked and recorded, "seconds": round(end - start, 3),
            "delivered_s": round(delivered_at - start, 3), "p50_ack": pct(lat, 0.5), "p99_ack": pct(lat, 0.99),
            "cpu_s": used}


async def queue_in_broker(devices: list[Device], port: int, size: int, limit: float) -> int:
    """Baseline 8, before the clock: persistent sessions subscribed, then gone; one same-size
    QoS 1 message per device queued by mosquitto."""
    fleet = Fleet(devices, port)
    connected = await fleet.connect(clean=False, deadline=time.monotonic() + limit)
    await fleet.close()
    sender = Client("bench-queuer")
    await sender.connect(port, clean=True)
    futures = []
    for d in devices:
        answer = json.dumps({"id": d.req_id, "status": "ok", "pad": ""}).encode()
        answer = answer[:-2] + b"x" * max(0, size - len(answer)) + answer[-2:]
        futures.append(sender.publish(f"{ROOT}/dev/{d.id}/resp/{d.op}", answer))
    await asyncio.wait_for(asyncio.gather(*futures), limit)
    sender.disconnect()
    return connected


def echo_responder(port: int, size: int, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.mqtt_load", "echo", str(port), str(size), str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(15)
    if not out or "ready" not in out[0]:
        stop(proc)
        raise RuntimeError("echo responder did not start")
    return proc


# -- the figures -----------------------------------------------------------------------------
def run(work: Path, quick: bool) -> list[Figure]:
    n = 500 if quick else BAR_DEVICES
    limit = 15.0 if quick else 120.0       # every wait has this deadline; what completed is recorded
    fd_limit = raise_fd_limit()
    home = init_ca(work / "fig78")
    tokens = register(home / "iomtca.db", n)
    issuer = x509.load_pem_x509_certificate((home / "issuing.pem").read_bytes())
    devices = [Device(d) for d in tokens]
    t0 = time.monotonic()
    enroll_requests(devices, tokens)
    prep7 = time.monotonic() - t0
    enroll_payloads = {d.id: d.payload for d in devices}
    r: dict = {"devices": n, "fd_limit": fd_limit}
    # one server process: `--workers 2` was no faster on 2 cores (bench/PROFILES.md)
    with stack.Broker(work / "fig78-broker") as broker, Server(home) as server, Gateway(home, broker, server) as gw:
        pids = {"server": server.pid, "gateway": gw.proc.pid, "mosquitto": broker.proc.pid, "generator": os.getpid()}
        with Profile("fig7", {"server": server.pid, "gateway": gw.proc.pid}):
            r["ours7"] = asyncio.run(enrollment_storm(devices, broker.port, limit, pids))
        r["certificates_checked"] = adopt_certificates(devices, issuer)
        r["db7"] = issued_per_device(home / "iomtca.db", devices)
        enrolled = [d for d in devices if d.cert is not None]
        t0 = time.monotonic()
        renew_requests(enrolled)
        prep8 = time.monotonic() - t0
        r["left8"] = asyncio.run(leave_renewals(enrolled, broker.port, limit))
        # before the clock: the gateway has every answer in its outbox
        sql = "SELECT count(*) FROM requests WHERE op = 'simplereenroll' AND state = 'answered'"
        deadline = time.monotonic() + limit
        while (answered := gw.count(sql)) < len(enrolled) and time.monotonic() < deadline:
            time.sleep(0.1)
        r["outbox8"] = answered
        with Profile("fig8", {"server": server.pid, "gateway": gw.proc.pid}):
            r["ours8"] = asyncio.run(reconnect_storm(enrolled, broker.port, limit, gw, pids))
        r["db8"] = issued_per_device(home / "iomtca.db", enrolled)
    size = r["ours7"]["answer_bytes"] or 1500
    for d in devices:  # the same requests again, for the bare broker
        d.reset("simpleenroll", "e1", enroll_payloads[d.id])
    with stack.Broker(work / "fig7-baseline") as broker:
        echo = echo_responder(broker.port, size, limit * 2)
        try:
            r["base7"] = asyncio.run(enrollment_storm(devices, broker.port, limit,
                                                      {"echo": echo.pid, "mosquitto": broker.proc.pid,
                                                       "generator": os.getpid()}))
        finally:
            stop(echo)
    for d in enrolled:
        d.reset("simplereenroll", "r1", b"")
    with stack.Broker(work / "fig8-baseline") as broker:
        asyncio.run(queue_in_broker(enrolled, broker.port, size, limit))
        r["base8"] = asyncio.run(reconnect_storm(enrolled, broker.port, limit, None,
                                                 {"mosquitto": broker.proc.pid, "generator": os.getpid()}))
    r["prep_s"] = {"enroll": round(prep7, 1), "renew": round(prep8, 1)}
    return [figure7(r, quick), figure8(r, quick)]


def _secs(run: dict) -> float | None:
    return run["seconds"] if run["complete"] else None


def figure7(r: dict, quick: bool) -> Figure:
    ours, base = r["ours7"], r["base7"]
    n = r["devices"]
    db = r["db7"]
    once = db["certificates"] == n and db["with_one"] == n   # every device exactly one certificate
    met = None if quick else (ours["complete"] and ours["ok"] == n and once and ours["seconds"] < BAR_SECONDS)
    notes = (f"{n:,} devices, each its own MQTT connection (clean session off, TCP_NODELAY) on one asyncio "
             f"generator (bench/mqtt_load.py), connected and subscribed before the clock; from the first "
             f"publish until every device holds a certificate: {ours['ok']:,} ok of {ours['answered']:,} "
             f"answered, {r['certificates_checked']:,} checked afterwards (issued by our CA for the device's key); "
             f"the CA's database holds {db['certificates']:,} certificates for them, {db['with_one']:,} devices "
             f"with exactly one. "
             f"Latency p50 {ours['p50']} s, p99 {ours['p99']} s (bare broker p50 {base['p50']} s, p99 "
             f"{base['p99']} s, {base['answered']:,} answered); {ours['queued_notices']} `queued` notices. "
             f"CPU seconds over the storm: {ours['cpu_s']} (bare: {base['cpu_s']}). Answers "
             f"{ours['answer_bytes']} bytes, echoed at that size. Ratio > 1: slower than the bare broker."
             + (" Quick mode: the bar is for 10,000 devices and is judged in the full run." if quick else ""))
    miss = "" if met is not False else miss7(r)
    return Figure(7, f"MQTT enrollment storm, {n:,} devices (seconds until all hold a certificate)",
                  _secs(ours), _secs(base), "s", f"bare mosquitto request/response, {n:,} devices, same payload sizes",
                  "10,000 devices in < 10 s", met, "python -m bench.run --only 7", notes=notes, miss=miss,
                  runs={k: r[k] for k in ("ours7", "base7", "prep_s", "db7")})


def figure8(r: dict, quick: bool) -> Figure:
    ours, base = r["ours8"], r["base8"]
    n = ours["devices"]
    lost = r["outbox8"] - ours["acked"]
    db = r["db8"]
    twice = db["certificates"] == 2 * n and db["with_two"] == n   # the enrollment and one renewal each
    met = None if quick else (ours["complete"] and n == r["devices"] and lost == 0 and twice
                              and ours["seconds"] < BAR_SECONDS)
    notes = (f"{n:,} devices had each published a real simplereenroll (CMS signed with the certificate of "
             f"figure 7) over a clean session and left after the PUBACK; {r['outbox8']:,} answers waited in the "
             f"gateway's outbox. All reconnected at once (connected {ours['connected']:,} in {ours['connect_s']} s, "
             f"persistent session, subscribe, presence online): every answer delivered after "
             f"{ours['delivered_s']} s ({ours['delivered']:,}), acks recorded by the gateway {ours['acked']:,} "
             f"after {ours['seconds']} s; lost: {lost}; the CA's database holds {db['certificates']:,} certificates "
             f"for them, {db['with_two']:,} devices with exactly two (enrollment and renewal). "
             f"Bare broker (answers queued in mosquitto's sessions): "
             f"{base['device_acked']:,} delivered and acked in {base['seconds']} s. CPU seconds: {ours['cpu_s']} "
             f"(bare: {base['cpu_s']})."
             + (" Quick mode: the bar is for 10,000 devices and is judged in the full run." if quick else ""))
    miss = "" if met is not False else miss8(r)
    return Figure(8, f"Reconnect storm, {n:,} devices (seconds until every queued answer is acked)",
                  _secs(ours), _secs(base), "s", "bare mosquitto delivering one queued message per session",
                  "10,000 in < 10 s, nothing lost", met, "python -m bench.run --only 8", notes=notes, miss=miss,
                  runs={k: r[k] for k in ("ours8", "base8", "left8", "outbox8", "db8")})


def _cpu_line(run: dict, n: int, wall: float) -> str:
    cpu = run["cpu_s"]
    per = ", ".join(f"{name} {sec} s ({sec / n * 1000:.1f} ms per device)" for name, sec in cpu.items())
    return f"CPU over the window: {per}; {sum(cpu.values()):.1f} of the {2 * wall:.0f} CPU-seconds 2 cores had"


def miss7(r: dict) -> str:
    ours, n = r["ours7"], r["devices"]
    rate = ours["ok"] / ours["seconds"] if ours["seconds"] else 0
    server = ours["cpu_s"].get("server", 0)
    return (f"{ours['ok']:,} certificates in {ours['seconds']} s ({rate:.0f}/s). {_cpu_line(ours, n, ours['seconds'])}. "
            f"The CA's one event loop is the bound: enrollments and renewals reach it in RA batches ({WORKERS} "
            f"calls of up to {BATCH} in flight, enroll/ra_batch.py), so per-request HTTPS and the OCSP fetch per "
            f"certificate are gone, and its {server} CPU-seconds are nearly all issuance: py-spy (bench/PROFILES.md, "
            "`IOMTCA_BENCH_PROFILE=DIR python -m bench.run --only 7`) has `Authority.enroll` at 60% of the server's "
            "samples (building and signing 15%, proof of possession 12%, rows and audit 11%) and each new "
            "certificate's OCSP response, signed from the record in hand, at 10%; the three ECDSA operations per "
            "certificate are a third of its CPU. The gateway is paho reading packets (33%), its durable store "
            "(15%) and checking each OCSP response's signature before publishing it (13%). What would move it: "
            "one write block for a whole batch inside `Authority` (the reads of all items in a few queries, the "
            "audit rows hashed together) and a leaner MQTT client in the gateway; `--workers 2` on this shared "
            "2-core machine was no faster. "
            "The bar needs the whole chain under ~1 ms of CPU per certificate on this shared 2-core machine.")


def miss8(r: dict) -> str:
    ours, n = r["ours8"], r["ours8"]["devices"]
    return (f"{ours['seconds']} s: reconnecting {ours['connected']:,} devices took {ours['connect_s']} s (the bare "
            f"broker run needs as long to reconnect: {r['base8']['connect_s']} s, the generator's and mosquitto's "
            f"connect rate on 2 cores), the last answer arrived at {ours['delivered_s']} s, the last ack was "
            f"recorded at {ours['seconds']} s. {_cpu_line(ours, n, ours['seconds'])}. py-spy of the gateway: paho "
            "reading and decoding the incoming presence, ack and PUBACK packets (38%, of which MQTT 5 property "
            "objects and the in-flight bookkeeping are a third), the durable store (14%, own thread: one "
            "group-committed read of each device's unacknowledged answers and one write of its presence). "
            "What would move it: a leaner MQTT client in the gateway (paho's per-packet Python work is most "
            "of its CPU), several generator processes to reconnect faster, and a cheaper way for a device to "
            "collect its answers than presence plus a look-up per device (e.g. the answers re-published in "
            "one pass over the outbox when many devices come back at once).")


class Profile:
    """With IOMTCA_BENCH_PROFILE=DIR: py-spy records the given processes over a measured window
    (collapsed stacks, DIR/<label>-<name>.txt), to say where the time goes."""

    def __init__(self, label: str, pids: dict[str, int]) -> None:
        self.dir = os.environ.get("IOMTCA_BENCH_PROFILE")
        self.label, self.pids, self.procs = label, pids, []

    def __enter__(self) -> "Profile":
        if self.dir:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            spy = str(Path(sys.executable).with_name("py-spy"))
            self.procs = [subprocess.Popen([spy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
                                            "--subprocesses",
                                            "-o", f"{self.dir}/{self.label}-{name}.txt", "--pid", str(pid)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                          for name, pid in self.pids.items()]
            time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.send_signal(2)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                stop(proc)
