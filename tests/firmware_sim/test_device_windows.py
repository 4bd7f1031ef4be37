"""Single simulated devices driven in-process with windows the test controls (no random
connectivity): the renewal grace path after an absence past expiry, a device stranded after an
absence past expiry + grace, and how a device treats renewal notices.

Each scenario runs in its own event loop (asyncio.run) against a real server, gateway and broker.
"""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta

import pytest

from ca.timefmt import from_rfc3339, utc_now
from firmware_sim.device import State
from firmware_sim.est_client import ESTClient
from firmware_sim.fleet import Fleet, SimOptions
from firmware_sim.sim_device import SimDevice
from tests.firmware_sim.conftest import Stack

LIFETIME_S, GRACE_S = 6, 8


def options(stack: Stack, devices: int, transport: str, **kw) -> SimOptions:
    return SimOptions(home=stack.home, devices=devices, transport=transport, offline_ratio=0.0,
                      est_url=stack.est_url, broker=stack.broker_url, progress=False, **kw)


async def online_for(device: SimDevice, seconds: float) -> None:
    await asyncio.wait_for(device.online_until(time.monotonic() + seconds), seconds + 30)


async def sleep_until(when: datetime) -> None:
    await asyncio.sleep(max(0.0, (when - utc_now()).total_seconds()))


async def with_est(fleet: Fleet, stack: Stack, coro_fn):
    async with ESTClient(stack.est_url, stack.home / "root.pem") as est:
        fleet.est = est
        return await coro_fn()


# -- 3. grace path vs stranded ----------------------------------------------------------------------
# mixed transport: odd ids speak HTTP, even ids MQTT
GRACE_IDS = ("sim-00001", "sim-00002")       # back after expiry, within the grace period
QUIET_IDS = ("sim-00003", "sim-00004")       # back after expiry + grace: know they are stranded
ASKING_IDS = ("sim-00005", "sim-00006")      # back after expiry + grace, but try to renew anyway


async def _absences(stack: Stack) -> dict:
    fleet = Fleet(options(stack, 6, "mixed"))
    await fleet.prepare()
    devices = {d.record.device_id: d for d in fleet.devices}
    assert {d.record.transport for d in fleet.devices} == {"http", "mqtt"}

    async def life(device: SimDevice) -> dict:
        device_id = device.record.device_id
        await online_for(device, 2.0)
        first = {"state": device.record.state, "serial": device.record.serial,
                 "not_after": from_rfc3339(device.record.not_after)}
        if device_id in GRACE_IDS:
            await sleep_until(first["not_after"] + timedelta(seconds=1.5))
            back_at = utc_now()
            await online_for(device, 3.0)
        else:
            if device_id in ASKING_IDS:
                # its idea of the grace period is wrong (too long): it asks the CA, which must refuse
                device.grace = timedelta(seconds=120)
            await sleep_until(first["not_after"] + timedelta(seconds=GRACE_S + 1.5))
            back_at = utc_now()
            await online_for(device, 2.5)
        return {"first": first, "back_at": back_at, "state": device.record.state, "serial": device.record.serial,
                "cert_serial": format(device.folder.load_cert().serial_number, "x")}

    outcome = await with_est(fleet, stack, lambda: asyncio.gather(*(life(d) for d in devices.values())))
    return {"devices": dict(zip(devices, outcome)), "counts": dict(fleet.stats.counts),
            "errors": dict(fleet.stats.errors)}


@pytest.fixture(scope="module")
def absences(make_module_stack):
    stack = make_module_stack("absences", lifetime=f"{LIFETIME_S}s", grace=f"{GRACE_S}s").start()
    result = asyncio.run(asyncio.wait_for(_absences(stack), 60))
    return stack, result


def test_first_window_enrolls_every_device(absences):
    stack, result = absences
    for device_id, outcome in result["devices"].items():
        assert outcome["first"]["state"] is State.ENROLLED, device_id
        assert outcome["first"]["serial"], device_id
        assert len(stack.audit(device_id, "certificate_issued")) == 1, device_id


@pytest.mark.parametrize("device_id", GRACE_IDS)
def test_device_back_after_expiry_recovers_through_the_grace_path(absences, device_id):
    stack, result = absences
    outcome = result["devices"][device_id]
    first = outcome["first"]
    assert outcome["back_at"] > first["not_after"]           # it really was expired when it came back
    assert outcome["state"] is State.ENROLLED
    assert outcome["serial"] != first["serial"]              # a NEW certificate
    assert outcome["cert_serial"] == outcome["serial"]       # and it is the one in its folder
    renewed = stack.audit(device_id, "certificate_renewed")
    assert [r["detail"]["renews"] for r in renewed] == [first["serial"]]
    assert renewed[0]["serial"] == outcome["serial"]
    assert from_rfc3339(renewed[0]["at"]) > first["not_after"]  # renewed after expiry: the grace path
    assert not stack.audit(device_id, "renew_refused")
    assert result["counts"].get("grace_renewals", 0) >= len(GRACE_IDS)


