"""Fixtures for the gateway tests: a mosquitto broker, `iomtca serve` and `iomtca gateway` as real
subprocesses on free ports, and devices made of openssl and the mosquitto clients (gwkit.py).

A CA directory is made once per session with `iomtca init` and copied for each stack. When a
test fails, the stderr of every process it used is attached to the report.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.gateway import gwkit
from tests.procs import failure_sections
from tests.gateway.gwkit import Broker, CAServer, Device, Gateway, SecureBroker

_PROC_START = pytest.StashKey[int]()
_SUB_START = pytest.StashKey[int]()


class Stack:
    """One broker, one CA server and any number of gateways over one CA directory."""

    def __init__(self, work: Path, template: Path, *, ca_tables: str = "", gateway: str = "",
                 secure: bool = False) -> None:
        self.work = work
        self.home = work / "ca"
        shutil.copytree(template, self.home)
        gwkit.configure(self.home, ca_tables=ca_tables, gateway=gateway)
        self.logs = work / "logs"
        # secure: TLS, passwords and an ACL (gwkit.SecureBroker); the gateway logs in with its account
        self.broker = SecureBroker(work / "broker") if secure else Broker(work / "broker")
        self.ca = CAServer(self.home, self.logs)
        self.gateways: list[Gateway] = []

    @property
    def port(self) -> int:
        return self.broker.port

    def start(self, *client_ids: str) -> "Stack":
        self.broker.start()
        self.ca.start()
        for client_id in client_ids or ("gw-1",):
            self.add_gateway(client_id)
        return self

    def add_gateway(self, client_id: str, *, publish_pki: bool = True, start: bool = True) -> Gateway:
        extra = self.broker.gateway_args() if isinstance(self.broker, SecureBroker) else ()
        gw = Gateway(self.home, self.broker, self.ca.est_url, client_id, self.logs, publish_pki=publish_pki,
                     extra_args=extra)
        self.gateways.append(gw)
        if start:
            gw.start()
        return gw

    @property
    def gateway(self) -> Gateway:
        return self.gateways[0]

    def register(self, *rows: tuple) -> dict[str, str]:
        return gwkit.register(self.home, list(rows), self.work)

    def device(self, device_id: str, token: str | None = None) -> Device:
        return Device(device_id, self.port, self.work, token)

    def devices(self, *rows: tuple) -> dict[str, Device]:
        """Register devices and hand them out, token in hand."""
        tokens = self.register(*rows)
        return {device_id: self.device(device_id, token) for device_id, token in tokens.items()}

    def close(self) -> None:
        for gw in self.gateways:
            gw.stop()
        self.ca.stop(grace=1)
        self.broker.stop()


@pytest.fixture(scope="session")
def gw_ca_template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("gw-ca-template") / "ca"
    gwkit.init_ca(home)
    return home


@pytest.fixture(scope="session")
def make_stack(gw_ca_template):
    """make_stack(work_dir, ca_tables=..., gateway=...) -> an unstarted Stack; closed at session end
    at the latest (fixtures using it close theirs sooner)."""
    stacks: list[Stack] = []

    def make(work: Path, **config) -> Stack:
        stack = Stack(work, gw_ca_template, **config)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture
def stack_factory(make_stack, tmp_path):
    """A function-scoped stack maker: every stack it makes is stopped after the test."""
    made: list[Stack] = []

    def make(**config) -> Stack:
        stack = make_stack(tmp_path / f"stack{len(made)}", **config)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.close()


@pytest.fixture(autouse=True)
def _gateway_test_bookkeeping(request):
    request.node.stash[_PROC_START] = len(gwkit.PROCESSES)
    request.node.stash[_SUB_START] = len(gwkit.SUBSCRIBERS)
    yield
    for sub in gwkit.SUBSCRIBERS[request.node.stash[_SUB_START]:]:
        sub.close()


@pytest.fixture(scope="session", autouse=True)
def _kill_leftovers():
    yield
    for sub in gwkit.SUBSCRIBERS:
        sub.close()
    for proc in gwkit.PROCESSES:
        proc.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    report.sections.extend(failure_sections(item.stash.get(_PROC_START, 0)))


@pytest.fixture
def gw_dir(tmp_path):
    """gw_dir(settings) -> a GWDIR holding only a gateway.toml with these [gateway] settings (for
    the config loader's tests; no credential)."""
    from gateway.home import GatewayHome

    def make(settings: str) -> GatewayHome:
        (tmp_path / "gateway.toml").write_text('[gateway]\nname = "gw-settings"\n' + settings)
        return GatewayHome(tmp_path)
    return make
