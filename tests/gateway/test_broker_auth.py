"""The gateway against a hospital's mosquitto: TLS only, no anonymous access, passwords, client
certificates and an ACL that confines each device to its own topics (the configuration of
docs/GATEWAY.md, "An authenticated broker"). Also the [gateway] broker settings that are refused.

The broker's TLS certificates are made here with cryptography (a test CA, a server certificate for
127.0.0.1 and localhost); devices on the client-certificate listener use the certificate the CA
issued them over MQTT.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ca.errors import ConfigError
from gateway.config import KEY_PASSPHRASE_ENV, PASSWORD_ENV, load_gateway_config
from gateway.mqtt import BrokerAuth, BrokerRefusedError, MQTTLink
from tests.gateway import gwkit, tlskit
from tests.gateway.gwkit import GATEWAY_READY, IOMTCA, ROOT, Device, Proc, Sub, env, free_port, run

GW_USER = "iomtca-gateway"
GW_PASSWORD = "gw-S3cret-h0spital-7781"   # looked for in logs and command lines
GW_KEY_PASSPHRASE = "gw-key-pass-3391"
DEVICE_PASSWORDS = {"bauth-pump-a": "pw-a-5521", "bauth-pump-b": "pw-b-9034"}


# -- TLS material for the broker -----------------------------------------------------------
@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path   # a CA that did not sign the broker's certificate
    gw_cert: Path    # a client certificate for the gateway (CN = its broker user), issued by `ca`
    gw_key: Path     # its key, encrypted with GW_KEY_PASSPHRASE


def make_tls(work: Path) -> TLSFiles:
    work.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = tlskit.self_signed_ca("Hospital broker test CA")
    key, cert = tlskit.leaf(ca_key, ca_cert, "broker.test", server=True)
    _, other = tlskit.self_signed_ca("Some other CA")
    gw_key, gw_cert = tlskit.leaf(ca_key, ca_cert, GW_USER, server=False)
    files = TLSFiles(work / "broker-ca.pem", work / "server.pem", work / "server.key", work / "other-ca.pem",
                     work / "gw.pem", work / "gw.key")
    files.gw_cert.write_bytes(tlskit.pem_cert(gw_cert))
    files.gw_key.write_bytes(tlskit.pem_key(gw_key, GW_KEY_PASSPHRASE.encode()))
    files.ca.write_bytes(tlskit.pem_cert(ca_cert))
    files.server_cert.write_bytes(tlskit.pem_cert(cert))
    files.server_key.write_bytes(tlskit.pem_key(key))
    files.server_key.chmod(0o600)
    files.other_ca.write_bytes(tlskit.pem_cert(other))
    return files


# -- the hospital's mosquitto --------------------------------------------------------------
ACL = f"""\
# the gateway: the whole contract
user {GW_USER}
topic readwrite {ROOT}/#