@pytest.mark.parametrize("device_id", QUIET_IDS + ASKING_IDS)
def test_device_back_after_expiry_plus_grace_is_stranded(absences, device_id):
    stack, result = absences
    outcome = result["devices"][device_id]
    first = outcome["first"]
    assert outcome["back_at"] > first["not_after"] + timedelta(seconds=GRACE_S)
    assert outcome["state"] is State.STRANDED
    assert outcome["serial"] == first["serial"]              # nothing new
    assert not stack.audit(device_id, "certificate_renewed")
    refused = stack.audit(device_id, "renew_refused")
    if device_id in QUIET_IDS:
        assert refused == []                                 # it knew, and did not ask
    else:
        assert refused, "the CA should have refused the late renewal"
        assert {r["detail"]["code"] for r in refused} == {"unauthorized"}
        assert all("grace period" in r["detail"]["reason"] for r in refused)
        assert result["errors"].get("unauthorized", 0) >= len(ASKING_IDS)
    assert len(stack.certificates(device_id)) == 1


def test_stranded_device_enrolls_again_with_a_new_token(absences, tmp_path):
    stack, result = absences
    stranded = [d for d in QUIET_IDS + ASKING_IDS if result["devices"][d]["state"] is State.STRANDED]
    assert stranded == list(QUIET_IDS + ASKING_IDS)
    tokens = tmp_path / "tokens.csv"
    rows = ["device_id,token"]
    for device_id in stranded:
        rows.append(f"{device_id},{json.loads(stack.iomtca('device', 'token', device_id, '--json').stdout)['token']}")
    tokens.write_text("\n".join(rows) + "\n")

    async def again() -> dict:
        fleet = Fleet(options(stack, 6, "mixed", tokens=tokens))  # the same device folders: a restart
        await fleet.prepare()
        devices = [d for d in fleet.devices if d.record.device_id in stranded]
        await with_est(fleet, stack, lambda: asyncio.gather(*(online_for(d, 3.0) for d in devices)))
        return {d.record.device_id: (d.record.state, d.record.serial) for d in devices}

    after = asyncio.run(asyncio.wait_for(again(), 40))
    for device_id in stranded:
        state, serial = after[device_id]
        assert state is State.ENROLLED, (device_id, state)
        assert serial != result["devices"][device_id]["serial"]
        assert len(stack.audit(device_id, "certificate_issued")) == 2


# -- renewal notices ---------------------------------------------------------------------------------------
def test_mqtt_device_ignores_a_renew_notice_for_a_replaced_certificate(make_stack):
    stack = make_stack("notice", lifetime="9s", grace="30s").start()

    async def scenario() -> dict:
        fleet = Fleet(options(stack, 1, "mqtt"))
        await fleet.prepare()
        device = fleet.devices[0]
        # enrolled, then renewed once at its renewal point (6 s after issuance)
        await with_est(fleet, stack, lambda: online_for(device, 7.5))
        serials = [r["serial"] for r in stack.audit(device.record.device_id)
                   if r["action"] in ("certificate_issued", "certificate_renewed")]
        current = device.record.serial
        window = asyncio.ensure_future(with_est(fleet, stack, lambda: online_for(device, 2.5)))
        deadline = time.monotonic() + 5
        while device.mqtt is None or not device.mqtt.link.connected.is_set():
            assert time.monotonic() < deadline, "device did not connect"
            await asyncio.sleep(0.05)
        # the gateway's notice about the certificate the device has already replaced
        device.mqtt.notices.put_nowait({"type": "renew", "serial": serials[0], "not_after": "x"})
        await window
        return {"serials": serials, "current": current, "after": device.record.serial}

    result = asyncio.run(asyncio.wait_for(scenario(), 40))
    renewed = stack.audit("sim-00001", "certificate_renewed")
    assert len(result["serials"]) >= 2, "the device should have renewed once at its renewal point"
    # one renewal point passed (the next is 6 s after the renewal, after the test): one renewal
    assert len(renewed) == 1, [(r["at"], r["serial"]) for r in renewed]
    assert result["after"] == result["current"]
