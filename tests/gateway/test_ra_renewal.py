"""The gateway renews its RA certificate over the RA API with its current one and keeps forwarding
enrollments across the switch. Real mosquitto, `iomtca serve` and `iomtca gateway`, with the
`gateway` profile's lifetime set to 12 s: `gateway init` gets a 12 s certificate, which the gateway
renews every 8 s."""
from __future__ import annotations

import base64
import json
import sqlite3
import stat
import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import service_certs
from ca.errors import ConfigError
from ca.keystore import load_private_key
from tests.gateway import gwkit

LIFETIME = 12
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def ra_cert(home) -> x509.Certificate | None:
    return service_certs.read_cert(home / "ra.pem")


def now() -> datetime:
    return datetime.now(timezone.utc)


def test_gateway_keeps_forwarding_across_ra_renewals(stack_factory):
    stack = stack_factory(ca_tables=f'[ca.profiles.gateway]\nlifetime = "{LIFETIME}s"')
    devices = list(stack.devices(*[(f"rar-{i}", "pump") for i in range(40)]).values())
    stack.start()
    gwdir = stack.gateway.home
    first = ra_cert(gwdir)   # from `gateway init`, with the configured lifetime
    assert service_certs.validity(first) <= timedelta(seconds=LIFETIME + 1)
    # enrollments go through while the certificate is renewed at least once more, and after the
    # first short certificate has expired (the CA refuses an expired RA certificate)
    answers, seen = [], {first.serial_number}
    deadline = time.monotonic() + 4 * LIFETIME
    for n, device in enumerate(devices):
        answers.append(device.enroll(f"rr-{n}", timeout=20))
        current = ra_cert(gwdir)
        if current is not None:
            seen.add(current.serial_number)
        if len(seen) >= 2 and now() > first.not_valid_after_utc + timedelta(seconds=1):
            break
        assert time.monotonic() < deadline, f"RA certificates seen: {len(seen)}"
        time.sleep(0.5)
    assert len(seen) >= 2 and now() > first.not_valid_after_utc, "the RA certificate was not renewed in time"
    assert [a["status"] for a in answers] == ["ok"] * len(answers), answers
    # one more after the switch, on the renewed certificate
    last = devices[len(answers)].enroll("rr-last", timeout=20)
    assert last["status"] == "ok", last
    # the new certificate is on file, valid now, for the key beside it (0600, encrypted)
    current = ra_cert(gwdir)
    assert current.serial_number != first.serial_number
    assert current.not_valid_before_utc <= now() <= current.not_valid_after_utc
    assert current.subject == first.subject
    gwkit.openssl_verify(stack.home, gwdir / "ra.pem")
    key_path = gwdir / "private" / "ra.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    passphrase = (gwdir / "private" / "passphrase").read_bytes().strip()
    assert (load_private_key(key_path, passphrase).public_key().public_bytes(*SPKI)
            == current.public_key().public_bytes(*SPKI))
    # renewed by the gateway over the RA API (its actor in the audit log), each certificate on file
    # and linked to the gateway
    db = sqlite3.connect(f"file:{stack.home / 'iomtca.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT actor, serial, detail FROM audit_log WHERE action = 'certificate_issued'").fetchall()
        linked = {int(s, 16) for (s,) in db.execute("SELECT serial FROM gateway_certificates WHERE gateway = 'gw-1'")}
    finally:
        db.close()
    by_gateway = {int(serial, 16) for actor, serial, detail in rows
                  if actor == "gateway:gw-1" and json.loads(detail)["profile"] == "gateway"}
    assert {first.serial_number, current.serial_number} <= by_gateway <= linked
    log = stack.gateway.proc.stderr_text()
    assert log.count("renewed the RA certificate") >= 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "RA renewal refused" not in stack.ca.proc.stderr_text()


def test_a_renewal_answer_for_another_key_is_refused():
    from gateway.ra_identity import check_answer
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")])
    t = now()
    issuer = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other.public_key())
              .serial_number(1).not_valid_before(t).not_valid_after(t + timedelta(days=1))
              .sign(other, hashes.SHA256()))
    der = lambda c: base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()  # noqa: E731
    with pytest.raises(ConfigError, match="not for the key we sent"):
        check_answer({"cert": der(issuer), "chain": [der(issuer)]}, key)
    assert check_answer({"cert": der(issuer), "chain": [der(issuer)]}, other)[0] == issuer


def test_ra_key_readable_by_others_is_refused(ca_home, tmp_path):
    from gateway.ra_identity import RAIdentity
    from tests.rakit import enroll_ra
    cred = enroll_ra(ca_home, tmp_path / "gw")
    identity = RAIdentity.in_home(cred.home, cred.passphrase.encode())
    cred.key.chmod(0o640)
    with pytest.raises(ConfigError, match="ra.key is accessible by group or others"):
        identity.client_context()
    cred.key.chmod(0o600)
    identity.client_context()
    assert identity.certificate == ra_cert(cred.home.home)


async def test_switching_context_lets_requests_in_flight_finish():
    import asyncio
    import ssl

    from aiohttp import web

    from gateway.ra_client import RAClient

    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return web.json_response({"status": "ok", "slow": True})

    async def fast(request):
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/ra/v1/cacerts", slow)
    app.router.add_get("/ra/v1/csrattrs", fast)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with RAClient(f"http://127.0.0.1:{port}", ssl.create_default_context()) as ra:
            old = ra._session
            in_flight = asyncio.create_task(ra.cacerts())
            await asyncio.sleep(0.1)
            await ra.use_context(ssl.create_default_context(), retire_after=0.3)
            assert ra._session is not old and not old.closed
            assert (await ra.csrattrs())["status"] == "ok"      # new requests: the new session
            release.set()
            assert (await in_flight)["slow"] is True            # the one in flight finished on the old
            await asyncio.sleep(0.5)
            assert old.closed                                   # and the old session was closed after
    finally:
        await runner.cleanup()
