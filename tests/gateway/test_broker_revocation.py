"""Revocation reaches the broker: with `[gateway] broker_control = "dynsec"` the gateway tells
mosquitto's dynamic-security plugin to drop and refuse a device whose certificates are revoked or
held, and to let it back on release (docs/GATEWAY.md, "Revocation at the broker").

Real peers: mosquitto 2.0 with the plugin and per-client accounts (tests/gateway/dynsec_kit.py),
`iomtca serve` and `iomtca gateway` as subprocesses; devices enroll over MQTT with their own
login and hold a live paho session while the operator runs `iomtca cert revoke|hold|release` and
`iomtca device decommission`. Every wait is bounded.
"""
from __future__ import annotations

import json
import time

import pytest

from ca.errors import ConfigError
from gateway import broker_control as bc
from gateway.config import PASSWORD_ENV, load_gateway_config
from tests.gateway import gwkit
from tests.gateway.dynsec_kit import GW_PASSWORD, GW_USER, DynsecBroker, LoginDevice, Session, connect_once
from tests.gateway.gwkit import wait_until

LIMIT_S = 1.0   # from `iomtca cert revoke` returning to the device's session closed
NOT_AUTHORIZED = 135


def start_gateway(gw: gwkit.Gateway) -> None:
    with pytest.MonkeyPatch.context() as mp:   # the gateway's broker password only in its environment
        mp.setenv(PASSWORD_ENV, GW_PASSWORD)
        gw.start()


def dynsec_stack(make, work, *, gateway: str, client_id: str):
    stack = make(work, gateway=f'broker_username = "{GW_USER}"\nretry_every = "1s"\n' + gateway)
    stack.broker = DynsecBroker(work / "broker")
    stack.broker.start()
    stack.ca.start()
    start_gateway(stack.add_gateway(client_id, start=False))
    return stack


@pytest.fixture(scope="module")
def hospital(make_stack, tmp_path_factory):
    stack = dynsec_stack(make_stack, tmp_path_factory.mktemp("broker-revocation"),
                         gateway='broker_control = "dynsec"\n', client_id="gw-dynsec")
    yield stack
    stack.close()


def enrolled(stack, device_id: str) -> tuple[LoginDevice, str]:
    """A device registered at the CA with a broker account, enrolled over MQTT with its own login."""
    tokens = stack.register((device_id, "infusion-pump"))
    device = LoginDevice(device_id, stack.broker, stack.work, tokens[device_id])
    answer = device.enroll("r1")
    assert answer["status"] == "ok", answer
    return device, gwkit.cert_serial(answer)


STARTED: dict[float, float] = {}   # when each operator command returned -> when it was started


def operator(stack, *args) -> float:
    """Run `iomtca ARGS` (the CA's CLI, straight to its store) and return when it returned."""
    started = time.monotonic()
    gwkit.iomtca(stack.home, *args)
    returned = time.monotonic()
    STARTED[returned] = started
    return returned


def assert_dropped_in_time(session: Session, returned_at: float, what: str) -> float:
    """The session closed less than LIMIT_S after the command returned (negative: before the CLI
    process had exited, i.e. its commit was already out)."""
    dropped_at = session.wait_dropped(10)
    elapsed = dropped_at - returned_at
    print(f"\n{what}: session of {session.user} closed {elapsed * 1000:.0f} ms after the command returned, "
          f"{(dropped_at - STARTED.get(returned_at, returned_at)) * 1000:.0f} ms after it was started "
          f"({session.drop_reason})")
    assert elapsed < LIMIT_S, f"{what}: session closed {elapsed:.3f} s after the command returned"
    assert session.drop_reason == "Administrative action"   # DISCONNECT 0x98 from the broker
    return elapsed


def assert_refused(stack, device: LoginDevice) -> None:
    code = connect_once(stack.broker.port, device.id, device.password)
    assert code.value == NOT_AUTHORIZED, f"reconnect of {device.id} got CONNACK {code}"


