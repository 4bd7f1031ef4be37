"""Revocation at the broker: mosquitto's dynamic-security plugin told to drop and refuse a device
whose certificates are revoked or on hold, and to let it back when it holds a good one again.

Three layers, kept apart:
- codec (pure): `encode_commands` / `decode_responses`, the JSON of `$CONTROL/dynamic-security/v1`
  and of its `/response` topic; each command carries a `correlationData` that the answer repeats.
- policy (pure): `wanted_from_changes` (a status change -> a command) and `reconcile_plan`
  (the certificate list and the broker's disabled accounts -> the commands that make them agree).
  A device's broker account (user name = device id) follows its certificates: it is let on the
  broker while it holds at least one good unexpired certificate, refused once it holds none.
- transport and flow: `DynsecClient` (publish, wait for the answers by correlation, time out) over
  its own MQTT connection (`<client_id>-dynsec`), so the request intake's link and its manual
  acknowledgements never see the control topic; `BrokerControl` (the gateway's supervised task:
  reconcile at start, then the commands wanted by the status changes the PKI follower applies,
  each confirmed by the broker or retried with backoff; never an exception into the follower).

mosquitto 2.0's `disableClient` disconnects the account's live sessions (MQTT 5 reason 0x98
"Administrative action") and refuses its next CONNECT with "Not authorized" (135) until
`enableClient` (checked against 2.0.11 by tests/gateway/test_broker_revocation.py).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .mqtt import MQTTLink
from .supervise import backoff

log = logging.getLogger(__name__)

MODES = ("", "dynsec")               # [gateway] broker_control: off, or mosquitto dynamic security
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
DISABLE, ENABLE = "disableClient", "enableClient"
NOT_FOUND = "Client not found"       # the account does not exist at the broker: nothing to do
CONFIRM_S = 2.0                      # the broker answers in milliseconds; past this, retry
BATCH = 100                          # commands per control message
LIST_PAGE = 1000                     # accounts per listClients page at reconcile
RECHECK_AFTER_S = 0.3                # coalesce a burst of disables before looking for good certificates
BACKOFF_CAP_S = 30.0


class ControlResponseError(ValueError):
    """A payload on the response topic that is not a dynamic-security answer."""


class ControlTimeoutError(TimeoutError):
    """The broker did not confirm the commands in time (no plugin, no ACL, or disconnected)."""


# -- codec (pure) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    command: str                      # disableClient, enableClient, listClients
    correlation: str
    username: str | None = None
    args: tuple[tuple[str, object], ...] = ()   # e.g. (("verbose", True), ("count", 1000))

    def to_json(self) -> dict:
        body: dict = {"command": self.command}
        if self.username is not None:
            body["username"] = self.username
        body.update(self.args)
        body["correlationData"] = self.correlation
        return body


@dataclass(frozen=True)
class Response:
    command: str
    correlation: str | None
    error: str | None = None
    data: dict | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def encode_commands(commands: Iterable[Command]) -> bytes:
    return json.dumps({"commands": [c.to_json() for c in commands]}, separators=(",", ":")).encode()


def decode_responses(payload: bytes) -> list[Response]:
    """`{"responses": [{"command", "correlationData"?, "error"?, "data"?}, ...]}` -> Responses."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise ControlResponseError(f"not JSON ({len(payload)} bytes): {exc}") from None
    items = body.get("responses") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ControlResponseError(f"no 'responses' list: {payload[:200]!r}")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("command"), str):
            raise ControlResponseError(f"response of the wrong shape: {str(item)[:200]}")
        corr, error, data = item.get("correlationData"), item.get("error"), item.get("data")
        out.append(Response(item["command"], corr if isinstance(corr, str) else None,
                            error if isinstance(error, str) else None, data if isinstance(data, dict) else None))
    return out


def disabled_accounts(data: dict | None) -> tuple[set[str], int]:
    """(disabled user names on this page, total count) of a verbose listClients answer."""
    if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
        raise ControlResponseError(f"listClients answer of the wrong shape: {str(data)[:200]}")
    total = data.get("totalCount")
    names = {c["username"] for c in data["clients"]
             if isinstance(c, dict) and isinstance(c.get("username"), str) and c.get("disabled") is True}
    return names, total if isinstance(total, int) else len(data["clients"])


