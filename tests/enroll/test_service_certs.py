"""The EST server renews its own TLS certificate and reloads it without a restart, once per due
point with several workers; the RA renewal endpoint. Real `iomtca serve` processes with a server
lifetime of 12 s (renewed every 8 s), judged by Python's ssl, openssl s_client and curl; plus the
reload logic itself on a CA directory."""
from __future__ import annotations

import base64
import http.client
import json
import logging
import re
import sqlite3
import ssl
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common import renewal
from ca import service_certs
from ca.authority import Authority
from ca.errors import ConfigError
from ca.keystore import write_atomic
from enroll.config import EnrollConfig
from enroll.tls import ServerContext, server_context

LIFETIME = 12.0
SHORT = f'[ca.profiles.server]\nlifetime = "{int(LIFETIME)}s"'
# a connection held open across renewals sits idle longer than the default idle_timeout (30 s)
KEEP_OPEN = '[enroll.connections]\nidle_timeout = "5m"'
EST = "/.well-known/est"


@pytest.fixture(scope="module")
def one_worker(start_server):
    return start_server("renew1", ca_tables=SHORT, enroll=KEEP_OPEN)


@pytest.fixture(scope="module")
def two_workers(start_server, one_worker):
    # started right after the first: its renewals accumulate while the first one's test runs
    return start_server("renew2", ca_tables=SHORT, enroll="workers = 2\n" + KEEP_OPEN)


def address(server) -> tuple[str, int]:
    url = urlsplit(server.est)
    return url.hostname, url.port


def client_context(server) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca.root))   # checks validity: an expired one fails


def connect(server) -> http.client.HTTPSConnection:
    host, port = address(server)
    conn = http.client.HTTPSConnection(host, port, context=client_context(server), timeout=10)
    conn.connect()
    return conn


def peer(conn: http.client.HTTPSConnection) -> x509.Certificate:
    return x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))


