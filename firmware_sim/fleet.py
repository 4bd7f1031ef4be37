"""`iomtca sim`: a fleet of simulated devices in one asyncio process, with progress and a summary."""
from __future__ import annotations

import asyncio
import csv
import logging
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from ca.authority import Authority
from ca.keystore import load_cert
from ca.model import Device
from ca.registry import new_device
from ca.timefmt import utc_now

from .connectivity import MODELS, Connectivity
from .device import DeviceRecord, State, has_valid_certificate, next_action
from .est_client import ESTClient
from .persist import DeviceFolder
from .sim_device import SimDevice
from .stats import Stats, dump, render

log = logging.getLogger(__name__)

WARD = 10            # devices per ward: peers check each other's revocation status
FINAL_SYNC_S = 20.0  # after the run every device comes online once more, at most this long


@dataclass(frozen=True)
class SimOptions:
    home: Path
    devices: int = 20
    transport: str = "mixed"
    offline_ratio: float = 0.3
    duration: float = 60.0
    time_scale: float = 8640.0
    est_url: str = "https://127.0.0.1:8443"
    broker: str = "mqtt://127.0.0.1:1883"
    seed: int = 1
    old_firmware_ratio: float = 0.0
    tokens: Path | None = None
    json_out: Path | None = None
    state_dir: Path | None = None
    progress: bool = True
    final_sync: float = FINAL_SYNC_S
    concurrency: int = 64