# every device (user name = device id, from the password file or its certificate's CN)
pattern readwrite {ROOT}/dev/%u/#
pattern read {ROOT}/pki/#
"""


class HospitalBroker:
    """mosquitto with a password listener and a client-certificate listener, both TLS, no anonymous."""

    def __init__(self, work: Path, tls: TLSFiles, device_ca: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port, self.cert_port = free_port(), free_port()
        passwd = work / "passwd"
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in {GW_USER: GW_PASSWORD, **DEVICE_PASSWORDS}.items()))
        passwd.chmod(0o600)
        run(["mosquitto_passwd", "-U", passwd])          # plain -> hashed, in place
        acl = work / "acl"
        acl.write_text(ACL)
        lines = ["per_listener_settings false", "allow_anonymous false", f"password_file {passwd}",
                 f"acl_file {acl}", "persistence false", "set_tcp_nodelay true", "log_dest stderr",
                 "log_type all", "connection_messages true",
                 f"listener {self.port} 127.0.0.1", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}",
                 "tls_version tlsv1.2",
                 f"listener {self.cert_port} 127.0.0.1", f"certfile {tls.server_cert}",
                 f"keyfile {tls.server_key}", "tls_version tlsv1.2", f"cafile {device_ca}",
                 "require_certificate true", "use_identity_as_username true"]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf = work / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = Proc("mosquitto-auth", ["mosquitto", "-c", self.conf], work)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> None:
        self.proc.start()
        gwkit.wait_listening(self.proc, [self.port, self.cert_port], timeout)

    def stop(self) -> None:
        self.proc.stop(grace=5)

    def log(self) -> str:
        return self.proc.stderr_text()


def client_args(broker: HospitalBroker, user: str | None, password: str | None = None) -> list[str]:
    """mosquitto_pub/sub options for the password listener, as a device configures them."""
    args = ["-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(broker.tls.ca)]
    if user is not None:
        args += ["-u", user, "-P", password if password is not None else DEVICE_PASSWORDS[user]]
    return args


class AuthSub(Sub):
    """gwkit.Sub (background mosquitto_sub -d -v, ready at SUBACK) with connection options."""

    def __init__(self, conn: list[str], *topics: str, wait_s: int = 60) -> None:
        super().__init__(None, *topics, wait_s=wait_s, conn=conn)


class AuthDevice(Device):
    """gwkit.Device publishing and subscribing with its own user name and password over TLS."""

    def __init__(self, device_id: str, broker: HospitalBroker, work: Path, token: str) -> None:
        super().__init__(device_id, broker.port, work, token)
        self.conn = client_args(broker, device_id)

    def send(self, op: str, body) -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        run(["mosquitto_pub", *self.conn, "-q", "1", "-t", gwkit.req(self.id, op), "-m", body], timeout=15)

    def subscribe(self, **kw) -> Sub:
        return AuthSub(self.conn, gwkit.resp(self.id))


def one_message(conn: list[str], topic: str, wait_s: int = 3) -> subprocess.CompletedProcess:
    return run(["mosquitto_sub", *conn, "-q", "1", "-t", topic, "-C", "1", "-W", wait_s, "-N"],
               check=False, timeout=wait_s + 10)


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hospital(make_stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("broker-auth")
    tls = make_tls(work / "tls")
    stack = make_stack(work, gateway=f'broker_ca = "{tls.ca}"\nbroker_username = "{GW_USER}"\n')
    client_cas = work / "tls" / "client-cas.pem"   # the devices' chain, and the issuer of the gateway's certificate
    client_cas.write_bytes((stack.home / "chain.pem").read_bytes() + tls.ca.read_bytes())
    stack.broker = HospitalBroker(work / "broker", tls, device_ca=client_cas)
    # the gateway's password only in its environment, for its start
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PASSWORD_ENV, GW_PASSWORD)
        stack.start("gw-auth")
    yield stack
    stack.close()


# -- against the broker ------------------------------------------------------------------------
def test_device_enrolls_through_an_authenticated_tls_broker_and_sees_only_its_topics(hospital):
    tokens = hospital.register(("bauth-pump-a", "infusion-pump"), ("bauth-pump-b", "infusion-pump"))
    broker: HospitalBroker = hospital.broker
    a = AuthDevice("bauth-pump-a", broker, hospital.work, tokens["bauth-pump-a"])
    # pump-b listens on pump-a's topics and on every device's answers: the ACL gives it nothing
    b_conn = client_args(broker, "bauth-pump-b")
    with AuthSub(b_conn, f"{ROOT}/dev/bauth-pump-a/#", f"{ROOT}/dev/+/resp/#", f"{ROOT}/dev/bauth-pump-b/#") as spy:
        answer = a.enroll("r1")
        assert answer["status"] == "ok", answer
        gwkit.openssl_verify(hospital.home, a.cert)
        # the spy does receive what is its own, so hearing nothing of pump-a's means something
        run(["mosquitto_pub", *b_conn, "-q", "1", "-t", f"{ROOT}/dev/bauth-pump-b/presence", "-m", "online"])
        spy.wait_for(lambda m: m.topic == f"{ROOT}/dev/bauth-pump-b/presence", 10, "pump-b's own presence")
        assert [m.topic for m in spy.messages] == [f"{ROOT}/dev/bauth-pump-b/presence"], spy.messages
    # read access to the PKI publications (the retained CRL the gateway published at start)
    crl = one_message(client_args(broker, "bauth-pump-b"), f"{ROOT}/pki/crl")
    assert crl.returncode == 0 and crl.stdout, crl.stderr

    # the same device by client certificate (use_identity_as_username: CN = device id), no password
    by_cert = ["-h", "127.0.0.1", "-p", str(broker.cert_port), "--cafile", str(broker.tls.ca),
               "--cert", str(a.cert), "--key", str(a.key)]
    with AuthSub(by_cert, gwkit.resp(a.id)) as sub:
        run(["mosquitto_pub", *by_cert, "-q", "1", "-t", gwkit.req(a.id, "cacerts"), "-m", '{"id":"r2"}'],
            timeout=15)
        assert sub.answer("r2")["status"] == "ok"
    assert one_message(by_cert, f"{ROOT}/pki/crl").stdout

    # the gateway's password: in neither its log nor its command line
    gw = hospital.gateway.proc
    cmdline = run(["ps", "-ww", "-o", "args=", "-p", gw.pid]).stdout.decode()
    assert "iomtca gateway" in cmdline and GW_PASSWORD not in cmdline
    assert GW_PASSWORD not in gw.stderr_text() and GW_PASSWORD not in "\n".join(gw.stdout_text)
    assert f"connected to mqtts://127.0.0.1:{broker.port} as gw-auth (user {GW_USER})" in gw.stderr_text()


def test_anonymous_wrong_password_and_no_certificate_are_refused(hospital):
    broker: HospitalBroker = hospital.broker
    for conn in (client_args(broker, None), client_args(broker, "bauth-pump-a", "wrong")):
        proc = one_message(conn, f"{ROOT}/pki/crl")
        assert proc.returncode != 0 and b"not authori" in proc.stderr.lower(), proc.stderr
    no_cert = ["-h", "127.0.0.1", "-p", str(broker.cert_port), "--cafile", str(broker.tls.ca)]
    assert one_message(no_cert, f"{ROOT}/pki/crl").returncode != 0


def test_gateway_with_a_wrong_password_exits_with_a_clear_error(hospital):
    wrong = "not-the-gateway-password-4417"
    gwdir = hospital.work / "gateway-gw-wrong"
    gwkit.setup_gateway(hospital.home, gwdir, "gw-wrong", hospital.ca.est_url)
    argv = [IOMTCA, "gateway", "run", "--dir", gwdir, "--broker", hospital.broker.url,
            "--ca", hospital.ca.est_url, "--client-id", "gw-wrong",
            "--broker-ca", hospital.broker.tls.ca, "--broker-username", GW_USER]   # the flags this time
    proc = Proc("gateway-wrong-password", argv, hospital.logs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PASSWORD_ENV, wrong)
        with pytest.raises(AssertionError, match="exited"):
            proc.start(GATEWAY_READY, timeout=20)
    assert proc.wait(10) == 1
    err = proc.stderr_text()
    assert f"iomtca: error: broker mqtts://127.0.0.1:{hospital.broker.port} refused gw-wrong as user " \
           f"'{GW_USER}'" in err, err
    assert wrong not in err


def test_link_refuses_an_untrusted_broker_certificate_and_anonymous_login(hospital):
    broker: HospitalBroker = hospital.broker

    async def connect(auth: BrokerAuth, url: str = broker.url) -> None:
        link = MQTTLink(url, f"bauth-probe-{time.monotonic_ns()}", [], auth=auth, quiet=True)
        try:
            await link.start(wait=True, timeout=10)
        finally:
            await link.stop()

    with pytest.raises(BrokerRefusedError, match="failed verification"):
        asyncio.run(connect(BrokerAuth(ca_file=broker.tls.other_ca, username=GW_USER, password=GW_PASSWORD)))
    with pytest.raises(BrokerRefusedError, match="anonymous client: Not authorized"):
        asyncio.run(connect(BrokerAuth(ca_file=broker.tls.ca)))
    # localhost is in the certificate too: host name verification passes for it
    asyncio.run(connect(BrokerAuth(ca_file=broker.tls.ca, username=GW_USER, password=GW_PASSWORD),
                        f"mqtts://localhost:{broker.port}"))
    # a client certificate with an encrypted key, on the certificate listener (user = its CN)
    asyncio.run(connect(BrokerAuth(ca_file=broker.tls.ca, cert_file=broker.tls.gw_cert, key_file=broker.tls.gw_key,
                                   key_passphrase=GW_KEY_PASSPHRASE), f"mqtts://127.0.0.1:{broker.cert_port}"))
    logins = [line for line in broker.log().splitlines() if "New client connected" in line and "bauth-probe" in line]
    assert logins[-1].endswith(f"u'{GW_USER}')."), logins[-1]


# -- settings that are refused (no processes) ---------------------------------------------------------
@pytest.fixture(scope="module")
def client_files(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("broker-client")
    ca_key, ca_cert = tlskit.self_signed_ca("client test CA")
    key, cert = tlskit.leaf(ca_key, ca_cert, GW_USER, server=False)
    files = {"ca": work / "ca.pem", "cert": work / "gw.pem", "key": work / "gw.key", "enc": work / "gw-enc.key"}
    files["ca"].write_bytes(tlskit.pem_cert(ca_cert))
    files["cert"].write_bytes(tlskit.pem_cert(cert))
    files["key"].write_bytes(tlskit.pem_key(key))
    files["enc"].write_bytes(tlskit.pem_key(key, b"key-pass-6610"))
    return files


@pytest.mark.parametrize("settings, environ, message", [
    ('broker_ca = "ca.pem"\n', {}, "broker_ca need an mqtts:// broker URL"),
    ('broker = "mqtts://127.0.0.1:8883"\nbroker_username = "gw"\n', {}, "needs a password"),
    ('broker = "mqtts://127.0.0.1:8883"\n', {PASSWORD_ENV: "x"}, "broker_username is not"),
    ('broker = "mqtts://u:p@127.0.0.1:8883"\n', {}, "must not carry credentials"),
    ('broker = "mqtts://127.0.0.1:8883"\nbroker_ca = "missing.pem"\n', {}, "broker TLS files unusable"),
    ('broker_colour = "blue"\n', {}, "unknown setting"),
])
def test_broker_settings_refused(gw_dir, settings, environ, message):
    with pytest.raises(ConfigError, match=message):
        load_gateway_config(gw_dir(settings), environ=environ)


def test_password_file_must_be_private_and_single_source(gw_dir, tmp_path):
    secret = tmp_path / "broker-password"
    secret.write_text("file-pass-2290\n")
    secret.chmod(0o640)
    paths = gw_dir(f'broker = "mqtts://127.0.0.1:8883"\nbroker_username = "gw"\nbroker_password_file = "{secret}"\n')
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_gateway_config(paths, environ={})
    secret.chmod(0o600)
    with pytest.raises(ConfigError, match="keep one"):
        load_gateway_config(paths, environ={PASSWORD_ENV: "env-pass"})
    cfg = load_gateway_config(paths, environ={})
    assert cfg.broker_auth.password == "file-pass-2290" and cfg.broker_auth.username == "gw"
    assert "file-pass-2290" not in repr(cfg) and "file-pass-2290" not in str(cfg)


def test_client_certificate_with_an_encrypted_key(gw_dir, client_files):
    base = (f'broker = "mqtts://127.0.0.1:8883"\nbroker_ca = "{client_files["ca"]}"\n'
            f'broker_cert = "{client_files["cert"]}"\n')
    with pytest.raises(ConfigError, match="go together"):
        load_gateway_config(gw_dir(base), environ={})
    enc = gw_dir(base + f'broker_key = "{client_files["enc"]}"\n')
    with pytest.raises(ConfigError, match=f"is encrypted: set {KEY_PASSPHRASE_ENV}"):
        load_gateway_config(enc, environ={})
    with pytest.raises(ConfigError, match="broker TLS files unusable"):
        load_gateway_config(enc, environ={KEY_PASSPHRASE_ENV: "wrong"})
    cfg = load_gateway_config(enc, environ={KEY_PASSPHRASE_ENV: "key-pass-6610"})
    assert "key-pass-6610" not in repr(cfg)
    plain = gw_dir(base + f'broker_key = "{client_files["key"]}"\n')
    assert load_gateway_config(plain, environ={}).broker_auth.key_file == client_files["key"]
    with pytest.raises(ConfigError, match="is not encrypted"):
        load_gateway_config(plain, environ={KEY_PASSPHRASE_ENV: "key-pass-6610"})
