"""`iomtca sim` as an engineer runs it, against a real `iomtca serve`, `iomtca gateway` and mosquitto.

The runs take wall-clock time (certificates of 12 s, renewals at 8 s), so every scenario starts at
once when the module begins, each on its own CA directory, broker, server and gateway, in its own
thread; each test then waits (bounded) for its scenario and checks what it must show.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from tests.firmware_sim.conftest import Stack, wait_until

SCENARIO_TIMEOUT = 150  # seconds a test waits for its scenario at most


class Scenario:
    """A scenario function run in a thread; `result()` re-raises what went wrong in it."""

    def __init__(self, fn, *args) -> None:
        self._result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True, name=fn.__name__)
        self._thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self._result = fn(*args)
        except BaseException as exc:  # handed to the test that reads it
            self._error = exc

    def result(self, timeout: float = SCENARIO_TIMEOUT):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"scenario {self._thread.name} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result


# -- the scenarios ---------------------------------------------------------------------------
def fleet_over(stack: Stack, transport: str) -> dict:
    stack.start(mqtt=transport == "mqtt")
    code, summary = stack.sim(devices=6, transport=transport, duration="13s", final_sync="2s")
    return {"code": code, "summary": summary, "audit": stack.audit()}


def old_firmware_fleet(stack: Stack) -> dict:
    """Every device registered on firmware 1.0.0 while every model needs 2.0.0 to renew."""
    stack.start()
    code, summary = stack.sim(devices=6, transport="mixed", duration="14s", final_sync="2s",
                              extra=["--old-firmware-ratio", "1"])
    return {"code": code, "summary": summary, "audit": stack.audit(),
            "firmware": {f"sim-{i:05d}": stack.device_row(f"sim-{i:05d}")["firmware"] for i in range(1, 7)}}


REVOKED = ("sim-00001", "sim-00002")  # one HTTP device, one MQTT device (mixed: odd HTTP, even MQTT)


def decommission_mid_run(stack: Stack) -> dict:
    stack.start()
    proc, json_out = stack.start_sim("sim", devices=6, transport="mixed", duration="24s", final_sync="3s")
    wait_until(lambda: all(stack.audit(d, "certificate_issued") for d in REVOKED), 20, 0.2,
               "the devices to be decommissioned to enroll")
    decommissioned_at = time.time()
    for device_id in REVOKED:
        stack.iomtca("device", "decommission", device_id)
    code = proc.wait(90)
    return {"code": code, "summary": json.loads(json_out.read_text()), "decommissioned_at": decommissioned_at,
            "audit": stack.audit()}


def snapshot(stack: Stack, device_ids) -> dict:
    out = {}
    for device_id in device_ids:
        folder = stack.home / "sim" / device_id
        out[device_id] = {"key": (folder / "key.pem").read_bytes() if (folder / "key.pem").exists() else None,
                          "cert": (folder / "cert.pem").read_bytes() if (folder / "cert.pem").exists() else None,
                          "certs_at_ca": [c["serial"] for c in stack.certificates(device_id)]}
    return out


RESTART_IDS = [f"sim-{i:05d}" for i in range(1, 5)]


def restart_from_folders(stack: Stack) -> dict:
    stack.start()
    first = stack.sim("first", devices=4, transport="mixed", duration="3s", final_sync="1s")
    before = snapshot(stack, RESTART_IDS)
    # the same folders again, with two more devices that are new
    second = stack.sim("second", devices=6, transport="mixed", duration="3s", final_sync="1s")
    after = snapshot(stack, RESTART_IDS)
    return {"first": first, "second": second, "before": before, "after": after, "audit": stack.audit()}


def server_stopped_before_the_run(stack: Stack) -> dict:
    stack.start(mqtt=False)
    stack.server.stop()
    started = time.monotonic()
    code, summary = stack.sim(devices=3, transport="http", duration="3s", final_sync="1s")
    return {"code": code, "summary": summary, "elapsed": time.monotonic() - started}


def gateway_stopped_before_the_run(stack: Stack) -> dict:
    stack.start()
    stack.gateway.stop()
    started = time.monotonic()
    code, summary = stack.sim(devices=2, transport="mqtt", duration="3s", final_sync="1s")
    return {"code": code, "summary": summary, "elapsed": time.monotonic() - started}


@pytest.fixture(scope="module")
def campaign(make_module_stack):
    plans = {
        "http": (fleet_over, dict(lifetime="12s"), "http"),
        "mqtt": (fleet_over, dict(lifetime="12s"), "mqtt"),
        "posture": (old_firmware_fleet, dict(lifetime="12s", min_firmware="2.0.0")),
        "revocation": (decommission_mid_run, dict(lifetime="12s")),
        "restart": (restart_from_folders, dict(lifetime="60s")),
        "no_server": (server_stopped_before_the_run, dict(lifetime="12s")),
        "no_gateway": (gateway_stopped_before_the_run, dict(lifetime="12s")),
    }
    scenarios = {}
    for name, (fn, config, *args) in plans.items():
        stack = make_module_stack(name, **config)
        scenarios[name] = Scenario(fn, stack, *args)
    yield scenarios
    for scenario in scenarios.values():
        try:
            scenario.result(timeout=120)
        except BaseException:
            pass


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def renewals(audit: list[dict], device_id: str) -> list[dict]:
    return [r for r in audit if r["device_id"] == device_id and r["action"] == "certificate_renewed"]


def issued(audit: list[dict], device_id: str) -> list[dict]:
    return [r for r in audit if r["device_id"] == device_id and r["action"] == "certificate_issued"]


# -- 2. a small fleet over each transport --------------------------------------------------
@pytest.mark.parametrize("transport", ["http", "mqtt"])
def test_small_fleet_enrolls_and_renews_every_device(campaign, transport):
    run = campaign[transport].result()
    summary, audit = run["summary"], run["audit"]
    assert run["code"] == 0, summary
    assert summary["transport"] == transport and summary["devices"] == 6
    assert summary["counts"]["enrolled"] == 6
    assert summary["counts"]["renewed"] >= 6
    final = summary["final"]
    assert final["missing"] == [] and final["valid"] == 6
    assert final["revoked"] == [] and final["stranded"] == []
    # nothing was refused; a peer check may time out on a retained OCSP message not yet published
    assert set(summary["errors"]) <= {"ocsp_check_failed"}, summary["errors"]
    for i in range(1, 7):
        device_id = f"sim-{i:05d}"
        # the CA agrees: one first enrollment, then renewals that each name the certificate they replace
        assert len(issued(audit, device_id)) == 1, device_id
        chain = [issued(audit, device_id)[0]["serial"]] + [r["serial"] for r in renewals(audit, device_id)]
        assert len(chain) >= 2, device_id
        assert [r["detail"]["renews"] for r in renewals(audit, device_id)] == chain[:-1]
    ops = set(summary["latency"])
    if transport == "http":
        assert {"http_simpleenroll", "http_serverkeygen", "http_simplereenroll"} <= ops
    else:
        assert {"mqtt_simpleenroll", "mqtt_simplereenroll"} <= ops
    # peers looked at each other's revocation status and verified the responses
    assert summary["counts"].get("ocsp_checks", 0) > 0
    assert f"{transport}_ocsp" in ops


# -- 4. firmware posture ---------------------------------------------------------------------
def firmware_changes(audit: list[dict], device_id: str) -> list[dict]:
    return [r for r in audit if r["device_id"] == device_id and r["action"] == "firmware_changed"]


def test_firmware_changes_only_by_the_devices_own_proof(campaign):
    """The simulator never writes firmware into the registry: every change at the CA is a device
    proving it, with a signed `req/posture` (MQTT) or a mutual-TLS `POST /iomt/v1/posture` (HTTP)."""
    run = campaign["posture"].result()
    summary, audit = run["summary"], run["audit"]
    assert summary["counts"].get("postures_proven", 0) >= 6, summary["counts"]
    assert {"mqtt_posture", "http_posture"} <= set(summary["latency"])
    for i in range(1, 7):
        device_id = f"sim-{i:05d}"
        changes = firmware_changes(audit, device_id)
        assert changes, device_id
        proof = "mtls" if i % 2 else "cms"   # mixed: odd ids speak HTTP, even ones MQTT
        for row in changes:
            assert row["actor"] == f"device:{device_id}", row
            assert row["detail"].get("proof") == proof, row
    assert not [r for r in audit if r["actor"].startswith("system:simulator")
                and r["action"] not in ("device_registered", "token_created")]


def test_old_firmware_is_refused_until_the_mqtt_device_upgrades(campaign):
    run = campaign["posture"].result()
    summary, audit = run["summary"], run["audit"]
    mqtt_ids = [f"sim-{i:05d}" for i in (2, 4, 6)]
    assert summary["errors"].get("posture_noncompliant", 0) >= 1, summary
    assert summary["counts"].get("posture_refusals", 0) >= 1
    assert summary["counts"].get("firmware_upgrades", 0) >= len(mqtt_ids)
    for device_id in mqtt_ids:
        rows = [r for r in audit if r["device_id"] == device_id]
        first_renewal = next(i for i, r in enumerate(rows) if r["action"] == "certificate_renewed")
        upgrades = [i for i, r in enumerate(rows) if r["action"] == "firmware_changed"
                    and r["detail"]["from"] == "1.0.0"]
        assert upgrades and upgrades[0] < first_renewal, (device_id, [r["action"] for r in rows])
        # nothing was renewed on the old firmware: every refusal before it says why
        refused = [r for r in rows[:first_renewal] if r["action"] == "renew_refused"]
        assert all(r["detail"]["code"] == "posture_noncompliant" for r in refused), refused
        assert version(run["firmware"][device_id]) >= (2, 0, 0)
        assert device_id not in summary["final"]["missing"]
    # the CA refused at least one renewal for posture, and the device renewed after upgrading
    assert any(r["action"] == "renew_refused" and r["detail"]["code"] == "posture_noncompliant"
               and r["device_id"] in mqtt_ids for r in audit)


def test_old_firmware_http_device_upgrades_and_renews(campaign):
    run = campaign["posture"].result()
    summary, audit = run["summary"], run["audit"]
    http_ids = [f"sim-{i:05d}" for i in (1, 3, 5)]
    assert any(r["action"] == "renew_refused" and r["device_id"] in http_ids for r in audit)
    for device_id in http_ids:
        assert renewals(audit, device_id), device_id
    assert summary["final"]["missing"] == [] and run["code"] == 0


# -- 5. revocation seen by peers -----------------------------------------------------------------
def test_decommissioned_devices_are_seen_revoked_by_their_peers(campaign):
    run = campaign["revocation"].result()
    summary, audit = run["summary"], run["audit"]
    final = summary["final"]
    for device_id in REVOKED:
        assert any(r["action"] == "device_decommissioned" and r["device_id"] == device_id for r in audit)
        assert device_id in final["revoked"], final
        assert device_id in final["revoked_seen_by_peers"], final
    assert final["revoked"] == sorted(REVOKED)
    assert set(final["revoked_seen_by_peers"]) <= set(REVOKED)  # nobody else was reported revoked
    assert summary["counts"].get("revocations_seen", 0) >= 2
    assert {"http_ocsp", "mqtt_ocsp"} <= set(summary["latency"])  # both ways of checking were used
    # revoked devices should not have a certificate: they are not missing; the others renewed and are fine
    assert final["missing"] == [] and final["valid"] == 4 and run["code"] == 0
    for i in range(3, 7):
        assert renewals(audit, f"sim-{i:05d}"), f"sim-{i:05d}"


# -- 6. restarted devices keep their identity ---------------------------------------------------------
def test_restarted_devices_keep_their_identity(campaign):
    run = campaign["restart"].result()
    (code1, first), (code2, second) = run["first"], run["second"]
    assert code1 == 0 and code2 == 0, (first, second)
    assert first["counts"]["enrolled"] == 4
    assert second["counts"].get("enrolled", 0) == 2, second["counts"]   # only the two new devices
    assert second["final"]["valid"] == 6 and second["final"]["missing"] == []
    for device_id in RESTART_IDS:
        before, after = run["before"][device_id], run["after"][device_id]
        assert before["key"] is not None and before["cert"] is not None, device_id
        assert len(issued(run["audit"], device_id)) == 1, device_id      # enrolled once, ever
        # the CA's certificates for the device grow only by renewals (none with 60 s certificates)
        assert len(after["certs_at_ca"]) == 1 + len(renewals(run["audit"], device_id)) == 1, device_id
        assert after["certs_at_ca"] == before["certs_at_ca"]
        # the very same key and certificate as before the restart
        assert after["key"] == before["key"], device_id
        assert after["cert"] == before["cert"], device_id


# -- 7. the exit status ----------------------------------------------------------------------------------
def test_exit_status_is_nonzero_when_devices_cannot_enroll_over_http(campaign):
    run = campaign["no_server"].result()
    summary = run["summary"]
    assert run["code"] == 1
    assert summary["final"]["missing"] == ["sim-00001", "sim-00002", "sim-00003"]
    assert summary["final"]["valid"] == 0
    assert summary["counts"].get("enrolled", 0) == 0
    assert summary["errors"].get("est_unreachable", 0) >= 3


def test_exit_status_is_nonzero_when_mqtt_devices_get_no_answer(campaign):
    run = campaign["no_gateway"].result()
    summary = run["summary"]
    assert run["code"] == 1
    assert summary["final"]["missing"] == ["sim-00001", "sim-00002"]
    assert summary["counts"].get("enrolled", 0) == 0


def test_run_time_is_bounded_by_duration_and_final_sync(campaign):
    run = campaign["no_gateway"].result()
    assert run["elapsed"] < 3 + 1 + 8, run["elapsed"]  # process start-up and registration included
