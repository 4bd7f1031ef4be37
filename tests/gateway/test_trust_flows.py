"""Only what a device proves counts (issue 10), through the real server, gateway and mosquitto.

Plain presence and posture are messages anyone on the broker can publish: they are shown as
reported and change no trust. A posture signed with the device's current certificate (made with
`openssl cms -sign`, as a vendor would) proves the device: it updates the firmware the renewal
gate reads and lifts a non-attendance hold. A revoked certificate stays revoked whatever arrives,
in the store (`iomtca cert list`), in OCSP (`openssl ocsp` against the HTTP responder) and in the
CRL (`openssl crl`).

One broker, server and gateway for the module. `infusion-pump`s are held after 3 s without
proven contact (the attendance check runs every second); `trpump`s never are.
"""
from __future__ import annotations

import json

import pytest

from ca.timefmt import from_rfc3339
from tests.gateway import gwkit
from tests.gateway.gwkit import ROOT, Sub

TRUST_CA = """
[ca.models."infusion-pump"]
non_attendance = "3s"
min_firmware = "2.0.0"

[ca.attendance]
check_every = "1s"
"""
TRUST_GATEWAY = """
retry_every = "1s"
"""
HOLD_WAIT_S = 15     # enrolled -> held: 3 s of absence plus a check every second, on a loaded machine
EVENTS = f"{ROOT}/pki/events"


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("trust"), ca_tables=TRUST_CA, gateway=TRUST_GATEWAY).start()
    yield s
    s.close()


def cert_row(stack, device_id: str, serial: str) -> dict:
    rows = [c for c in gwkit.certificates(stack.home, device_id) if c["serial"] == serial]
    assert rows, f"{serial} is not among the certificates of {device_id}"
    return rows[0]


def wait_status(stack, device_id: str, serial: str, status: str, timeout: float = HOLD_WAIT_S) -> dict:
    return gwkit.wait_until(lambda: (r := cert_row(stack, device_id, serial))["status"] == status and r,
                            timeout, interval=0.3, what=f"{serial} of {device_id} to be {status}")


HELD = {"tr-revoke-1": "2.0.0", "tr-decom-1": "2.0.0", "tr-return-1": "1.0.0", "tr-feed-1": "2.0.0"}


@pytest.fixture(scope="module")
def held(stack) -> dict:
    """Infusion pumps enrolled over MQTT, then held by the attendance check (all waited for at once):
    device id -> (device, serial)."""
    devs = stack.devices(*[(device_id, "infusion-pump", firmware) for device_id, firmware in HELD.items()])
    out = {}
    for device_id, dev in devs.items():
        answer = dev.enroll(f"{device_id}-e1")
        assert answer["status"] == "ok", answer
        out[device_id] = (dev, gwkit.cert_serial(answer))
    for device_id, (_, serial) in out.items():
        row = wait_status(stack, device_id, serial, "hold")
        assert row["reason"] == "certificateHold", row
    return out


def wait_reported(stack, device_id: str, *, firmware: str | None = None, online: bool = False) -> dict:
    """Until the CA shows the plain reports (so what they did, or did not do, can be judged)."""
    def shown():
        info = gwkit.device_show(stack.home, device_id)
        missing = {"reported_firmware", "reported_online_at", "last_proven_contact"} - set(info)
        assert not missing, f"`device show --json` lacks {sorted(missing)}: {sorted(info)}"
        if firmware is not None and info["reported_firmware"] != firmware:
            return None
        if online and not info["reported_online_at"]:
            return None
        return info
    return gwkit.wait_until(shown, 10, interval=0.2, what=f"the reports of {device_id} at the CA")


def report_everything(stack, dev, *, shown: bool = True) -> None:
    """Anonymous presence `online` and a plain posture claiming passing firmware, as anyone could;
    returns once the CA has them (or, with shown=False, has them or refused them: a decommissioned
    device's reports may be refused, which the gateway logs)."""
    dev.report_presence("online")
    dev.report_posture({"firmware": "9.9.9", "model": "infusion-pump"})
    if shown:
        wait_reported(stack, dev.id, firmware="9.9.9", online=True)
        return

    def handled():
        info = gwkit.device_show(stack.home, dev.id)
        log = stack.gateway.proc.stderr_text()
        posture = info.get("reported_firmware") == "9.9.9" or f"posture of {dev.id} refused by the CA" in log
        presence = bool(info.get("reported_online_at")) or f"presence of {dev.id} refused by the CA" in log
        return posture and presence
    gwkit.wait_until(handled, 10, interval=0.2, what=f"the CA to have (or refuse) the reports of {dev.id}")


