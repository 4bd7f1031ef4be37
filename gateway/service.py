"""The gateway's request path: MQTT request -> durable inbox -> RA call -> durable outbox -> publish.

Every request is stored before anything else happens, forwarded by a small pool
of workers in arrival order, and its final answer is stored before it is
published; so a gateway killed at any point loses nothing and never asks the CA
twice for the same (device, request id).
"""
from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta

from ca.errors import BadRequestError, CAError, PendingApprovalError
from ca.timefmt import Clock, utc_now

from . import codec
from .config import GatewayConfig
from .durable import Durable, Entry
from .mqtt import Message, MQTTLink
from .ra_client import CAUnreachableError, RAClient
from .topics import Topics

log = logging.getLogger(__name__)

WORKERS = 8


class GatewayService:
    def __init__(self, config: GatewayConfig, link: MQTTLink, ra: RAClient, durable: Durable,
                 clock: Clock = utc_now, on_issued=None) -> None:
        self.config = config
        self.topics = Topics(config.topic_root)
        self._link = link
        self._ra = ra
        self._db = durable
        self._clock = clock
        self._wake = asyncio.Event()
        self._told_queued: set[tuple[str, str]] = set()
        self.ca_reachable = True
        self._on_issued = on_issued  # async callback(serial): e.g. publish its OCSP response at once
        self.stats = {"requests": 0, "answered": 0, "queued": 0, "bad": 0}

    # -- intake -----------------------------------------------------------------
    async def run_intake(self) -> None:
        """Consume MQTT messages forever; a bad message is answered or logged, never fatal."""
        while True:
            message = await self._link.messages.get()
            try:
                await self.handle(message)
            except Exception:
                log.exception("failed to handle message on %s", message.topic)

    async def handle(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            log.info("ignoring message on unexpected topic %s", message.topic)
            return
        if parsed.kind == "presence":
            await self._presence(parsed.device_id, message.payload)
        elif parsed.kind == "posture":
            await self._posture(parsed.device_id, message.payload)
        else:
            await self._request(parsed.device_id, parsed.op, message.payload)

    async def _request(self, device_id: str, op: str, payload: bytes) -> None:
        self.stats["requests"] += 1
        try:
            request = codec.parse_request(device_id, op, payload)
        except BadRequestError as exc:
            self.stats["bad"] += 1
            req_id = codec.read_id(payload) if len(payload) <= codec.MAX_PAYLOAD else None
            if req_id is None or op not in codec.OPS:
                log.info("unanswerable request device=%s op=%s: %s", device_id, op, exc)
                if req_id is None:
                    return
            # answered on the op's response topic (for an unknown op, on resp/{op} all the same)
            await self._publish(device_id, op, codec.error_from(req_id, exc))
            return
        if request.op == "ack":
            await self._db.ack(device_id, request.id)
            return
        previous = await self._db.receive(device_id, request.id, op, payload, self._clock(),
                                          self.config.idempotency_window)
        if previous is not None:
            # the same request again: the same answer, never a second certificate
            if previous.answer is not None:
                await self._link.publish(self.topics.response(device_id, op), previous.answer)
            else:
                await self._publish(device_id, op, codec.queued(request.id))
            return
        if not self.ca_reachable:
            await self._tell_queued(device_id, op, request.id)
        self._wake.set()

    async def _presence(self, device_id: str, payload: bytes) -> None:
        state = payload.decode("utf-8", "replace").strip().lower()
        if state not in ("online", "offline"):
            log.info("bad presence %r from %s", state[:20], device_id)
            return
        if state == "online":
            # whatever the device missed while away, again, oldest first
            for entry in await self._db.unacked(device_id, self._clock(), self.config.answer_ttl):
                await self._link.publish(self.topics.response(device_id, entry.op), entry.answer)
        try:
            await self._ra.presence(device_id, state == "online")
        except CAError as exc:
            log.info("presence of %s not recorded: %s", device_id, exc)

    async def _posture(self, device_id: str, payload: bytes) -> None:
        try:
            posture = json.loads(payload)
            if not isinstance(posture, dict):
                raise ValueError("not an object")
            await self._ra.posture(device_id, posture)
        except (ValueError, UnicodeDecodeError) as exc:
            log.info("bad posture from %s: %s", device_id, exc)
        except CAError as exc:
            log.info("posture of %s not recorded: %s", device_id, exc)

    # -- forwarding -------------------------------------------------------------
    async def run_forwarders(self) -> None:
        await asyncio.gather(*(self._forwarder() for _ in range(WORKERS)))

    async def _forwarder(self) -> None:
        while True:
            entry = await self._db.claim_next(self._clock())
            if entry is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.retry_every.total_seconds())
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self._forward(entry)
            except Exception:
                log.exception("forwarding request %s of %s failed", entry.req_id, entry.device_id)
                await self._db.unclaim(entry.seq)

    async def _forward(self, entry: Entry) -> None:
        request = codec.parse_request(entry.device_id, entry.op, entry.payload)
        serial = None
        try:
            fields = await self._call(request)
            serial = fields.pop("serial", None)
            answer = codec.ok(request.id, **fields)
        except CAUnreachableError as exc:
            if self.ca_reachable:
                log.warning("CA unreachable, queueing requests: %s", exc)
            self.ca_reachable = False
            await self._db.unclaim(entry.seq)
            await self._tell_queued(entry.device_id, entry.op, request.id)
            await asyncio.sleep(self.config.retry_every.total_seconds())
            return
        except PendingApprovalError as exc:
            await self._db.unclaim(entry.seq, retry_at=self._clock_plus(exc.retry_after or 60))
            await self._tell_queued(entry.device_id, entry.op, request.id)
            return
        except CAError as exc:
            answer = codec.error_from(request.id, exc)
        if not self.ca_reachable:
            log.info("CA reachable again; forwarding the queue")
            self.ca_reachable = True
        payload = codec.encode(answer)
        await self._db.answer(entry.seq, payload, self._clock(), serial=serial)   # stored before it is sent
        self.stats["answered"] += 1
        self._told_queued.discard((entry.device_id, request.id))
        await self._link.publish(self.topics.response(entry.device_id, entry.op), payload, wait=False)
        if serial is not None and self._on_issued is not None:
            await self._on_issued(serial)

    async def _call(self, request: codec.Request) -> dict:
        if request.op == "simpleenroll":
            data = await self._ra.simpleenroll(request.device_id, request.fields["csr"], request.fields["token"],
                                               request.id)
        elif request.op == "simplereenroll":
            data = await self._ra.simplereenroll(request.device_id, request.fields["cms"], request.id)
        elif request.op == "cacerts":
            return {"certs": (await self._ra.cacerts())["certs"]}
        else:
            data = await self._ra.csrattrs()
            return {"csrattrs": data["csrattrs"], "key_types": data["key_types"]}
        return {"cert": data["cert"], "chain": data["chain"], "not_after": data["not_after"], "serial": data["serial"]}

    def _clock_plus(self, seconds: int) -> datetime:
        return self._clock() + timedelta(seconds=seconds)

    async def _tell_queued(self, device_id: str, op: str, req_id: str) -> None:
        if (device_id, req_id) in self._told_queued:
            return
        self._told_queued.add((device_id, req_id))
        self.stats["queued"] += 1
        await self._publish(device_id, op, codec.queued(req_id))

    async def _publish(self, device_id: str, op: str, answer: dict) -> None:
        await self._link.publish(self.topics.response(device_id, op), codec.encode(answer), wait=False)
