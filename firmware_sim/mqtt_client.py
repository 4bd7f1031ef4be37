"""A device's side of the MQTT contract, on the gateway's asyncio MQTT adapter and topic scheme."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os

from cryptography.x509 import ocsp as x509_ocsp

from gateway.mqtt import Message, MQTTLink, Will
from gateway.topics import Topics


class MQTTAnswerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class DeviceMQTT:
    def __init__(self, broker: str, device_id: str, topics: Topics = Topics()) -> None:
        self.device_id = device_id
        self.topics = topics
        self.notices: asyncio.Queue[dict] = asyncio.Queue()
        self.queued = 0
        self._waiting: dict[str, asyncio.Future] = {}
        self._retained: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self.link = MQTTLink(
            broker, f"dev-{device_id}",
            [f"{topics.root}/dev/{device_id}/resp/+", topics.notify(device_id)],
            will=Will(topics.presence(device_id), b"offline"), quiet=True,
            on_connect=self._announce)
        self._reader: asyncio.Task | None = None

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def connect(self, timeout: float = 10) -> None:
        self._reader = asyncio.create_task(self._read())
        await self.link.start(wait=True, timeout=timeout)

    def _announce(self) -> None:
        # on every (re)connect: online, retained; the gateway re-sends answers we missed
        asyncio.ensure_future(self.link.publish(self.topics.presence(self.device_id), b"online",
                                                retain=True, wait=False))

    async def disconnect(self, *, graceful: bool = True) -> None:
        if graceful and self.link.connected.is_set():
            await self.link.publish(self.topics.presence(self.device_id), b"offline", retain=True)
        await (self.link.stop() if graceful else self.link.drop())
        if self._reader:
            self._reader.cancel()

    async def _read(self) -> None:
        while True:
            message: Message = await self.link.messages.get()
            if message.topic == self.topics.notify(self.device_id):
                try:
                    self.notices.put_nowait(json.loads(message.payload))
                except ValueError:
                    pass
                continue
            future = self._retained.get(message.topic)
            if future is not None:
                if not future.done():
                    future.set_result(message.payload)
                continue
            try:
                answer = json.loads(message.payload)
            except ValueError:
                continue
            if answer.get("status") == "queued":
                self.queued += 1
                continue
            waiter = self._waiting.get(answer.get("id"))
            if waiter is not None and not waiter.done():
                waiter.set_result(answer)

    def expect(self, req_id: str) -> asyncio.Future:
        """The future for the final answer to `req_id` (also one re-published after a reconnect);
        an answer that has already arrived stays in it until the device acks it."""
        future = self._waiting.get(req_id)
        if future is None:
            future = self._waiting[req_id] = asyncio.get_running_loop().create_future()
        return future

    async def request(self, op: str, fields: dict, *, req_id: str | None = None) -> tuple[str, asyncio.Future]:
        req_id = req_id or self.new_id()
        future = self.expect(req_id)
        payload = json.dumps({"id": req_id, **fields}).encode()
        await self.link.publish(self.topics.request(self.device_id, op), payload)
        return req_id, future

    @staticmethod
    def result(answer: dict) -> dict:
        if answer.get("status") != "ok":
            error = answer.get("error") or {}
            raise MQTTAnswerError(error.get("code", "unknown"), error.get("message", ""))
        return answer

    async def ack(self, req_id: str) -> None:
        self._waiting.pop(req_id, None)
        await self.link.publish(self.topics.request(self.device_id, "ack"), json.dumps({"id": req_id}).encode())

    def forget(self, req_id: str) -> None:
        """Stop waiting for an answer (one the gateway does not keep for re-delivery, e.g. posture)."""
        self._waiting.pop(req_id, None)

    async def report_posture(self, posture: dict) -> None:
        """The plain, unsigned posture message: shown as reported at the CA, it proves nothing
        (the signed `posture` request does)."""
        await self.link.publish(self.topics.posture(self.device_id), json.dumps(posture).encode())

    async def retained(self, topic: str, timeout: float = 5) -> bytes:
        """One retained read (subscribe, take the retained message, unsubscribe)."""
        future = self._retained[topic] = asyncio.get_running_loop().create_future()
        await self.link.subscribe(topic)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._retained.pop(topic, None)
            self.link.unsubscribe(topic)

    async def ocsp(self, serial_hex: str, timeout: float = 5) -> x509_ocsp.OCSPResponse:
        return x509_ocsp.load_der_ocsp_response(await self.retained(self.topics.ocsp(serial_hex), timeout))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