def assert_revoked_everywhere(stack, dev, serial: str, reason: str, crl_reason: str) -> None:
    row = cert_row(stack, dev.id, serial)
    assert (row["status"], row["reason"]) == ("revoked", reason), row
    # OCSP from the HTTP responder, judged by openssl
    text = gwkit.http_ocsp(stack.home, f"{stack.ca.http_url}/ocsp", dev.cert, stack.work)
    assert f"{dev.cert}: revoked" in text and reason in text, text
    # the CRL from the HTTP listener, read by openssl
    crl = gwkit.run(["curl", "-sS", "--fail", f"{stack.ca.http_url}/crl"]).stdout
    entries = gwkit.crl_reasons(crl, stack.work)
    assert entries.get(serial) == crl_reason, (serial, entries)


def no_status_event(sub: Sub, serial: str, seconds: float = 1.5) -> None:
    """Nothing put the certificate back: no hold or release event for it (an attendance check runs
    every second, the status feed is followed within a second)."""
    late = sub.quiet_for(seconds, lambda m: m.topic == EVENTS and m.json().get("serial") == serial)
    assert late == [], [m.payload for m in late]


# -- (a) the reproduction: hold, revoke keyCompromise, anonymous presence -------------------------------------
def test_revoked_while_held_stays_revoked_after_anonymous_presence_and_posture(stack, held):
    dev, serial = held["tr-revoke-1"]
    gwkit.iomtca(stack.home, "cert", "revoke", serial, "--reason", "keyCompromise")
    assert_revoked_everywhere(stack, dev, serial, "keyCompromise", "Key Compromise")
    with Sub(stack.port, EVENTS) as events:
        report_everything(stack, dev)
        no_status_event(events, serial)
    assert_revoked_everywhere(stack, dev, serial, "keyCompromise", "Key Compromise")

    # and the device's own signature with that certificate is refused, changing nothing
    answer = dev.prove_posture("tr-revoke-1-p1", {"firmware": "2.0.0", "model": "infusion-pump"})
    assert answer["status"] == "error" and answer["error"]["code"] == "revoked", answer
    assert_revoked_everywhere(stack, dev, serial, "keyCompromise", "Key Compromise")


# -- (b) the same after decommission ----------------------------------------------------------------------
def test_decommissioned_while_held_stays_revoked(stack, held):
    dev, serial = held["tr-decom-1"]
    gwkit.iomtca(stack.home, "device", "decommission", dev.id)
    assert_revoked_everywhere(stack, dev, serial, "cessationOfOperation", "Cessation Of Operation")
    with Sub(stack.port, EVENTS) as events:
        report_everything(stack, dev, shown=False)
        no_status_event(events, serial)
        answer = dev.prove_posture("tr-decom-1-p1", {"firmware": "2.0.0", "model": "infusion-pump"})
    assert answer["status"] == "error" and answer["error"]["code"] == "revoked", answer
    assert_revoked_everywhere(stack, dev, serial, "cessationOfOperation", "Cessation Of Operation")
    assert gwkit.device_show(stack.home, dev.id)["status"] == "decommissioned"


# -- (c) signed posture: a proof of return; only the device's own current certificate ---------------------------
def test_signed_posture_releases_a_non_attendance_hold_once_posture_passes(stack, held):
    dev, serial = held["tr-return-1"]
    with Sub(stack.port, EVENTS, f"{ROOT}/dev/{dev.id}/notify") as sub:
        # anonymous reports of passing firmware release nothing
        report_everything(stack, dev)
        assert cert_row(stack, dev.id, serial)["status"] == "hold"
        # the device proves itself, but its firmware is below min_firmware: contact counted, hold kept
        answer = dev.prove_posture("tr-return-1-p1", {"firmware": "1.0.0", "model": "infusion-pump"})
        assert answer == {"id": "tr-return-1-p1", "status": "ok"}, answer
        assert cert_row(stack, dev.id, serial)["status"] == "hold"
        # proven firmware that passes: released
        answer = dev.prove_posture("tr-return-1-p2", {"firmware": "2.0.0", "model": "infusion-pump"})
        assert answer == {"id": "tr-return-1-p2", "status": "ok"}, answer
        released = sub.wait_for(lambda m: m.topic == EVENTS and m.json().get("serial") == serial
                                and m.json().get("type") == "released", 5, "the released event").json()
        notice = sub.wait_for(lambda m: m.topic.endswith("/notify") and m.json().get("type") == "released",
                              5, "the device's released notice").json()
    assert released["device_id"] == dev.id and notice["serial"] == serial
    shown = gwkit.device_show(stack.home, dev.id)
    assert shown["firmware"] == "2.0.0" and shown["last_proven_contact"], shown


