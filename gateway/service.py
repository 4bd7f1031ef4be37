"""The gateway's request path: MQTT request -> durable inbox -> RA call -> durable outbox -> publish.

Every request is stored before the broker hears it was received (manual PUBACK),
forwarded by a pool of workers (one request per device at a time, and one
at a time overall while a backlog drains after an outage, so requests reach the
CA in arrival order), and its final answer is stored before it is published. Enrollments
and renewals go to the CA in batches (one `POST /ra/v1/batch` for up to BATCH of them), each
entry then settled on its own as if it had had its own call; the OCSP response that comes
with a new certificate goes to `on_issued`, so the PKI publisher need not ask for it. A
gateway killed at any point loses nothing and never asks the CA twice for the
same (device, request id); the CA's own request-id check covers the moment
between its answer and our store.

Plain presence and posture messages (anyone on the broker can publish them) are relayed
to the CA as reports only: nothing here, nor at the CA, treats them as trust. Only what
the device signs counts: `simplereenroll` and the signed `posture` request, both
forwarded like every request with the device's CMS for the CA to verify.

Messages are taken in batches (whatever has arrived, up to INTAKE_BATCH) and handled
concurrently, so their writes share one transaction of the durable store (group
commit); the batch is PUBACKed, in arrival order, once all of it is stored. A message
that could not be stored (database locked, disk full) is not PUBACKed: it is kept and
stored again with back-off (the intake waits meanwhile), and if the gateway stops first
the broker re-delivers it (QoS 1, persistent session). Neither acknowledged nor lost.

A request id reused for a different payload (compared by digest) is answered
`bad_request` (MQTT contract): a device that restarted its counter gets no old certificate.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from datetime import timedelta

from common.errors import BadRequestError, CAError, PendingApprovalError
from common.timefmt import Clock, utc_now

from . import codec
from .config import GatewayConfig
from .durable import Durable, Entry, StoreError, digest
from .mqtt import Message, MQTTLink
from .ra_client import CAUnreachableError, GatewayRefusedError, RAClient
from .topics import Topics

log = logging.getLogger(__name__)

# Forwarders, each with one RA call in flight: enrollments and renewals go in batches of up to
# BATCH (enroll/ra_batch.py allows 256), whose items share the CA's group commits, so a few calls
# keep the CA busy; more only queue there: 32 calls of 64 in a storm took over QUEUED_AFTER_S each
# (every device was told `queued` for nothing), and 4 of 128 beat 8 of 64 (bench/PROFILES.md)
WORKERS = 4
BATCH = 128
BATCHED_OPS = ("simpleenroll", "simplereenroll")
UNREACHABLE = "unreachable"
INTAKE_BATCH = 1000     # messages handled (and stored in one transaction) at a time
OCSP_PUBLISHERS = 4     # concurrent OCSP publications of new certificates, off the answer path
QUEUED_AFTER_S = 2.0   # a CA slower than this to answer: tell the device `queued` meanwhile
STORE_RETRY_FIRST_S = 0.2   # a message that could not be stored: tried again after this,
STORE_RETRY_MAX_S = 5.0     # doubling up to this, for as long as it takes (its PUBACK waits)


class GatewayService:
    def __init__(self, config: GatewayConfig, link: MQTTLink, ra: RAClient, durable: Durable,
                 clock: Clock = utc_now, on_issued=None) -> None:
        self.config = config
        self.topics = Topics(config.topic_root)
        self._link = link
        self._ra = ra
        self._db = durable
        self._clock = clock
        self._work_gen = 0                              # bumped whenever there may be new work
        self._work_waiters: list[asyncio.Future] = []
        self._issued_gate = asyncio.Semaphore(OCSP_PUBLISHERS)
        self._background: set[asyncio.Task] = set()
        self._reports_wake = asyncio.Event()
        self._told_queued: set[tuple[str, str]] = set()
        self._on_issued = on_issued  # async callback(serial): e.g. publish its OCSP response at once
        self.ca_reachable = True
        self._draining = False       # a backlog from an outage: forward it one at a time, in order

    # -- intake -----------------------------------------------------------------
    async def run_intake(self) -> None:
        """Consume MQTT messages forever; a bad message is answered or logged, never fatal."""
        queue = self._link.messages
        while True:
            batch = [await queue.get()]
            while len(batch) < INTAKE_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            await self._store(batch)
            for message in batch:
                self._link.ack(message)  # PUBACK only now: each message is stored (or answered or ignored)

    async def _store(self, batch: list[Message]) -> None:
        """Handle a batch until every message of it is stored (or answered, or ignored as bad input)."""
        delay = STORE_RETRY_FIRST_S
        while True:
            # each handler's first write is queued before any other handler runs: arrival order holds
            handled = await asyncio.gather(*(self._handle_logged(m) for m in batch))
            batch = [m for m, ok in zip(batch, handled) if not ok]
            if not batch:
                return
            # not acknowledged: kept here and stored again; if we stop first, the broker re-delivers it
            await asyncio.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_MAX_S)

    async def _handle_logged(self, message: Message) -> bool:
        """False if the message could not be stored (it must not be acknowledged yet)."""
        try:
            await self.handle(message)
        except StoreError as exc:
            parsed = self.topics.parse(message.topic)  # not None: only device topics reach the store
            log.error("not stored, not acknowledged, retrying: device=%s kind=%s op=%s req=%s: %s",
                      parsed.device_id, parsed.kind, parsed.op or "-", codec.read_id(message.payload), exc)
            return False
        except Exception:
            log.exception("failed to handle message on %s", message.topic)
        return True

    async def handle(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            log.info("ignoring message on unexpected topic %s", message.topic)
            return
        if parsed.kind == "req":
            await self._request(parsed.device_id, parsed.op, message.payload)
        else:
            await self._report(parsed.device_id, parsed.kind, message.payload)

    async def _request(self, device_id: str, op: str, payload: bytes) -> None:
        try:
            request = codec.parse_request(device_id, op, payload)
        except BadRequestError as exc:
            req_id = codec.read_id(payload)
            if req_id is None:
                log.info("unanswerable request device=%s op=%s: %s", device_id, op[:32], exc)
                return
            # answered on the response topic of the op it named, known or not
            await self._publish(device_id, op, codec.error_from(req_id, exc))
            return
        if request.op == "ack":
            await self._db.ack(device_id, request.id)
            return
        previous = await self._db.receive(device_id, request.id, op, payload, self._clock(),
                                          self.config.idempotency_window)
        if previous is not None:
            await self._repeat(request, previous, payload)
            return
        if not self.ca_reachable or self._draining:
            await self._tell_queued(device_id, op, request.id)  # behind the backlog: say so at once
        self._new_work()

    async def _repeat(self, request: codec.Request, previous: Entry, payload: bytes) -> None:
        """The same id again: the same answer (MQTT contract), never a second certificate; the same id
        for a different request (another op or payload): `bad_request`, never the first answer."""
        if previous.op != request.op or previous.digest != digest(payload):
            log.warning("request id reused for a different request: device=%s req=%s op=%s (first: %s); "
                        "answered bad_request", request.device_id, request.id, request.op, previous.op)
            await self._publish(request.device_id, request.op, codec.error_from(request.id, BadRequestError(
                f"request id {request.id!r} was already used for a different request; use a new id")))
            return
        if previous.answer is not None:
            await self._link.publish(self.topics.response(request.device_id, previous.op), previous.answer,
                                     wait=False)
        else:
            await self._publish(request.device_id, previous.op, codec.queued(request.id))

    async def _report(self, device_id: str, kind: str, payload: bytes) -> None:
        """Plain presence and posture: stored, forwarded to the CA by `run_reporter` as reports (they
        survive an outage). Unsigned, so they change no trust; `online` only triggers re-delivery."""
        if kind == "presence":
            state = payload.decode("utf-8", "replace").strip().lower()
            if state not in ("online", "offline"):
                log.info("bad presence %r from %s", state[:20], device_id)
                return
            payload = json.dumps({"online": state == "online"}).encode()
            # stored first: in a batch, reports of one device must reach the store in arrival order
            await self._db.note_report(device_id, kind, payload, self._clock())
            self._reports_wake.set()
            if state == "online":
                # whatever the device missed while away, again, oldest first
                for entry in await self._db.unacked(device_id, self._clock(), self.config.answer_ttl):
                    await self._link.publish(self.topics.response(device_id, entry.op), entry.answer, wait=False)
            return
        else:
            try:
                if not isinstance(json.loads(payload), dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                log.info("bad posture from %s: %s", device_id, exc)
                return
        await self._db.note_report(device_id, kind, payload, self._clock())
        self._reports_wake.set()

    async def run_reporter(self) -> None:
        while True:
            try:
                await self._report_once()
            except StoreError as exc:
                log.warning("reports: %s", exc)
                await asyncio.sleep(self.config.retry_every.total_seconds())

    async def _report_once(self) -> None:
        """One pass over the stored reports; waits a while when there is nothing (more) to send."""
        reports = await self._db.reports()
        sent = 0
        for device_id, kind, payload, at in reports:
            try:
                body = json.loads(payload)
                if kind == "presence":
                    await self._ra.presence(device_id, bool(body["online"]))
                else:
                    await self._ra.reported_posture(device_id, body)
            except CAUnreachableError:
                break  # kept; tried again later
            except CAError as exc:
                log.info("%s of %s refused by the CA: %s", kind, device_id, exc)
            except (ValueError, KeyError, TypeError) as exc:   # a damaged stored report: dropped, not retried
                log.warning("dropping an unreadable stored %s report of %s: %s", kind, device_id, exc)
            await self._db.drop_report(device_id, kind, at)
            sent += 1
        if sent < len(reports) or not reports:
            self._reports_wake.clear()
            try:
                await asyncio.wait_for(self._reports_wake.wait(), self.config.retry_every.total_seconds())
            except asyncio.TimeoutError:
                pass

    # -- forwarding -------------------------------------------------------------
    async def run_forwarders(self) -> None:
        # a TaskGroup: if one forwarder dies the others are cancelled with it, so the supervisor's
        # restart never leaves two sets running
        async with asyncio.TaskGroup() as group:
            for index in range(WORKERS):
                group.create_task(self._forwarder(index))

    def _new_work(self) -> None:
        self._work_gen += 1
        for waiter in self._work_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._work_waiters.clear()

    async def _forwarder(self, index: int) -> None:
        while True:
            seen = self._work_gen  # work arriving while we look is not missed: we look again at once
            try:
                # a backlog drains one request at a time, in order; otherwise a batch for the CA
                entries = [] if (self._draining and index) else await self._db.claim_many(
                    self._clock(), 1 if self._draining else BATCH)
            except StoreError as exc:
                log.warning("could not claim the next request: %s", exc)
                await asyncio.sleep(self.config.retry_every.total_seconds())
                continue
            if not entries:
                if index == 0 and self.ca_reachable:
                    self._draining = False  # the backlog is gone: back to parallel forwarding
                if self._work_gen == seen:
                    waiter = asyncio.get_running_loop().create_future()
                    self._work_waiters.append(waiter)
                    try:
                        await asyncio.wait_for(waiter, self.config.retry_every.total_seconds())
                    except asyncio.TimeoutError:
                        pass
                continue
            batched = [e for e in entries if e.op in BATCHED_OPS]
            single = [e for e in entries if e.op not in BATCHED_OPS]
            *singles, in_batch = await asyncio.gather(*(self._guarded(e, self._forward(e)) for e in single),
                                                      self._forward_batch(batched) if batched else _nothing())
            if UNREACHABLE in singles or UNREACHABLE in in_batch:   # the CA is away: pause before asking again
                await asyncio.sleep(self.config.retry_every.total_seconds())

    async def _guarded(self, entry: Entry, step):
        """Run one entry's forwarding step; if it fails, the entry is released to be asked again."""
        try:
            return await step
        except Exception as exc:
            if isinstance(exc, StoreError):   # e.g. the answer could not be stored: asked again later
                log.warning("forwarding request device=%s req=%s: %s", entry.device_id, entry.req_id, exc)
            else:
                log.exception("forwarding request %s of %s failed", entry.req_id, entry.device_id)
            return await self._release(entry)

    async def _release(self, entry: Entry) -> None:
        try:
            await self._db.unclaim(entry.seq)
        except StoreError as exc:  # the claim lapses by itself (CLAIM_TIMEOUT) or at restart
            log.warning("could not release request device=%s req=%s: %s", entry.device_id, entry.req_id, exc)

    async def _queued_if_slow(self, call: asyncio.Future, pending: list[tuple[Entry, str]]) -> None:
        done, _ = await asyncio.wait([call], timeout=QUEUED_AFTER_S)
        if not done:
            for entry, req_id in pending:
                await self._tell_queued(entry.device_id, entry.op, req_id)

    async def _forward(self, entry: Entry) -> str | None:
        """One request, one RA call (posture, cacerts, csrattrs)."""
        request = codec.parse_request(entry.device_id, entry.op, entry.payload)
        call = asyncio.ensure_future(self._call(request))
        await self._queued_if_slow(call, [(entry, request.id)])
        try:
            outcome: dict | CAError = await call
        except CAError as exc:
            outcome = exc
        return await self._settle(entry, request, outcome)

    async def _forward_batch(self, entries: list[Entry]) -> list[str | None]:
        """Enrollments and renewals, one RA batch call for all; each entry then settled on its own,
        concurrently (their answers share the durable store's group commit)."""
        parsed: list[tuple[Entry, codec.Request]] = []
        outcomes: list = []
        for entry in entries:
            try:
                parsed.append((entry, codec.parse_request(entry.device_id, entry.op, entry.payload)))
            except Exception:   # stored as a good request: cannot happen; handled alone, as before
                outcomes.append(await self._guarded(entry, self._forward(entry)))
        if not parsed:
            return outcomes
        call = asyncio.ensure_future(self._ra.batch([_batch_item(request) for _, request in parsed]))
        await self._queued_if_slow(call, [(entry, request.id) for entry, request in parsed])
        try:
            results: list = await call
        except CAError as exc:          # the whole call: the same outcome for every entry
            results = [exc] * len(parsed)
        except Exception:   # e.g. an answer of the wrong shape: every entry is asked again
            log.exception("RA batch of %d requests failed; releasing them", len(parsed))
            outcomes += await asyncio.gather(*(self._release(e) for e, _ in parsed))
            return outcomes
        outcomes += await asyncio.gather(*(self._guarded(e, self._settle(e, r, o))
                                           for (e, r), o in zip(parsed, results)))
        return outcomes

    async def _settle(self, entry: Entry, request: codec.Request, outcome: dict | CAError) -> str | None:
        """What one entry's RA call came to: its answer stored, then published; or, if the CA cannot
        answer now or waits for approval, the entry released (to be asked again) and `queued` told.
        UNREACHABLE when the CA could not be reached (the forwarder then pauses)."""
        serial = der = None
        if isinstance(outcome, CAUnreachableError):
            if self.ca_reachable:
                level = logging.ERROR if isinstance(outcome, GatewayRefusedError) else logging.WARNING
                log.log(level, "CA unreachable, queueing requests: %s", outcome)
            self.ca_reachable = False
            self._draining = True
            await self._db.unclaim(entry.seq)
            await self._tell_queued(entry.device_id, entry.op, request.id)
            return UNREACHABLE
        if isinstance(outcome, PendingApprovalError):
            await self._db.unclaim(entry.seq, retry_at=self._clock() + timedelta(seconds=outcome.retry_after or 60))
            await self._tell_queued(entry.device_id, entry.op, request.id)
            return None
        if isinstance(outcome, CAError):
            answer = codec.error_from(request.id, outcome)
        else:
            fields = dict(outcome)
            serial, ocsp = fields.pop("serial", None), fields.pop("ocsp", None)
            der = base64.b64decode(ocsp) if isinstance(ocsp, str) else None
            answer = codec.ok(request.id, **fields)
        if not self.ca_reachable:
            log.info("CA reachable again; forwarding the queue in order")
            self.ca_reachable = True
        payload = codec.encode(answer)
        await self._db.answer(entry.seq, payload, self._clock(), serial=serial)   # stored before it is sent
        self._told_queued.discard((entry.device_id, request.id))
        await self._link.publish(self.topics.response(entry.device_id, entry.op), payload, wait=False)
        self._new_work()  # the device's next request, if any, may go now
        if serial is not None and self._on_issued is not None:
            task = asyncio.create_task(self._issued(serial, der))  # not on the answer path
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return None

    async def _issued(self, serial: str, der: bytes | None) -> None:
        async with self._issued_gate:
            try:
                # the OCSP response the CA sent with the certificate, if any: not asked for again
                await (self._on_issued(serial) if der is None else self._on_issued(serial, der))
            except Exception:
                log.exception("after issuing %s", serial)

    async def _call(self, request: codec.Request) -> dict:
        if request.op == "simpleenroll":
            data = await self._ra.simpleenroll(request.device_id, request.fields["csr"], request.fields["token"],
                                               request.id)
        elif request.op == "simplereenroll":
            data = await self._ra.simplereenroll(request.device_id, request.fields["cms"], request.id)
        elif request.op == "posture":
            # the CA verifies the device's signature over its posture; the answer carries no certificate,
            # so it is published once (not kept for re-delivery: the device signs a fresh one if it missed it)
            await self._ra.posture(request.device_id, request.fields["cms"], request.id)
            return {}
        elif request.op == "cacerts":
            return {"certs": (await self._ra.cacerts())["certs"]}
        else:
            data = await self._ra.csrattrs()
            return {"csrattrs": data["csrattrs"], "key_types": data["key_types"]}
        return _issued_fields(data)

    async def _tell_queued(self, device_id: str, op: str, req_id: str) -> None:
        if (device_id, req_id) in self._told_queued:
            return
        self._told_queued.add((device_id, req_id))
        await self._publish(device_id, op, codec.queued(req_id))

    async def _publish(self, device_id: str, op: str, answer: dict) -> None:
        await self._link.publish(self.topics.response(device_id, op), codec.encode(answer), wait=False)


def _issued_fields(data: dict) -> dict:
    """The fields of an `ok` answer carrying a certificate (and its OCSP response, from a batch)."""
    fields = {"cert": data["cert"], "chain": data["chain"], "not_after": data["not_after"], "serial": data["serial"]}
    if "ocsp" in data:
        fields["ocsp"] = data["ocsp"]
    return fields


def _batch_item(request: codec.Request) -> dict:
    item = {"op": request.op, "device_id": request.device_id, "request_id": request.id}
    for name in codec.REQUIRED[request.op]:
        item[name] = request.fields[name]
    return item


async def _nothing() -> list:
    return []
