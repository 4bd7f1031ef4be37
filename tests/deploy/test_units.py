"""deploy/: the systemd units, their sysusers/tmpfiles entries and the example mosquitto configuration.

Judges: `systemd-analyze verify` and `systemd-analyze security --offline` (Debian package `systemd`,
no running systemd needed), `systemd-sysusers`/`systemd-tmpfiles --root` into a scratch root, and a
real mosquitto started from deploy/mosquitto/iomtca.conf with only its file paths, its listener (a
free port on 127.0.0.1) and the lines Debian's stock mosquitto.conf supplies changed. The units'
hardening is also read with a small unit-file parser, so removing a setting fails here even where
systemd-analyze is missing. What none of this shows: the units running under a real systemd.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway import tlskit
from tests.gateway.gwkit import ROOT, Sub, wait_listening
from tests.procs import Proc, free_port, run

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = {"serve": DEPLOY / "iomtca-serve.service", "gateway": DEPLOY / "iomtca-gateway.service"}
SYSUSERS = DEPLOY / "iomtca.sysusers.conf"
TMPFILES = DEPLOY / "iomtca.tmpfiles.conf"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "iomtca.conf"
ACL_EXAMPLE = DEPLOY / "mosquitto" / "acl.example"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
IOMTCA = Path(sys.executable).parent / "iomtca"
INSTALLED_IOMTCA = "/opt/iomtca/bin/iomtca"   # where docs/OPERATIONS.md installs it


# -- a unit-file reader: sections of (key, value) pairs, repeated keys kept in order ----------
def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd.syntax(7), as far as these files use it: [Section] headers, Key=Value lines, comments
    (# or ;) on lines of their own, trailing backslash continuations. Repeated keys are kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number} is neither a section, a setting nor a comment: {raw!r}"
        current.append((key.strip(), value.strip()))
    assert not pending, "the file ends in a line continuation"
    return sections


class Unit:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text()
        self.sections = parse_unit(self.text)

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def last(self, key: str, section: str = "Service") -> str | None:
        values = self.values(key, section)
        return values[-1] if values else None

    def effective_list(self, key: str, section: str = "Service") -> list[str]:
        """A list setting as systemd reads it: assignments add, an empty assignment resets."""
        items: list[str] = []
        for value in self.values(key, section):
            items = items + value.split() if value else []
        return items

    def exec_start(self) -> list[str]:
        values = self.values("ExecStart")
        assert len(values) == 1, f"{self.path.name}: one ExecStart= expected, got {values}"
        return shlex.split(values[0])


def truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "yes", "true", "on")


def seconds(value: str | None) -> float:
    """A systemd time span such as 5s, 1min 30s, 500ms, 60 (seconds)."""
    assert value, "no time span"
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


@pytest.fixture(scope="module", params=sorted(UNITS))
def unit(request) -> Unit:
    return Unit(UNITS[request.param])


def sysusers() -> dict[str, list[str]]:
    rows = [shlex.split(line) for line in SYSUSERS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return {row[1]: row for row in rows if row[0] == "u"}


def tmpfiles() -> dict[str, list[str]]:
    rows = [line.split() for line in TMPFILES.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {row[1]: row for row in rows}


# -- (b) what the units must keep -------------------------------------------------------------
def test_units_keep_their_hardening(unit):
    u = unit
    assert u.effective_list("CapabilityBoundingSet") == [] and u.values("CapabilityBoundingSet"), \
        "CapabilityBoundingSet= must be set and empty: no capability (the ports are above 1024)"
    assert u.effective_list("AmbientCapabilities") == []
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictSUIDSGID", "RestrictNamespaces", "LockPersonality"):
        assert truthy(u.last(key)), f"{u.path.name}: {key}=yes is missing"
    assert u.last("ProtectSystem") == "strict"
    assert u.last("ProtectHome") in ("yes", "true"), "ProtectHome=yes (not read-only or tmpfs)"
    assert set(u.effective_list("RestrictAddressFamilies")) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    filters = u.values("SystemCallFilter")
    assert filters and filters[0] == "@system-service", filters
    assert all(f == "@system-service" or f.startswith("~") for f in filters), \
        f"only deny-list refinements may follow @system-service: {filters}"
    umask = u.last("UMask")
    assert umask is not None and int(umask, 8) & 0o077 == 0o077, f"UMask={umask}: files must be private"
    assert u.last("Restart") == "on-failure"
    assert seconds(u.last("RestartSec")) >= 1
    assert seconds(u.last("TimeoutStopSec")) >= 10
    assert u.last("KillMode") == "mixed", "SIGTERM to the main process, which stops its own children"
    assert not truthy(u.last("DynamicUser")), "a fixed user from iomtca.sysusers.conf owns the directory"


def test_units_run_as_their_own_users_from_the_sysusers_file():
    serve, gateway = Unit(UNITS["serve"]), Unit(UNITS["gateway"])
    users = sysusers()
    for u in (serve, gateway):
        user = u.last("User")
        assert user and user != "root" and user in users, f"{u.path.name}: User={user} not in {SYSUSERS.name}"
        assert u.last("Group") in (None, user)
    assert serve.last("User") != gateway.last("User"), "the gateway never shares the CA's account"


@pytest.mark.parametrize("name, argv_tail", [("serve", ["serve"]), ("gateway", ["gateway", "run"])])
def test_exec_start_is_a_command_line_the_real_cli_accepts(name, argv_tail):
    from cli.main import build_parser

    u = Unit(UNITS[name])
    argv = u.exec_start()
    assert argv[0] == INSTALLED_IOMTCA
    assert argv[1:1 + len(argv_tail)] == argv_tail
    state = u.last("StateDirectory")
    assert argv[1 + len(argv_tail):] == ["--dir", f"/var/lib/{state}"], \
        f"only --dir, pointing at the StateDirectory=: {argv}"
    args = build_parser().parse_args(argv[1:])   # SystemExit here: a flag the CLI does not have
    assert str(args.dir) == f"/var/lib/{state}"
    if name == "gateway":
        assert args.gateway_command == "run"


def test_secrets_come_from_a_root_only_environment_file_never_the_unit_or_command_line(unit):
    from ca.keystore import PASSPHRASE_ENV
    from common.keyfiles import GATEWAY_PASSPHRASE_ENV
    from gateway.config import PASSWORD_ENV

    env_files = unit.values("EnvironmentFile")
    assert len(env_files) == 1 and env_files[0].startswith("/etc/iomtca/"), env_files
    assert unit.last("ConfigurationDirectory") == "iomtca"
    for assignment in unit.values("Environment"):
        assert not re.search(r"PASSPHRASE|PASSWORD|TOKEN", assignment), f"a secret in the unit file: {assignment}"
    assert not any(re.search(r"pass|token", a, re.I) for a in unit.exec_start()[1:])
    # the variable names the unit's comments tell operators to set are the ones the code reads
    wanted = [PASSPHRASE_ENV] if unit.path == UNITS["serve"] else [GATEWAY_PASSPHRASE_ENV, PASSWORD_ENV]
    for name in wanted:
        assert f"{name}=" in unit.text, f"{unit.path.name} does not say to set {name}"


def test_serve_may_open_a_file_for_every_connection_it_accepts():
    from enroll.limits import FD_HEADROOM, ConnectionLimits
    from enroll.server import Listeners

    # max_connections counts per listener (enroll/server.py: one ConnectionCounter per listener)
    needed = len(Listeners._fields) * ConnectionLimits().max_connections + FD_HEADROOM
    limit = Unit(UNITS["serve"]).last("LimitNOFILE")
    assert limit is not None and int(limit.split(":")[0]) >= needed, f"LimitNOFILE={limit}, needs {needed}"


def test_tmpfiles_make_the_units_directories_with_their_owners_and_modes():
    entries = tmpfiles()
    for path in UNITS.values():
        u = Unit(path)
        state = f"/var/lib/{u.last('StateDirectory')}"
        assert state in entries, f"{TMPFILES.name} does not create {state}"
        kind, _, mode, user, group = entries[state][:5]
        assert (kind, mode, user, group) == ("d", u.last("StateDirectoryMode"), u.last("User"), u.last("User"))
        config = f"/etc/{u.last('ConfigurationDirectory')}"
        assert entries[config][:5] == ["d", config, u.last("ConfigurationDirectoryMode"), "root", "root"]


# -- (a) systemd's own tools as judges ---------------------------------------------------------
def _systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package systemd; the Makefile's deps target installs it)")
    return path


@pytest.fixture
def runnable_units(tmp_path) -> list[Path]:
    """The units with ExecStart's binary replaced by this venv's iomtca (systemd-analyze verify
    checks that it exists and is executable); nothing else changed."""
    out = []
    for path in UNITS.values():
        text = path.read_text()
        assert text.count(f"ExecStart={INSTALLED_IOMTCA} ") == 1
        copy = tmp_path / path.name
        copy.write_text(text.replace(f"ExecStart={INSTALLED_IOMTCA} ", f"ExecStart={IOMTCA} "))
        out.append(copy)
    return out


def test_systemd_analyze_verify_accepts_both_units(runnable_units):
    tool = _systemd_tool("systemd-analyze")
    proc = subprocess.run([tool, "verify", "--man=no", *map(str, runnable_units)], capture_output=True, text=True,
                          timeout=60)
    # verify exits 0 even for an unknown key or an unparsable value; it only prints them
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_systemd_analyze_security_rates_both_units_ok(runnable_units):
    tool = _systemd_tool("systemd-analyze")
    for unit_file in runnable_units:
        # --threshold=20: fail above an exposure of 2.0 ("OK" ends at 4.9; both units are at 1.7 today)
        proc = subprocess.run([tool, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit_file)],
                              capture_output=True, text=True, timeout=60)
        if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
            pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr


def test_sysusers_and_tmpfiles_create_the_accounts_and_directories(tmp_path):
    sysusers_tool, tmpfiles_tool = _systemd_tool("systemd-sysusers"), _systemd_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    run([sysusers_tool, f"--root={root}", SYSUSERS])
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    for user, row in sysusers().items():
        assert user in passwd, f"systemd-sysusers did not create {user}"
        assert passwd[user][6] in ("/usr/sbin/nologin", "/sbin/nologin"), passwd[user]
        assert passwd[user][5] == row[4]
    run([tmpfiles_tool, "--create", f"--root={root}", TMPFILES])
    for path, (_, _, mode, user, group, *_) in tmpfiles().items():
        st = (root / path.lstrip("/")).stat()
        assert oct(st.st_mode & 0o7777) == oct(int(mode, 8)), path
        want_uid = 0 if user == "root" else int(passwd[user][2])
        assert st.st_uid == want_uid, f"{path} owned by {st.st_uid}, not {user}"


# -- upgrades: what docs/OPERATIONS.md says an older binary prints on a newer database -------
def test_an_older_binary_refuses_a_newer_database_as_operations_md_says(ca_home):
    db = ca_home / "iomtca.db"
    with sqlite3.connect(db) as conn:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {current + 1}")   # as a newer release would leave it
    proc = run([IOMTCA, "serve", "--dir", ca_home, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                "--console-listen", "127.0.0.1:0"], check=False, timeout=60, text=True)
    line = (f"iomtca: internal error: DatabaseError: database schema version {current + 1} is newer than this "
            f"iomt-ca ({current})")
    assert proc.returncode == 70 and line in proc.stderr, (proc.returncode, proc.stderr)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == current + 1, "the refusal changed the database"
    documented = re.sub(r"version \d+ is newer than this iomt-ca \(\d+\)", "version N is newer than this iomt-ca (M)",
                        line)
    assert documented in OPERATIONS.read_text(), f"docs/OPERATIONS.md does not quote {documented!r}"


# -- (c) the example mosquitto configuration, run by mosquitto ----------------------------------
GW_USER = "iomtca-gateway"
PASSWORDS = {GW_USER: "gw-pass-8812", "pump-0001": "pw-one-4471", "pump-0002": "pw-two-9025"}


def _replace_line(text: str, old: str, new: str) -> str:
    """Replace the one active line `old` (commented lines do not count)."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.strip() == old]
    assert len(hits) == 1, f"{MOSQUITTO_CONF.name}: expected exactly one line {old!r}, found {len(hits)}"
    lines[hits[0]] = new
    return "\n".join(lines) + "\n"