def cacerts(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", f"{EST}/cacerts")
    reply = conn.getresponse()
    reply.read()
    return reply.status


def server_certs_on_file(server) -> list[tuple[int, datetime, datetime]]:
    """(serial, notBefore, notAfter) of every `server` certificate in the database, oldest first."""
    conn = sqlite3.connect(f"file:{server.ca.home / 'iomtca.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT serial, not_before, not_after FROM certificates WHERE profile = 'server'").fetchall()
    finally:
        conn.close()
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return sorted(((int(s, 16), parse(nb), parse(na)) for s, nb, na in rows), key=lambda r: r[1])


def now() -> datetime:
    return datetime.now(timezone.utc)


def test_new_connections_get_each_renewed_certificate_and_open_ones_keep_theirs(one_worker, two_workers):
    server = one_worker   # (two_workers renews meanwhile, for the next test)
    kept = connect(server)
    assert cacerts(kept) == 200
    first = peer(kept)
    # the certificate of `iomtca init` (90 days) was renewed at start to the configured 12 s
    assert service_certs.validity(first) <= timedelta(seconds=LIFETIME + 1), first.not_valid_after_utc
    seen = {first.serial_number}
    deadline = time.monotonic() + 4 * LIFETIME
    while now() <= first.not_valid_after_utc + timedelta(seconds=1) or len(seen) < 3:
        assert time.monotonic() < deadline, f"saw {len(seen)} certificates\n{server.log_tail()}"
        conn = connect(server)   # a handshake that checks the validity period: never expired
        try:
            assert cacerts(conn) == 200
            seen.add(peer(conn).serial_number)
        finally:
            conn.close()
        time.sleep(0.4)
    # after the first certificate's notAfter: a fresh handshake sees a certificate valid now
    conn = connect(server)
    current = peer(conn)
    conn.close()
    assert current.serial_number != first.serial_number
    assert current.not_valid_before_utc <= now() <= current.not_valid_after_utc
    # the connection opened before the renewals still works, with its (now expired) certificate
    assert cacerts(kept) == 200 and peer(kept) == first
    kept.close()
    # an independent judge: openssl checks the chain, the time and the IP SAN
    host, port = address(server)
    out = subprocess.run(["openssl", "s_client", "-connect", f"{host}:{port}", "-CAfile", str(server.ca.root),
                          "-verify_ip", host, "-verify_return_error", "-brief"],
                         input=b"", capture_output=True, timeout=30)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode == 0 and "Verification: OK" in text, text
    # every certificate served is on file, renewed by the server itself
    on_file = {serial for serial, _, _ in server_certs_on_file(server)}
    assert seen | {current.serial_number} <= on_file
    renewals = [r for r in server.ca.audit("certificate_issued") if r["detail"]["profile"] == "server"
                and r["actor"] == service_certs.SERVER_ACTOR]
    assert len(renewals) >= 3
    assert "reloaded the server certificate" in server.log_text()


def test_two_workers_renew_once_per_due_point_and_both_reload(two_workers):
    server = two_workers
    started = time.monotonic()
    while True:
        short = [r for r in server_certs_on_file(server) if r[2] - r[1] < timedelta(minutes=6)]
        if len(short) >= 3:
            break
        assert time.monotonic() - started < 4 * LIFETIME, f"{len(short)} renewals\n{server.log_tail()}"
        time.sleep(0.5)
    # one certificate per due point: each issued about 2/3 of the lifetime after the one before,
    # never two at once (a renewal per worker would be two in the same second)
    issued = [nb + renewal.BACKDATE for _, nb, _ in short]
    gaps = [(b - a).total_seconds() for a, b in zip(issued, issued[1:])]
    assert all(gap >= LIFETIME * 2 / 3 - 1.5 for gap in gaps), gaps
    renewals = [r for r in server.ca.audit("certificate_issued") if r["detail"]["profile"] == "server"
                and r["actor"] == service_certs.SERVER_ACTOR]
    assert {int(r["serial"], 16) for r in renewals} >= {s for s, _, _ in short} and len(renewals) == len(short)
    # both workers swapped renewed certificates in (worker 1 by watching the files)
    log = server.log_text()
    for worker in ("0", "1"):
        reloaded = {int(s, 16) for s in re.findall(
            rf"worker-{worker} enroll\.server worker {worker} reloaded the server certificate serial=([0-9a-f]+)", log)}
        assert reloaded & {s for s, _, _ in short}, f"worker {worker} reloaded nothing\n{server.log_tail()}"
    # and whichever worker accepts, a handshake sees a certificate valid now
    for _ in range(6):
        conn = connect(server)
        try:
            assert cacerts(conn) == 200
            cert = peer(conn)
            assert cert.not_valid_before_utc <= now() <= cert.not_valid_after_utc
        finally:
            conn.close()


# -- POST /ra/v1/renew ----------------------------------------------------------------------------

def gateway_cert_count(server) -> int:
    conn = sqlite3.connect(f"file:{server.ca.home / 'iomtca.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM certificates WHERE profile = 'gateway'").fetchone()[0]
    finally:
        conn.close()


def renew_call(server, csr_der: bytes | None, *, cert=None, key=None, passphrase=None):
    ca = server.ca
    args = ["-X", "POST", "-H", "Content-Type: application/json",
            "--data-binary", f"@{ca.write('renew.json', json.dumps({'csr': base64.b64encode(csr_der or b'').decode()}).encode())}"]
    if cert is not None:
        args += ["--cert", cert, "--key", key] + (["--pass", passphrase] if passphrase else [])
    return server.https("/ra/v1/renew", *args)


def test_ra_renew_endpoint_issues_the_same_names_for_the_new_key(one_worker, tools):
    server = one_worker
    ca = server.ca
    key, csr = ca.make_csr("ra-renewal", subject="/CN=ignored")
    reply = renew_call(server, csr.read_bytes(), cert=ca.ra_cert, key=ca.ra_key, passphrase=ca.ra_passphrase)
    assert reply.status == 200, reply
    body = reply.json()
    assert body["status"] == "ok" and len(body["chain"]) == 1
    new = x509.load_der_x509_certificate(base64.b64decode(body["cert"]))
    old = x509.load_pem_x509_certificates(ca.ra_cert.read_bytes())[0]
    assert new.subject == old.subject and new.serial_number != old.serial_number
    san = lambda c: c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value  # noqa: E731
    assert san(new) == san(old)
    assert body["serial"] == format(new.serial_number, "x")
    assert body["not_after"] == new.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    pem = ca.write("ra-new.pem", new.public_bytes(serialization.Encoding.PEM))
    ca.openssl_verify(pem, "-purpose", "sslclient")
    assert ca.pubkey_of_cert(pem) == ca.pubkey_of_key(key)
    # the new certificate is a working RA credential
    assert server.https("/ra/v1/cacerts", "--cert", pem, "--key", key).status == 200
    row = [r for r in ca.audit("certificate_issued") if r["detail"]["profile"] == "gateway"][-1]
    assert row["actor"] == f"gateway:{ca.ra.name}" and row["detail"]["not_after"].startswith(
        new.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S"))


def test_ra_renew_endpoint_refusals(one_worker):
    server = one_worker
    ca = server.ca
    before = gateway_cert_count(server)
    _, csr = ca.make_csr("ra-refused")
    # without the RA certificate: the RA API's own gate
    reply = renew_call(server, csr.read_bytes())
    assert reply.status == 403 and reply.json()["code"] == "policy_violation", reply
    # a CSR whose signature does not verify: no proof of possession
    der = bytearray(csr.read_bytes())
    der[-3] ^= 0x01
    reply = renew_call(server, bytes(der), cert=ca.ra_cert, key=ca.ra_key, passphrase=ca.ra_passphrase)
    assert reply.status == 400 and reply.json()["code"] == "bad_request", reply
    # a key the gateway profile does not allow
    _, weak = ca.make_csr("ra-weak", key_type="rsa1024")
    reply = renew_call(server, weak.read_bytes(), cert=ca.ra_cert, key=ca.ra_key, passphrase=ca.ra_passphrase)
    assert reply.status == 403 and reply.json()["code"] == "policy_violation", reply
    assert gateway_cert_count(server) == before
    assert len(ca.audit("ra_renewal_refused")) == 2


# -- the reload logic and the key file rule, on a CA directory ------------------------------------

async def test_a_half_written_renewal_keeps_the_current_context_and_is_retried(ca_home, caplog):
    async with await Authority.open(ca_home) as authority:
        ctx = ServerContext(authority.paths, EnrollConfig(), authority.key_passphrase)
        first, serial = ctx.context, ctx.serial
        assert ctx.reload() is None   # nothing changed
        # the renewer wrote a new key and not yet the certificate
        other = ec.generate_private_key(ec.SECP256R1())
        write_atomic(authority.paths.server_key, other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(authority.key_passphrase)), mode=0o600)
        with caplog.at_level(logging.WARNING, logger="enroll.tls"):
            assert ctx.reload() is None and ctx.reload() is None
        assert ctx.context is first and ctx.serial == serial
        assert len([r for r in caplog.records if "does not load yet" in r.message]) == 1   # once, not per poll
        # the renewal completes: the next poll swaps
        assert await service_certs.renew_server_certificate(authority, check_key=True)
        new = ctx.reload()
        assert new is not None and ctx.context is new and ctx.serial != serial
        assert ctx.serial == service_certs.read_cert(authority.paths.server_cert).serial_number
        assert 0.25 <= ctx.poll_interval() <= 5.0


def test_server_key_readable_by_others_is_refused(ca_home):
    from ca.config import CAPaths
    paths = CAPaths(ca_home)
    paths.server_key.chmod(0o644)
    passphrase = (ca_home / "private" / "passphrase").read_bytes().strip()
    with pytest.raises(ConfigError, match="server.key is accessible by group or others"):
        server_context(paths, EnrollConfig(), passphrase)
    paths.server_key.chmod(0o600)
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    assert isinstance(server_context(paths, EnrollConfig(), passphrase), ssl.SSLContext)