def can_connect(stack, device: LoginDevice) -> bool:
    return not connect_once(stack.broker.port, device.id, device.password).is_failure


# -- against the real broker ---------------------------------------------------------------
def test_revoke_closes_the_session_within_a_second_and_refuses_the_reconnect(hospital):
    device, serial = enrolled(hospital, "dsec-pump-r")
    with Session(hospital.broker.port, device.id, device.password) as session:
        returned = operator(hospital, "cert", "revoke", serial, "--reason", "keyCompromise")
        assert_dropped_in_time(session, returned, "cert revoke")
    assert_refused(hospital, device)
    assert hospital.broker.disabled(device.id)
    gw_log = hospital.gateway.proc.stderr_text()
    assert f"broker confirmed disableClient device={device.id}" in gw_log
    # the device cannot come back by itself: still refused after the recheck has run
    time.sleep(bc.RECHECK_AFTER_S + 1)
    assert_refused(hospital, device)


def test_hold_closes_the_session_and_release_lets_the_device_back(hospital):
    device, serial = enrolled(hospital, "dsec-pump-h")
    with Session(hospital.broker.port, device.id, device.password) as session:
        returned = operator(hospital, "cert", "hold", serial)
        assert_dropped_in_time(session, returned, "cert hold")
    assert_refused(hospital, device)
    returned = operator(hospital, "cert", "release", serial)
    wait_until(lambda: can_connect(hospital, device), 5, interval=0.1, what=f"{device.id} let back after release")
    print(f"\ncert release: {device.id} connects again {(time.monotonic() - returned) * 1000:.0f} ms after it returned")
    assert not hospital.broker.disabled(device.id)
    # and it is a device again: its own topics work with its login
    assert device.enroll("r2")["status"] in ("ok", "error")   # answered over its own login


def test_decommission_closes_the_session(hospital):
    device, _ = enrolled(hospital, "dsec-pump-d")
    with Session(hospital.broker.port, device.id, device.password) as session:
        returned = operator(hospital, "device", "decommission", device.id)
        assert_dropped_in_time(session, returned, "device decommission")
    assert_refused(hospital, device)


def test_revoking_an_old_certificate_of_a_renewed_device_lets_it_back(hospital):
    """The account follows the device: it still holds a good certificate, so it is let back."""
    device, old_serial = enrolled(hospital, "dsec-pump-n")
    renewed = device.reenroll("r2")
    assert renewed["status"] == "ok", renewed
    operator(hospital, "cert", "revoke", old_serial, "--reason", "superseded")
    wait_until(lambda: f"letting back device(s) that still hold a good certificate: {device.id}"
               in hospital.gateway.proc.stderr_text(), 10, what="the recheck")
    wait_until(lambda: not hospital.broker.disabled(device.id), 5, what=f"{device.id} enabled again")
    assert can_connect(hospital, device)


def test_changes_made_while_the_gateway_was_down_reach_the_broker_when_it_is_back(hospital):
    """The follower's cursor is durable: it replays what it missed, and the broker follows."""
    revoked, revoked_serial = enrolled(hospital, "dsec-pump-m1")
    held, held_serial = enrolled(hospital, "dsec-pump-m2")
    operator(hospital, "cert", "hold", held_serial)
    wait_until(lambda: hospital.broker.disabled(held.id), 5, what=f"{held.id} disabled")
    gw = hospital.gateway
    gw.stop()
    operator(hospital, "cert", "revoke", revoked_serial)   # neither change is seen live
    operator(hospital, "cert", "release", held_serial)
    assert can_connect(hospital, revoked) and not can_connect(hospital, held)
    start_gateway(gw)
    wait_until(lambda: hospital.broker.disabled(revoked.id) and not hospital.broker.disabled(held.id), 10,
               what="the missed changes at the broker")
    assert_refused(hospital, revoked)
    assert can_connect(hospital, held)
    # the start-up reconcile runs beside the follower's replay, which may set the broker right first
    wait_until(lambda: "broker control reconcile:" in gw.proc.stderr_text(), 10, what="the reconcile at start")