def test_posture_signed_with_another_devices_certificate_is_unauthorized(stack):
    devs = stack.devices(("tr-auth-a", "trpump", "1.0"), ("tr-auth-b", "trpump", "1.0"))
    a, b = devs["tr-auth-a"], devs["tr-auth-b"]
    assert a.enroll("tr-auth-e1")["status"] == "ok"
    assert b.enroll("tr-auth-e1")["status"] == "ok"
    answer = a.prove_posture("tr-auth-p1", {"firmware": "7.0"}, signer_cert=b.cert, signer_key=b.key)
    assert answer["status"] == "error" and answer["error"]["code"] == "unauthorized", answer
    assert gwkit.device_show(stack.home, a.id)["firmware"] == "1.0"
    assert gwkit.device_show(stack.home, b.id)["firmware"] == "1.0"


def ra_get(stack, path: str) -> dict:
    """GET on the RA API with the gateway's own credential (from its GWDIR), as the gateway does."""
    import ssl
    import urllib.request
    gwdir = stack.gateway.home
    ctx = ssl.create_default_context(cafile=str(gwdir / "root.pem"))
    ctx.load_cert_chain(gwdir / "ra.pem", gwdir / "private" / "ra.key",
                        password=(gwdir / "private" / "passphrase").read_bytes().strip())
    with urllib.request.urlopen(stack.ca.est_url + path, context=ctx, timeout=30) as resp:
        return json.loads(resp.read())


def test_the_feeds_tell_a_hold_for_absence_from_an_operators_hold(stack, held):
    """A relay that shuts held devices out of the broker must know which holds the device itself
    can lift by coming back (docs/GATEWAY.md "Revocation at the broker")."""
    _, absent_serial = held["tr-feed-1"]
    dev = stack.devices(("tr-feed-op", "trpump", "1.0"))["tr-feed-op"]
    op_serial = gwkit.cert_serial(dev.enroll("tr-feed-op-e1"))
    gwkit.iomtca(stack.home, "cert", "hold", op_serial)
    certs = {c["serial"]: c for c in ra_get(stack, "/ra/v1/certificates")["certificates"]}
    assert certs[absent_serial]["status"] == "hold" and certs[absent_serial]["attendance_hold"] is True
    assert certs[op_serial]["status"] == "hold" and certs[op_serial]["attendance_hold"] is False
    changes = ra_get(stack, "/ra/v1/status-changes?after=0")["changes"]
    marks = {(c["serial"], c["attendance_hold"]) for c in changes if c["status"] == "hold"}
    assert (absent_serial, True) in marks and (op_serial, False) in marks, changes


# -- (d) plain posture is shown as reported, and that is all -----------------------------------------------------
def test_plain_posture_and_presence_are_reported_only(stack):
    dev = stack.devices(("tr-report-1", "trpump", "1.0"))["tr-report-1"]
    assert dev.enroll("tr-report-e1")["status"] == "ok"
    before = gwkit.device_show(stack.home, dev.id)
    dev.report_presence("online")
    dev.report_posture({"firmware": "9.9.9", "model": "trpump"})
    shown = wait_reported(stack, dev.id, firmware="9.9.9", online=True)
    assert shown["firmware"] == "1.0", shown
    assert shown["last_proven_contact"] == before["last_proven_contact"], (before, shown)

    answer = dev.prove_posture("tr-report-p1", {"firmware": "1.2", "model": "trpump"})
    assert answer == {"id": "tr-report-p1", "status": "ok"}, answer
    proven = gwkit.device_show(stack.home, dev.id)
    assert proven["firmware"] == "1.2", proven
    assert from_rfc3339(proven["last_proven_contact"]) >= from_rfc3339(shown["reported_online_at"]), proven


# -- the EST side: posture over mutual TLS -------------------------------------------------------------------
def curl_posture(stack, body: str, *tls) -> tuple[int, dict[str, str], bytes]:
    proc = gwkit.run(["curl", "-sS", "--cacert", stack.home / "root.pem", *tls, "-D", "-",
                      "-H", "Content-Type: application/json", "--data", body,
                      f"{stack.ca.est_url}/iomt/v1/posture"], timeout=20)
    head, _, payload = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def test_est_posture_over_mutual_tls_is_proven_and_without_it_refused(stack):
    dev = stack.devices(("tr-est-1", "trpump", "1.0"))["tr-est-1"]
    assert dev.enroll("tr-est-e1")["status"] == "ok"
    status, headers, _ = curl_posture(stack, '{"firmware": "8.0"}')
    assert status == 401 and headers.get("x-error-code") == "unauthorized", (status, headers)
    assert gwkit.device_show(stack.home, dev.id)["firmware"] == "1.0"

    status, headers, payload = curl_posture(stack, '{"firmware": "1.5", "model": "trpump"}',
                                            "--cert", dev.cert, "--key", dev.key)
    assert status == 200, (status, headers, payload)
    answer = json.loads(payload)
    assert answer["status"] == "ok" and answer["device_id"] == dev.id and answer["firmware"] == "1.5", answer
    assert gwkit.device_show(stack.home, dev.id)["firmware"] == "1.5"
