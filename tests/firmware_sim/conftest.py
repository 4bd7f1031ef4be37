"""Fixtures for the fleet simulator tests: a fresh CA (`iomtca init`, demo-style short lifetimes),
mosquitto on a free loopback port, `iomtca serve` and `iomtca gateway` as real subprocesses.

Every wait is bounded. Every process is started here and stopped by its own pid at teardown
(SIGTERM, then SIGKILL); nothing is ever killed by name. When a test fails, the stderr of the
processes it used is attached to the report.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests import procs
from tests.gateway.gwkit import setup_gateway
from tests.procs import PROCESSES, Proc, free_port, wait_until  # noqa: F401 (used by the tests too)

BIN = Path(sys.executable).parent
IOMTCA = str(BIN / "iomtca")
MODELS = ("infusion-pump", "patient-monitor", "ventilator", "imaging-ct", "home-monitor")



def run(argv, *, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return procs.run(argv, timeout=timeout, check=check, text=True)


SERVE_READY = re.compile(r"iomtca serve: listening est=(https://127\.0\.0\.1:\d+) ocsp=(http://\S+)")
GATEWAY_READY = re.compile(r"iomtca gateway: connected ")


class Stack:
    """A fresh CA directory with short lifetimes, and (when started) its broker, server and gateway."""

    def __init__(self, work: Path, *, lifetime: str = "12s", grace: str = "30s",
                 min_firmware: str | None = None) -> None:
        self.work = work
        self.home = work / "ca"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.ocsp_base = f"http://127.0.0.1:{self.http_port}"
        run([IOMTCA, "init", "--dir", self.home, "--trust-domain", "sim-test.test", "--base-url", self.ocsp_base])
        self.configure(lifetime=lifetime, grace=grace, min_firmware=min_firmware)
        self.mqtt_port = free_port()
        self.broker_url = f"mqtt://127.0.0.1:{self.mqtt_port}"
        self.est_url = ""
        self.broker: Proc | None = None
        self.server: Proc | None = None
        self.gateway: Proc | None = None

    def configure(self, *, lifetime: str, grace: str, min_firmware: str | None) -> None:
        """Like cli/demo.py configure(): [ca.*] tables before [storage]; the gateway's quick settings
        go into its own gateway.toml (start_gateway)."""
        path = self.home / "config.toml"
        text = path.read_text()
        assert 'renewal_grace = "7d"' in text and '[ca.profiles.device]\nlifetime = "3d"' in text
        text = text.replace('renewal_grace = "7d"', f'renewal_grace = "{grace}"')
        text = text.replace('[ca.profiles.device]\nlifetime = "3d"', f'[ca.profiles.device]\nlifetime = "{lifetime}"')
        if min_firmware:
            models = "".join(f'[ca.models."{m}"]\nmin_firmware = "{min_firmware}"\n\n' for m in MODELS)
            assert "\n[storage]" in text
            text = text.replace("\n[storage]", "\n" + models + "[storage]", 1)
        path.write_text(text)
        (self.work / "gateway-settings.toml").write_text('sweep_every = "1s"\nretry_every = "1s"\n')

    # -- processes ------------------------------------------------------------------
    def start(self, *, mqtt: bool = True) -> "Stack":
        if mqtt:
            self.start_broker()
        self.start_server()
        if mqtt:
            self.start_gateway()
        return self

    def start_broker(self) -> None:
        conf = self.work / "mosquitto.conf"
        lines = [f"listener {self.mqtt_port} 127.0.0.1", "allow_anonymous true", "persistence false",
                 "set_tcp_nodelay true", "max_queued_messages 10000", "log_dest stderr"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.broker = Proc("mosquitto", ["mosquitto", "-c", conf], self.logs)
        self.broker.start()

        def accepting():
            if not self.broker.alive:
                raise AssertionError(f"mosquitto exited:\n{self.broker.stderr_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.mqtt_port), timeout=0.5).close()
                return True
            except OSError:
                return False
        wait_until(accepting, 10, 0.05, "mosquitto to accept connections")

    def start_server(self) -> None:
        self.server = Proc("serve", [IOMTCA, "serve", "--dir", self.home, "--listen", "127.0.0.1:0",
                                     "--http-listen", f"127.0.0.1:{self.http_port}", "--console-listen", "127.0.0.1:0"], self.logs)
        match = self.server.start(SERVE_READY, timeout=30)
        self.est_url = match.group(1)
        assert match.group(2).rstrip("/") == self.ocsp_base

    def start_gateway(self) -> None:
        gwdir = self.work / "gateway-gw-sim-test"
        if not (gwdir / "gateway.toml").exists():
            setup_gateway(self.home, gwdir, "gw-sim-test", self.est_url)
        self.gateway = Proc("gateway", [IOMTCA, "gateway", "run", "--dir", gwdir, "--broker", self.broker_url,
                                        "--ca", self.est_url, "--client-id", "gw-sim-test"], self.logs)
        self.gateway.start(GATEWAY_READY, timeout=30)

    def close(self) -> None:
        for proc in (self.gateway, self.server, self.broker):
            if proc is not None:
                proc.stop()

    # -- the simulator as a subprocess ----------------------------------------------------
    def sim_argv(self, *, devices: int, transport: str, duration: str, final_sync: str = "2s",
                 offline_ratio: float = 0.0, seed: int = 1, json_out: Path, extra=()) -> list:
        return [IOMTCA, "sim", "--dir", self.home, "--devices", devices, "--transport", transport,
                "--offline-ratio", offline_ratio, "--duration", duration, "--final-sync", final_sync,
                "--est", self.est_url or "https://127.0.0.1:9", "--broker", self.broker_url, "--seed", seed,
                "--json-out", json_out, *extra]

    def start_sim(self, name: str = "sim", **kw) -> tuple[Proc, Path]:
        json_out = self.work / f"{name}.json"
        proc = Proc(name, self.sim_argv(json_out=json_out, **kw), self.logs)
        proc.start()
        return proc, json_out

    def sim(self, name: str = "sim", *, timeout: float = 90, **kw) -> tuple[int, dict]:
        """Run `iomtca sim` to completion: (exit status, summary JSON)."""
        proc, json_out = self.start_sim(name, **kw)
        code = proc.wait(timeout)
        assert json_out.exists(), f"{name} wrote no summary (exit {code}):\n{proc.stderr_tail()}"
        return code, json.loads(json_out.read_text())

    # -- the CA's records ---------------------------------------------------------------
    def iomtca(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return run([IOMTCA, *args, "--dir", self.home], check=check)

    def _query(self, sql: str, params=()) -> list[sqlite3.Row]:
        db = sqlite3.connect(f"file:{self.home / 'iomtca.db'}?mode=ro", uri=True, timeout=10)
        try:
            db.row_factory = sqlite3.Row
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def audit(self, device_id: str | None = None, action: str | None = None) -> list[dict]:
        sql, params = "SELECT id, at, actor, action, device_id, serial, detail FROM audit_log WHERE 1=1", []
        if device_id:
            sql += " AND device_id = ?"
            params.append(device_id)
        if action:
            sql += " AND action = ?"
            params.append(action)
        rows = self._query(sql + " ORDER BY id", params)
        return [dict(r) | {"detail": json.loads(r["detail"] or "{}")} for r in rows]

    def certificates(self, device_id: str) -> list[dict]:
        return [dict(r) for r in self._query(
            "SELECT serial, status, not_before, not_after FROM certificates WHERE device_id = ? ORDER BY created_at",
            (device_id,))]

    def device_row(self, device_id: str) -> dict:
        rows = self._query("SELECT * FROM devices WHERE id = ?", (device_id,))
        assert rows, f"{device_id} is not registered"
        return dict(rows[0])


@pytest.fixture
def make_stack(tmp_path):
    """make_stack(name, lifetime=..., grace=..., min_firmware=...) -> an unstarted Stack, closed after the test."""
    made: list[Stack] = []

    def make(name: str = "stack", **config) -> Stack:
        stack = Stack(tmp_path / name, **config)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.close()


@pytest.fixture(scope="module")
def make_module_stack(tmp_path_factory):
    """Like make_stack, shared by the tests of one module."""
    made: list[Stack] = []

    def make(name: str = "stack", **config) -> Stack:
        stack = Stack(tmp_path_factory.mktemp(name), **config)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.close()


@pytest.fixture(scope="session", autouse=True)
def _stop_leftovers():
    yield
    for proc in PROCESSES:
        proc.stop(grace=2)


_PROC_START = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def _note_processes(request):
    request.node.stash[_PROC_START] = len(PROCESSES)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    report.sections.extend(procs.failure_sections(item.stash.get(_PROC_START, 0)))