# -- the setting off, and a broker that does not answer ----------------------------------------
def test_setting_off_sends_nothing_to_the_broker(make_stack, tmp_path):
    stack = dynsec_stack(make_stack, tmp_path / "off", gateway="", client_id="gw-nodynsec")
    try:
        device, serial = enrolled(stack, "dsec-pump-off")
        with Session(stack.broker.port, device.id, device.password) as session:
            operator(stack, "cert", "revoke", serial)
            wait_until(lambda: "published 1 status change(s)" in stack.gateway.proc.stderr_text(), 10,
                       what="the gateway to see the revocation")
            assert not session.dropped.wait(2), "the broker dropped the session with broker_control off"
        assert can_connect(stack, device) and not stack.broker.disabled(device.id)
        assert not [line for line in stack.broker.control_publishes() if "gw-nodynsec" in line]
        assert "gw-nodynsec-dynsec" not in stack.broker.log()   # no control connection either

        # switched on later: the revocation is behind the follower's cursor, the reconcile at start finds it
        gw = stack.gateway
        gw.stop()
        with open(gw.home / "gateway.toml", "a") as fh:   # [gateway] is the file's last table
            fh.write('broker_control = "dynsec"\n')
        start_gateway(gw)
        wait_until(lambda: stack.broker.disabled(device.id), 10, what="the reconcile at start")
        assert_refused(stack, device)
        assert f"broker control reconcile: 1 certificate(s), 0 disabled account(s): disableClient device={device.id}" \
            in gw.proc.stderr_text()
    finally:
        stack.close()


def test_a_broker_that_does_not_answer_does_not_stop_the_gateway(stack_factory):
    """No dynamic-security plugin: control messages go nowhere. The gateway logs, retries with
    backoff, and goes on serving devices."""
    stack = stack_factory(gateway='broker_control = "dynsec"\nretry_every = "1s"').start("gw-unanswered")
    devices = stack.devices(("dsec-pump-u1", "infusion-pump"), ("dsec-pump-u2", "infusion-pump"))
    first = devices["dsec-pump-u1"]
    answer = first.enroll("r1")
    assert answer["status"] == "ok", answer
    gw = stack.gateway.proc
    pid = gw.pid
    gwkit.iomtca(stack.home, "cert", "revoke", gwkit.cert_serial(answer))
    wait_until(lambda: gw.stderr_text().count("broker control not confirmed") >= 2, 20,
               what="two unconfirmed attempts")
    assert "device=dsec-pump-u1" in gw.stderr_text()
    wait_until(lambda: "broker control reconcile failed" in gw.stderr_text(), 30,   # listClients unanswered too
               what="the reconcile to give up for now")
    # still the same process, and still serving devices
    assert gw.alive and gw.pid == pid
    assert devices["dsec-pump-u2"].enroll("r1")["status"] == "ok"
    assert "Traceback" not in gw.stderr_text()