class Fleet:
    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.broker = options.broker
        self.stats = Stats()
        self.certificates: dict[str, x509.Certificate] = {}
        self.revoked_seen: set[str] = set()
        self.online = 0
        self.issuer = load_cert(options.home / "issuing.pem")
        self.est: ESTClient | None = None
        self._grace: dict[str, timedelta] = {}
        self._sem = asyncio.Semaphore(options.concurrency)
        self.devices: list[SimDevice] = []

    def grace_for(self, record: DeviceRecord) -> timedelta:
        return self._grace[record.device_id]

    async def limited(self, coro) -> None:
        async with self._sem:
            await coro

    # -- setup ------------------------------------------------------------------------
    async def prepare(self) -> None:
        o = self.options
        rng = random.Random(o.seed)
        root = o.state_dir or (o.home / "sim")
        tokens = _read_tokens(o.tokens) if o.tokens else {}
        ids = [f"sim-{i:05d}" for i in range(1, o.devices + 1)]
        async with await Authority.open(o.home) as authority:
            registered = {d.id: d for d in await authority.devices()}
            fresh = []
            for index, device_id in enumerate(ids):
                if device_id not in registered:
                    model = MODELS[index % len(MODELS)]
                    firmware = "1.0.0" if rng.random() < o.old_firmware_ratio else "2.0.0"
                    fresh.append(new_device(device_id, model=model, owner="simulation",
                                            location=f"ward {index // WARD + 1}", firmware=firmware))
            if fresh:
                for token in await authority.registry.add_many(fresh, actor="system:simulator"):
                    tokens[token.device_id] = token.secret
                registered.update({d.id: d for d in await authority.devices() if d.id in tokens})
            records = []
            for index, device_id in enumerate(ids):
                folder = DeviceFolder(root, device_id)
                device: Device = registered[device_id]
                grace = authority.config.renewal_grace_for(device)
                if folder.exists():
                    record = folder.load()          # a restarted device keeps its identity
                    next_action(record, utc_now(), grace)  # judge its state as of now
                    if record.state in (State.UNENROLLED, State.STRANDED) and device_id in tokens:
                        # an engineer's new token brings a stranded device back: it enrolls afresh
                        record.token, record.state = tokens[device_id], State.UNENROLLED
                        folder.save(record)
                else:
                    if device_id not in tokens:
                        tokens[device_id] = (await authority.registry.new_token(device_id, actor="system:simulator")).secret
                    record = DeviceRecord(device_id=device_id, model=device.model, firmware=device.firmware or "2.0.0",
                                          transport=_transport(o.transport, index), token=tokens[device_id])
                    folder.path.mkdir(parents=True, exist_ok=True)
                    folder.save(record)
                self._grace[device_id] = grace
                if folder.load_cert() is not None and record.state is not State.UNENROLLED:
                    self.certificates[device_id] = folder.load_cert()
                records.append((record, folder))
        for index, (record, folder) in enumerate(records):
            ward = ids[(index // WARD) * WARD:(index // WARD + 1) * WARD]
            conn = Connectivity(record.model, random.Random(f"{o.seed}-{record.device_id}"), o.time_scale,
                                intermittent=rng.random() < o.offline_ratio)
            self.devices.append(SimDevice(record, folder, self, random.Random(f"{o.seed}:{index}"), conn, ward))

    # -- run --------------------------------------------------------------------------
    async def run(self) -> dict:
        o = self.options
        started = time.monotonic()
        async with ESTClient(o.est_url, o.home / "root.pem") as est:
            self.est = est
            progress = asyncio.create_task(self._progress(started)) if o.progress else None
            deadline = started + o.duration
            await asyncio.gather(*(d.live(deadline) for d in self.devices))
            # everyone comes back once more: expired devices recover through the grace path
            sync_end = time.monotonic() + o.final_sync
            await asyncio.gather(*(self._final(d, sync_end) for d in self.devices))
            summary = self.summary(time.monotonic() - started)
            if progress:
                progress.cancel()
                self._print_progress(started, final=True)
        return summary

    async def _final(self, device: SimDevice, end: float) -> None:
        """Every device still in service comes online until `end`: expired ones recover through
        the grace path, queued answers arrive, and the summary is read while all are online."""
        if device.record.state in (State.REVOKED, State.STRANDED):
            return
        device.conn.intermittent = False
        await device.online_until(end)

    async def _progress(self, started: float) -> None:
        while True:
            await asyncio.sleep(1 if sys.stdout.isatty() else 5)
            self._print_progress(started)

    def _print_progress(self, started: float, final: bool = False) -> None:
        c = self.stats.counts
        enrolled = sum(1 for d in self.devices if d.record.state is not State.UNENROLLED)
        line = (f"t={time.monotonic() - started:5.1f}s enrolled={enrolled}/{len(self.devices)} "
                f"renewed={c['renewed']} grace={c['grace_renewals']} online={self.online} "
                f"offline={len(self.devices) - self.online} queued={c['queued_answers']} "
                f"failed={sum(self.stats.errors.values())} revocations_seen={c['revocations_seen']}")
        end = "\n" if final or not sys.stdout.isatty() else "\r"
        print(line, end=end, flush=True)

    def summary(self, elapsed: float) -> dict:
        now = utc_now()
        revoked = sorted(d.record.device_id for d in self.devices if d.record.state is State.REVOKED)
        stranded = sorted(d.record.device_id for d in self.devices if d.record.state is State.STRANDED)
        valid = [d.record.device_id for d in self.devices if has_valid_certificate(d.record, now)]
        missing = sorted(d.record.device_id for d in self.devices
                         if d.record.device_id not in valid and d.record.state not in (State.REVOKED, State.STRANDED))
        return {
            "devices": len(self.devices), "transport": self.options.transport, "seed": self.options.seed,
            "duration_s": round(elapsed, 1), "counts": dict(self.stats.counts), "errors": dict(self.stats.errors),
            "latency": self.stats.latency_table(),
            "final": {"valid": len(valid), "revoked": revoked, "stranded": stranded, "missing": missing,
                      "revoked_seen_by_peers": sorted(self.revoked_seen)},
        }


def _transport(choice: str, index: int) -> str:
    """mixed: even-numbered devices (sim-00002, ...) speak MQTT, odd ones HTTP."""
    if choice in ("http", "mqtt"):
        return choice
    return "mqtt" if (index + 1) % 2 == 0 else "http"


def _read_tokens(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {row["device_id"]: row["token"] for row in csv.DictReader(fh)}


async def run_sim(options: SimOptions) -> int:
    fleet = Fleet(options)
    await fleet.prepare()
    summary = await fleet.run()
    print(render(summary))
    if options.json_out:
        options.json_out.write_text(dump(summary))
    return 1 if summary["final"]["missing"] else 0