def active_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_mosquitto_example_is_tls_only_and_closed_to_anonymous_clients():
    lines = active_lines(MOSQUITTO_CONF.read_text())
    for setting in ("per_listener_settings false", "allow_anonymous false", "persistence true"):
        assert setting in lines
    assert any(line.startswith("password_file ") for line in lines)
    assert any(line.startswith("acl_file ") for line in lines)
    # every listener block has a certificate, a key and a TLS minimum of 1.2 or newer
    blocks = "\n".join(lines).split("listener ")[1:]
    assert blocks, "no listener"
    for block in blocks:
        settings = block.splitlines()[1:]
        assert any(s.startswith("certfile ") for s in settings) and any(s.startswith("keyfile ") for s in settings)
        assert "tls_version tlsv1.2" in settings or "tls_version tlsv1.3" in settings, block


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """mosquitto from deploy/mosquitto/iomtca.conf and acl.example (unchanged), with temp paths."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto not installed (Debian packages mosquitto, mosquitto-clients)")
    work = tmp_path_factory.mktemp("deploy-mosquitto")
    tls = tlskit.broker_tls(work / "tls")
    passwd = work / "iomtca.passwd"
    passwd.write_text("".join(f"{u}:{p}\n" for u, p in PASSWORDS.items()))
    passwd.chmod(0o600)
    run(["mosquitto_passwd", "-U", passwd])   # plain -> hashed in place, as docs/OPERATIONS.md does it
    acl = work / "iomtca.acl"
    shutil.copyfile(ACL_EXAMPLE, acl)
    port = free_port()
    text = MOSQUITTO_CONF.read_text()
    text = _replace_line(text, "password_file /etc/mosquitto/iomtca.passwd", f"password_file {passwd}")
    text = _replace_line(text, "acl_file /etc/mosquitto/iomtca.acl", f"acl_file {acl}")
    text = _replace_line(text, "listener 8883", f"listener {port} 127.0.0.1")
    text = _replace_line(text, "certfile /etc/mosquitto/certs/broker.pem", f"certfile {tls.server_cert}")
    text = _replace_line(text, "keyfile /etc/mosquitto/certs/broker.key", f"keyfile {tls.server_key}")
    assert [line for line in active_lines(text) if line.startswith("listener ")] == [f"listener {port} 127.0.0.1"]
    persist = work / "persist"
    persist.mkdir()
    # what Debian's /etc/mosquitto/mosquitto.conf supplies around conf.d/iomtca.conf
    text += f"persistence_location {persist}/\nlog_dest stderr\nlog_type all\nconnection_messages true\n"
    if os.geteuid() == 0:
        text += "user root\n"   # as root mosquitto drops to user mosquitto, which cannot read these temp files
    conf = work / "mosquitto.conf"
    conf.write_text(text)
    proc = Proc("mosquitto-deploy", ["mosquitto", "-c", conf], work)
    proc.start()
    try:
        wait_listening(proc, [port])
        yield {"port": port, "ca": tls.ca, "proc": proc}
    finally:
        proc.stop(grace=5)


def conn(broker, user: str | None = None, password: str | None = None, *, tls: bool = True) -> list[str]:
    args = ["-h", "127.0.0.1", "-p", str(broker["port"])]
    if tls:
        args += ["--cafile", str(broker["ca"])]
    if user is not None:
        args += ["-u", user, "-P", password if password is not None else PASSWORDS[user]]
    return args


def publish(args: list[str], topic: str, message: str, *, retain: bool = False) -> subprocess.CompletedProcess:
    """mosquitto_pub over MQTT 5 with QoS 1: an ACL refusal comes back in the PUBACK (reason 135)
    and mosquitto_pub prints it as "Publish 1 failed: Not authorized" (its exit status stays 0)."""
    argv = ["mosquitto_pub", *args, "-V", "mqttv5", "-q", "1", "-t", topic, "-m", message]
    if retain:
        argv.append("-r")
    return run(argv, check=False, timeout=15, text=True)


def refused(proc: subprocess.CompletedProcess) -> bool:
    """CONNACK refused (MQTT 5: 135 "Not authorized" or 134 "Bad user name or password")."""
    said = proc.stderr.lower()
    return proc.returncode != 0 and ("not authorized" in said or "bad user name or password" in said)


def req(device: str, op: str = "cacerts") -> str:
    return f"{ROOT}/dev/{device}/req/{op}"


def test_anonymous_and_unknown_clients_and_plain_tcp_are_refused(broker):
    assert refused(publish(conn(broker), req("pump-0001"), '{"id":"a1"}')), "anonymous client accepted"
    assert refused(publish(conn(broker, "pump-0001", "wrong"), req("pump-0001"), '{"id":"a2"}'))
    assert refused(publish(conn(broker, "pump-0009", "whatever"), req("pump-0009"), '{"id":"a3"}'))
    plain = publish(conn(broker, "pump-0001", tls=False), req("pump-0001"), '{"id":"a4"}')
    assert plain.returncode != 0, "the listener took MQTT without TLS"
    ok = publish(conn(broker, "pump-0001"), req("pump-0001"), '{"id":"a5"}')
    assert ok.returncode == 0 and "failed" not in ok.stderr, ok.stderr


def test_a_device_publishes_its_own_requests_only_and_the_gateway_receives_them(broker):
    granted = run(["mosquitto_sub", *conn(broker, GW_USER), "-d", "-E", "-q", "1", "-t", f"{ROOT}/dev/+/req/+"],
                  timeout=15, text=True)
    assert "Subscribed (mid: 1): 1" in granted.stdout, granted.stdout   # QoS 1 granted, not 128 (refused)
    with Sub(None, f"{ROOT}/dev/+/req/+", conn=conn(broker, GW_USER), wait_s=30) as gateway:
        other = publish(conn(broker, "pump-0001"), req("pump-0002"), '{"id":"spoof"}')
        assert "Not authorized" in other.stderr, other.stderr
        own = publish(conn(broker, "pump-0001"), req("pump-0001"), '{"id":"r1"}')
        assert own.returncode == 0 and "failed" not in own.stderr, own.stderr
        gateway.wait_for(lambda m: m.topic == req("pump-0001"), 10, "pump-0001's own request")
        # one broker thread: the refused publish was handled before the allowed one arrived
        assert [m.topic for m in gateway.messages] == [req("pump-0001")], gateway.messages


def test_gateway_answers_reach_only_their_device_and_devices_read_but_not_write_pki(broker):
    resp = f"{ROOT}/dev/+/resp/+"
    with Sub(None, resp, conn=conn(broker, "pump-0001"), wait_s=30) as one, \
            Sub(None, resp, conn=conn(broker, "pump-0002"), wait_s=30) as two:
        assert publish(conn(broker, GW_USER), f"{ROOT}/dev/pump-0001/resp/cacerts", '{"id":"r1"}').returncode == 0
        assert publish(conn(broker, GW_USER), f"{ROOT}/dev/pump-0002/resp/cacerts", '{"id":"r2"}').returncode == 0
        one.wait_for(lambda m: m.topic == f"{ROOT}/dev/pump-0001/resp/cacerts", 10, "pump-0001's answer")
        two.wait_for(lambda m: m.topic == f"{ROOT}/dev/pump-0002/resp/cacerts", 10, "pump-0002's answer")
        assert {m.topic for m in one.messages} == {f"{ROOT}/dev/pump-0001/resp/cacerts"}, one.messages
        assert {m.topic for m in two.messages} == {f"{ROOT}/dev/pump-0002/resp/cacerts"}, two.messages
    crl = f"{ROOT}/pki/crl"   # retained, gateway to everyone (a stand-in payload: the ACL reads no bytes)
    assert publish(conn(broker, GW_USER), crl, "crl-from-the-gateway", retain=True).returncode == 0
    read = run(["mosquitto_sub", *conn(broker, "pump-0002"), "-q", "1", "-t", crl, "-C", "1", "-W", "5"],
               check=False, timeout=20, text=True)
    assert read.returncode == 0 and "crl-from-the-gateway" in read.stdout, read.stderr
    assert "Not authorized" in publish(conn(broker, "pump-0002"), crl, "forged", retain=True).stderr