# -- the setting -------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ('broker_control = "kick"\n', "broker_control must be"),
    ('broker_control = true\n', "broker_control must be"),
    ('broker_control = "dynsec"\npublish_pki = false\n', "needs publish_pki"),
])
def test_broker_control_settings_refused(gw_dir, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_gateway_config(gw_dir(settings), environ={})


def test_broker_control_setting_and_the_no_publish_pki_flag(gw_dir):
    assert load_gateway_config(gw_dir(""), environ={}).broker_control == ""
    paths = gw_dir('broker_control = "dynsec"\n')
    assert load_gateway_config(paths, environ={}).broker_control == "dynsec"
    with pytest.raises(ConfigError, match="needs publish_pki"):
        load_gateway_config(paths, environ={}, publish_pki=False)   # --no-publish-pki


# -- codec and policy (pure) ------------------------------------------------------------------------
def test_commands_encode_as_the_plugin_reads_them():
    commands = [bc.Command(bc.DISABLE, "gw-1", "pump-1"),
                bc.Command("listClients", "gw-2", None, (("verbose", True), ("count", 1000), ("offset", 0)))]
    assert json.loads(bc.encode_commands(commands)) == {"commands": [
        {"command": "disableClient", "username": "pump-1", "correlationData": "gw-1"},
        {"command": "listClients", "verbose": True, "count": 1000, "offset": 0, "correlationData": "gw-2"}]}


def test_responses_decode_and_garbage_is_refused():
    # as mosquitto 2.0.11 answered in this suite's first run
    payload = (b'{"responses":[{"command":"disableClient","correlationData":"c1"},'
               b'{"command":"disableClient","error":"Client not found","correlationData":"c2"},'
               b'{"command":"listClients","data":{"totalCount":2,"clients":[{"username":"admin","roles":[]},'
               b'{"username":"pump-1","disabled":true,"roles":[]}]},"correlationData":"c3"}]}')
    ok, missing, listed = bc.decode_responses(payload)
    assert ok == bc.Response("disableClient", "c1") and ok.ok
    assert missing.error == bc.NOT_FOUND and not missing.ok
    assert bc.disabled_accounts(listed.data) == ({"pump-1"}, 2)
    for garbage in (b"not json", b"[]", b'{"responses": 3}', b'{"responses": [{"error": "x"}]}'):
        with pytest.raises(bc.ControlResponseError):
            bc.decode_responses(garbage)
    with pytest.raises(bc.ControlResponseError):
        bc.disabled_accounts({"clients": "no"})


def test_policy_from_status_changes():
    changes = [{"device_id": "a", "status": "hold"}, {"device_id": "b", "status": "revoked"},
               {"device_id": "a", "status": "good"}, {"device_id": None, "status": "revoked"},
               {"device_id": "c", "status": "unknown"}]
    assert bc.wanted_from_changes(changes) == {"b": bc.DISABLE, "a": bc.ENABLE}


def test_a_hold_for_absence_keeps_the_device_on_the_broker():
    """The device must be able to come back over MQTT and prove itself (a signed posture lifts
    such a hold); only an operator's hold shuts it out."""
    changes = [{"device_id": "away", "status": "hold", "attendance_hold": True},
               {"device_id": "held", "status": "hold", "attendance_hold": False}]
    assert bc.wanted_from_changes(changes) == {"held": bc.DISABLE}
    certs = [{"serial": "1", "device_id": "away", "status": "hold", "attendance_hold": True},
             {"serial": "2", "device_id": "held", "status": "hold", "attendance_hold": False}]
    assert bc.reconcile_plan(certs, {"away"}) == {"away": bc.ENABLE, "held": bc.DISABLE}


def test_reconcile_plan_follows_the_devices_certificates():
    certs = [{"serial": "1", "device_id": "all-revoked", "status": "revoked"},
             {"serial": "2", "device_id": "all-revoked", "status": "hold"},
             {"serial": "3", "device_id": "renewed", "status": "revoked"},
             {"serial": "4", "device_id": "renewed", "status": "good"},
             {"serial": "5", "device_id": "released", "status": "good"},
             {"serial": "6", "device_id": "already-off", "status": "revoked"},
             {"serial": "7", "device_id": None, "status": "revoked"}]
    disabled = {"renewed", "released", "already-off", "iomtca-gateway", "not-a-device"}
    assert bc.reconcile_plan(certs, disabled) == {"all-revoked": bc.DISABLE, "renewed": bc.ENABLE,
                                                  "released": bc.ENABLE}
    assert bc.reconcile_plan(certs, disabled, only={"renewed"}) == {"renewed": bc.ENABLE}