# -- policy (pure) ---------------------------------------------------------------------
def command_for(status: str, attendance_hold: bool = False) -> str | None:
    """revoked or hold -> disable; good (a hold released) -> enable. A hold for non-attendance
    changes nothing at the broker: the device must stay able to come back over MQTT and prove
    itself (a signed posture or renewal lifts that hold)."""
    if status == "hold" and attendance_hold:
        return None
    return {"revoked": DISABLE, "hold": DISABLE, "good": ENABLE}.get(status)


def _admitted(cert: dict) -> bool:
    """A certificate that keeps its device on the broker: good, or held only for absence."""
    return cert.get("status") == "good" or (cert.get("status") == "hold" and cert.get("attendance_hold") is True)


def wanted_from_changes(changes: Iterable[dict]) -> dict[str, str]:
    """Device id -> command for a batch of status changes, in order (the last one of a device wins).
    Changes of certificates without a device (the CA's own services) are ignored."""
    wanted: dict[str, str] = {}
    for change in changes:
        device = change.get("device_id")
        command = command_for(change.get("status", ""), change.get("attendance_hold") is True)
        if device and command:
            wanted.pop(device, None)
            wanted[device] = command
    return wanted


def devices_with_good(certs: Iterable[dict]) -> tuple[set[str], set[str]]:
    """(devices with a good unexpired certificate (or one held only for absence), devices whose
    unexpired certificates are all revoked or on an operator's hold) of the CA's certificate list."""
    good, blocked = set(), set()
    for cert in certs:
        device = cert.get("device_id")
        if not device:
            continue
        (good if _admitted(cert) else blocked).add(device)
    return good, blocked - good


def reconcile_plan(certs: Iterable[dict], disabled: set[str], *, only: set[str] | None = None) -> dict[str, str]:
    """What makes the broker agree with the CA: disable devices that hold certificates but no good
    one; enable disabled accounts of devices that hold a good one. Devices without an unexpired
    certificate (not enrolled yet, or all expired) and accounts that are no device are left alone."""
    good, blocked = devices_with_good(certs)
    plan = {d: DISABLE for d in sorted(blocked - disabled)}
    plan.update({d: ENABLE for d in sorted(good & disabled)})
    if only is not None:
        plan = {d: c for d, c in plan.items() if d in only}
    return plan


# -- transport -------------------------------------------------------------------------
class DynsecClient:
    """Commands to the dynamic-security plugin over an MQTT link subscribed to its response topic.

    `run_reader` consumes the link's messages and resolves the waiting calls by correlationData
    (other admins' answers on the same topic are ignored); every future is cleaned up."""

    def __init__(self, link: MQTTLink, *, prefix: str = "") -> None:
        self._link = link
        self._prefix = prefix or f"iomtca-{os.getpid()}"
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future] = {}

    def command(self, name: str, username: str | None = None, **args) -> Command:
        return Command(name, f"{self._prefix}-{next(self._ids)}", username, tuple(args.items()))

    async def run_reader(self) -> None:
        while True:
            message = await self._link.messages.get()
            if message.topic != RESPONSE_TOPIC:
                continue
            try:
                responses = decode_responses(message.payload)
            except ControlResponseError as exc:
                log.warning("ignoring a dynamic-security answer: %s", exc)
                continue
            for response in responses:
                future = self._waiting.pop(response.correlation or "", None)
                if future is not None and not future.done():
                    future.set_result(response)

    async def call(self, commands: list[Command], timeout: float = CONFIRM_S) -> list[Response]:
        """Publish the commands in one message; their answers in the same order, or
        ControlTimeoutError (naming how many were answered) if any is missing after `timeout`."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        for command, future in zip(commands, futures):
            self._waiting[command.correlation] = future
        try:
            # QoS 0: the answer is the confirmation. A QoS 1 publish that a broker without the plugin
            # never acknowledges would stay in paho's in-flight window with every retry.
            await self._link.publish(CONTROL_TOPIC, encode_commands(commands), qos=0)
            done, _ = await asyncio.wait(futures, timeout=timeout)
            if len(done) < len(futures):
                raise ControlTimeoutError(f"{len(done)} of {len(futures)} command(s) confirmed within {timeout:.1f} s")
            return [f.result() for f in futures]
        finally:
            for command, future in zip(commands, futures):
                self._waiting.pop(command.correlation, None)
                future.cancel()


# -- the gateway's task ----------------------------------------------------------------
class BrokerControl:
    """Keeps the broker's device accounts in step with the CA (see the module docstring).

    `apply(changes)` is called by the PKI follower with each batch of status changes; it only
    records what is wanted and returns at once (it never raises). `run()` is a supervised task."""

    def __init__(self, link_factory: Callable[[], MQTTLink], certificates: Callable, *,
                 retry_every: float = 2.0, confirm_s: float = CONFIRM_S) -> None:
        self._link_factory = link_factory
        self._certificates = certificates          # async (after=...) -> a page of the CA's certificate list
        self._retry_every = retry_every
        self._confirm_s = confirm_s
        self._wanted: dict[str, str] = {}          # device id -> command still to be confirmed
        self._touched: dict[str, int] = {}         # device id -> seq of its last live change
        self._seq = 0
        self._recheck: set[str] = set()            # disabled by a change: do they hold a good certificate still?
        self._wake = asyncio.Event()
        self._recheck_wake = asyncio.Event()
        self._client: DynsecClient | None = None
        self.confirmed = 0                         # commands the broker confirmed (for the log and the tests)

    @classmethod
    def for_gateway(cls, config, ra) -> "BrokerControl | None":
        """The control of `config.broker_control` ('dynsec'), None when it is off."""
        if config.broker_control != "dynsec":
            return None
        return cls(lambda: MQTTLink(config.broker, f"{config.client_id}-dynsec", [RESPONSE_TOPIC],
                                    session_expiry=0, auth=config.broker_auth),
                   ra.certificates, retry_every=config.retry_every.total_seconds())

    # -- from the PKI follower --------------------------------------------------------
    def apply(self, changes: list[dict]) -> None:
        try:
            wanted = wanted_from_changes(changes)
            for device, command in wanted.items():
                self._seq += 1
                self._touched[device] = self._seq
                self._wanted.pop(device, None)
                self._wanted[device] = command
                if command == DISABLE:
                    self._recheck.add(device)
            if wanted:
                log.info("broker control: %s", ", ".join(f"{c} device={d}" for d, c in wanted.items()))
                self._wake.set()
        except Exception:   # never the follower's problem
            log.exception("broker control could not take %d status change(s)", len(changes))

    # -- the supervised task ------------------------------------------------------------
    async def run(self) -> None:
        link = self._link_factory()
        self._client = DynsecClient(link, prefix=link.client_id)
        try:
            await link.start()
            await link.connected.wait()   # a refusal of the gateway's credentials raises: restarted with backoff
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._client.run_reader(), name="dynsec-reader")
                tasks.create_task(self._send_forever(), name="dynsec-send")
                tasks.create_task(self._recheck_forever(), name="dynsec-recheck")
                tasks.create_task(self._reconcile_until_done(), name="dynsec-reconcile")
        finally:
            await link.stop()

    async def _send_forever(self) -> None:
        failures = 0
        while True:
            if not self._wanted:
                self._wake.clear()
                await self._wake.wait()
            batch = list(self._wanted.items())[:BATCH]
            try:
                await self._send(batch)
                failures = 0
            except (ControlTimeoutError, ConnectionError) as exc:   # not answered, or the link refused the publish
                failures += 1
                delay = backoff(failures, self._retry_every, BACKOFF_CAP_S)
                log.warning("broker control not confirmed (%s): %s; retrying in %.1f s (failure %d in a row)",
                            exc, ", ".join(f"{c} device={d}" for d, c in batch[:5]), delay, failures)
                await asyncio.sleep(delay)

    async def _send(self, batch: list[tuple[str, str]]) -> None:
        """Send one batch; what the broker confirmed (or refused for good) is no longer wanted."""
        commands = [self._client.command(command, device) for device, command in batch]
        responses = await self._client.call(commands, self._confirm_s)
        for (device, command), response in zip(batch, responses):
            if self._wanted.get(device) == command:   # not superseded by a newer change meanwhile
                del self._wanted[device]
            if response.ok:
                self.confirmed += 1
                log.info("broker confirmed %s device=%s", command, device)
                if command == DISABLE and device in self._recheck:
                    self._recheck_wake.set()
            elif response.error == NOT_FOUND:
                log.warning("broker has no account for device=%s (%s not applied): is its user name its device id?",
                            device, command)
            else:   # a refusal that a retry will not change (e.g. "Unknown command"): said once, loudly
                log.error("broker refused %s device=%s: %s", command, device, response.error)

    async def _recheck_forever(self) -> None:
        """Devices just disabled that still hold a good certificate (an old one revoked after a
        renewal) are let back: the account follows the device, not one certificate."""
        failures = 0
        while True:
            await self._recheck_wake.wait()
            await asyncio.sleep(RECHECK_AFTER_S)
            self._recheck_wake.clear()
            only, self._recheck = self._recheck, set()
            try:
                await self._reconcile(only=only, disabled=only)
                failures = 0
            except Exception as exc:   # the CA unreachable or garbage: the devices stay disabled, retried
                failures += 1
                self._recheck |= only
                delay = backoff(failures, self._retry_every, BACKOFF_CAP_S)
                log.warning("broker control recheck of %d device(s) failed (%s); retrying in %.1f s",
                            len(only), f"{type(exc).__name__}: {exc}"[:300], delay)
                await asyncio.sleep(delay)
                self._recheck_wake.set()

    async def _reconcile_until_done(self) -> None:
        """At start: the status changes missed while the gateway was down, from the CA's list."""
        failures = 0
        while True:
            try:
                await self._reconcile()
                return
            except Exception as exc:
                failures += 1
                delay = backoff(failures, self._retry_every, BACKOFF_CAP_S)
                log.warning("broker control reconcile failed (%s); retrying in %.1f s (failure %d in a row)",
                            f"{type(exc).__name__}: {exc}"[:300], delay, failures)
                await asyncio.sleep(delay)

    async def _reconcile(self, *, only: set[str] | None = None, disabled: set[str] | None = None) -> None:
        seq = self._seq
        certs = await self._all_certificates()
        if disabled is None:
            disabled = await self._disabled_accounts()
        plan = reconcile_plan(certs, disabled, only=only)
        # a live change newer than this walk wins over the walk's view of that device
        plan = {d: c for d, c in plan.items() if self._touched.get(d, 0) <= seq and d not in self._wanted}
        if only is None:
            log.info("broker control reconcile: %d certificate(s), %d disabled account(s): %s", len(certs),
                     len(disabled), ", ".join(f"{c} device={d}" for d, c in list(plan.items())[:20]) or "nothing to do")
        elif plan:
            log.info("broker control: letting back device(s) that still hold a good certificate: %s", ", ".join(plan))
        if plan:
            self._wanted.update(plan)
            self._wake.set()

    async def _all_certificates(self) -> list[dict]:
        certs, after = [], ""
        while True:
            page = await self._certificates(after=after)
            if not isinstance(page, list) or not all(isinstance(c, dict) and isinstance(c.get("serial"), str)
                                                     for c in page):
                raise TypeError(f"certificate list of the wrong shape: {str(page)[:200]}")
            certs.extend(page)
            if len(page) < 1000:
                return certs
            after = page[-1]["serial"]

    async def _disabled_accounts(self) -> set[str]:
        disabled, offset = set(), 0
        while True:
            command = self._client.command("listClients", verbose=True, count=LIST_PAGE, offset=offset)
            (response,) = await self._client.call([command], self._confirm_s * 5)
            if not response.ok:
                raise ControlResponseError(f"listClients refused: {response.error}")
            names, total = disabled_accounts(response.data)
            disabled |= names
            offset += LIST_PAGE
            if offset >= total:
                return disabled
