"""No error from the CA stops the gateway (issue 11): the supervisor restarts a task that dies,
and the PKI follower and sweep ride out a CA that answers 500s and garbage, publishing no
garbage retained CRL or OCSP response, then carry on when the CA recovers.

The misbehaving CA is `FlakyCA`, a TLS endpoint of this test between the gateway and the real
server: while bad it terminates TLS itself with the CA's own server.pem (which the gateway
trusts through root.pem) and answers each request with the next item of a list of 500s, 503s
and malformed bodies; once good it relays raw TCP to the real server (TLS end to end, so the
server sees the gateway's RA certificate).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime
import logging
import re
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from ca.keystore import read_passphrase
from gateway.supervise import Supervisor, backoff
from tests.gateway import gwkit
from tests.gateway.gwkit import ROOT, Gateway, wait_until


# -- the supervisor, in-process ---------------------------------------------------------------
def test_supervisor_restarts_a_dying_task_and_keeps_the_others(caplog):
    """A task that raises twice and then runs is restarted twice, with backoff, while its
    neighbour keeps running untouched; stop() cancels both."""
    async def scenario():
        starts = {"flaky": 0, "steady": 0}
        ticks = []
        running = asyncio.Event()

        async def flaky():
            starts["flaky"] += 1
            if starts["flaky"] <= 2:
                raise RuntimeError(f"boom {starts['flaky']}")
            running.set()
            await asyncio.Event().wait()

        async def steady():
            starts["steady"] += 1
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        sup = Supervisor(initial=0.05, cap=0.2, rand=lambda: 1.0)
        sup.start("steady", steady)
        sup.start("flaky", flaky)
        began = time.monotonic()
        await asyncio.wait_for(running.wait(), 5)
        took = time.monotonic() - began
        assert starts == {"flaky": 3, "steady": 1}
        assert sup.restarts == {"flaky": 2, "steady": 0}
        assert took >= 0.05 + 0.1 - 0.01, f"restarted without backoff ({took:.3f} s)"
        n = len(ticks)
        await asyncio.sleep(0.05)
        assert len(ticks) > n, "the other task stopped running"
        await sup.stop()
        n = len(ticks)
        await asyncio.sleep(0.03)
        assert len(ticks) == n, "a task still runs after stop()"

    with caplog.at_level(logging.INFO, logger="gateway.supervise"):
        asyncio.run(asyncio.wait_for(scenario(), 10))
    died = [r for r in caplog.records if r.levelno == logging.ERROR and "task flaky died" in r.getMessage()]
    assert len(died) == 2 and all(r.exc_info and "boom" in str(r.exc_info[1]) for r in died)


def test_backoff_doubles_to_its_cap_with_jitter():
    assert [backoff(n, 1, 30, rand=lambda: 1.0) for n in (1, 2, 3, 5, 6, 9)] == [1, 2, 4, 16, 30, 30]
    assert backoff(3, 1, 30, rand=lambda: 0.0) == 2   # jitter removes at most half


# -- a CA that misbehaves for a while, against the real gateway -------------------------------
def _foreign_crl(issuer_name: x509.Name) -> bytes:
    """A well-formed CRL that names the issuing CA but is signed by another key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateRevocationListBuilder().issuer_name(issuer_name).last_update(now)
            .next_update(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()).public_bytes(Encoding.DER))


def _forged_ocsp(serial: int) -> bytes:
    """A well-formed, successful OCSP response for `serial`, signed by a key the CA never saw."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "forger")])
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(serial_number: int) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(serial_number).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))

    forger = cert(1)
    builder = (ocsp.OCSPResponseBuilder()
               .add_response(cert=cert(serial), issuer=forger, algorithm=hashes.SHA256(),
                             cert_status=ocsp.OCSPCertStatus.GOOD, this_update=now,
                             next_update=now + datetime.timedelta(hours=1), revocation_time=None, revocation_reason=None)
               .responder_id(ocsp.OCSPResponderEncoding.HASH, forger).certificates([forger]))
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def _answer(status: int, body: bytes | str, ctype: str = "application/json") -> tuple[int, bytes, str]:
    return status, body.encode() if isinstance(body, str) else body, ctype


HTML = _answer(200, "<html><body>maintenance</body></html>", "text/html")
E500 = _answer(500, '{"code": "internal", "message": "boom"}')
E503 = _answer(503, "busy", "text/plain")
EMPTY_CHANGES = _answer(200, '{"last": 0, "changes": []}')
FAKE_SERIAL = "ab12cd"


def bad_answers(real_crl: bytes, issuer: x509.Certificate) -> dict[str, list[tuple[int, bytes, str]]]:
    """What the bad CA answers, per endpoint, in turn (cycled)."""
    forged = _forged_ocsp(int(FAKE_SERIAL, 16))
    page = _answer(200, '{"certificates": [{"serial": "%s"}]}' % FAKE_SERIAL)
    bogus_change = ('{"last": 7, "changes": [{"id": 7, "serial": "%s", "device_id": null, "status": "revoked",'
                    ' "reason": "keyCompromise", "at": null}]}' % FAKE_SERIAL)
    return {
        "crl": [E500, _answer(200, real_crl[: len(real_crl) // 2], "application/pkix-crl"),
                _answer(200, _foreign_crl(issuer.subject), "application/pkix-crl"), E503, HTML],
        # an empty (valid) answer between the bad ones: the follower's backoff starts again each time
        "status": [E500, EMPTY_CHANGES, HTML, EMPTY_CHANGES, _answer(200, bogus_change), EMPTY_CHANGES,
                   _answer(200, '{"changes": "nope", "last": 1}'), EMPTY_CHANGES,
                   _answer(200, '{"last": 3}'), EMPTY_CHANGES, _answer(200, '[1, 2]'), EMPTY_CHANGES],
        # every other page names a serial the CA never issued: its OCSP responses are asked for
        "certificates": [page, E500, page, HTML, page, _answer(200, '{"certs": []}'), page,
                         _answer(200, '{"certificates": [{"serial": "zz-top"}]}')],
        "ocsp-batch": [_answer(200, '{"responses": {"%s": "%s"}}' % (FAKE_SERIAL, base64.b64encode(b"\x30\x03garbage").decode())),
                       _answer(200, '{"responses": {"%s": "%s"}}' % (FAKE_SERIAL, base64.b64encode(forged).decode())),
                       _answer(200, '{"responses": []}'), E500],
        "ocsp": [_answer(200, b"\x30\x82\x01", "application/ocsp-response"),
                 _answer(200, forged, "application/ocsp-response"), E500],
        "other": [E500],
    }


def _kind(method: str, path: str) -> str:
    path = path.split("?", 1)[0]
    if path == "/crl":
        return "crl"
    if path == "/ra/v1/status-changes":
        return "status"
    if path == "/ra/v1/certificates":
        return "certificates"
    if path == "/ra/v1/ocsp" and method == "POST":
        return "ocsp-batch"
    if path.startswith("/ra/v1/ocsp/"):
        return "ocsp"
    return "other"


class FlakyCA:
    """https://127.0.0.1:port: garbage while `bad`, a raw TCP relay to the real server otherwise."""

    def __init__(self, home: Path, upstream_port: int, answers: dict) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.answers = answers
        self.served: collections.Counter[str] = collections.Counter()
        self.bad = False
        self._lock = threading.Lock()
        self._relayed: set[socket.socket] = set()
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(home / "server.pem", home / "private" / "server.key",
                                  password=read_passphrase(home / "private" / "passphrase"))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def go_bad(self) -> None:
        with self._lock:
            self.bad = True
            relayed, self._relayed = list(self._relayed), set()
        for sock in relayed:   # connections kept alive to the real server are cut: the next requests meet the bad CA
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def go_good(self) -> None:
        with self._lock:
            self.bad = False

    def close(self) -> None:
        self._closed.set()
        self.go_bad()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            target = self._garbage if self.bad else self._relay
            threading.Thread(target=target, args=(conn,), daemon=True).start()

    # bad: terminate TLS, read one request, answer the next bad answer, close
    def _garbage(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            with self._ctx.wrap_socket(conn, server_side=True) as tls:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, body = data.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                               if k.strip().lower() == "content-length"), 0)
                while len(body) < length:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                kind = _kind(method, path)
                with self._lock:
                    choices = self.answers[kind]
                    status, payload, ctype = choices[self.served[kind] % len(choices)]
                    self.served[kind] += 1
                tls.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                            f"Connection: close\r\n\r\n".encode() + payload)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            conn.close()

    # good: relay bytes both ways until either side closes
    def _relay(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        with self._lock:
            self._relayed.update((conn, up))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
        pump(conn, up)
        with self._lock:
            self._relayed.difference_update((conn, up))
        conn.close()
        up.close()


def crl_verifies(home: Path, der: bytes, work: Path) -> bool:
    """`openssl crl -CAfile chain.pem` as the judge: the CRL parses and its signature verifies."""
    path = work / f"crl-{time.monotonic_ns()}.der"
    path.write_bytes(der)
    proc = gwkit.run(["openssl", "crl", "-inform", "DER", "-in", path, "-CAfile", home / "chain.pem", "-noout"],
                     check=False)
    return proc.returncode == 0 and b"verify OK" in proc.stdout + proc.stderr


@pytest.fixture
def flaky_stack(stack_factory):
    # retry_every and sweep_every at their smallest (1 s) so a bad spell of a few seconds covers
    # every kind of bad answer and recovery is quick
    stack = stack_factory(gateway='retry_every = "1s"\nsweep_every = "1s"')
    stack.broker.start()
    stack.ca.start()
    with urllib.request.urlopen(f"{stack.ca.http_url}/crl", timeout=10) as resp:
        real_crl = resp.read()
    assert crl_verifies(stack.home, real_crl, stack.work), "the real server's CRL does not verify?"
    issuer = x509.load_pem_x509_certificate((stack.home / "issuing.pem").read_bytes())
    flaky = FlakyCA(stack.home, stack.ca.est_port, bad_answers(real_crl, issuer))
    gw = Gateway(stack.home, stack.broker, flaky.url, "gw-flaky", stack.logs, enroll_url=stack.ca.est_url)
    stack.gateways.append(gw)
    yield stack, flaky, gw
    flaky.close()


def test_gateway_rides_out_a_ca_answering_500s_and_garbage(flaky_stack):
    """The gateway starts while the CA gives 500s and garbage (truncated or foreign-signed CRLs,
    forged or truncated OCSP responses, JSON of the wrong shape) on every PKI endpoint: it stays
    up (same pid, no task restarted), logs each failure, publishes nothing of it, and once the CA
    recovers it publishes a valid CRL, enrolls a device over MQTT and follows a revocation."""
    stack, flaky, gw = flaky_stack
    crl_topic, fake_ocsp_topic = f"{ROOT}/pki/crl", f"{ROOT}/pki/ocsp/{FAKE_SERIAL}"
    flaky.go_bad()
    gw.start()
    pid = gw.proc.pid

    # -- the bad spell: until every endpoint has given each kind of bad answer at least once
    need = {"crl": 5, "status": 12, "certificates": 8, "ocsp-batch": 4, "ocsp": 2}
    try:
        wait_until(lambda: all(flaky.served[k] >= n for k, n in need.items()), 30, interval=0.1,
                   what=f"bad answers {need}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; served so far: {dict(flaky.served)}") from None
    assert gw.proc.alive and gw.proc.pid == pid, "the gateway stopped during the bad spell"
    assert gwkit.retained(stack.port, crl_topic, 1) is None, "a garbage CRL was published"
    assert gwkit.retained(stack.port, fake_ocsp_topic, 1) is None, "a garbage or forged OCSP response was published"
    log = gw.proc.stderr_text()
    for expected in ("CRL publication failed", "CRL does not parse", "CRL signature does not verify",
                     "sweep failed", "skipping the status-change history failed", "following status changes",
                     "OCSP response not published", "not signed by the issuing CA"):
        assert expected in log, f"no {expected!r} in the gateway's log"

    # -- recovery
    flaky.go_good()
    crl = wait_until(lambda: gwkit.retained(stack.port, crl_topic, 1), 15, what="a retained CRL after recovery")
    assert crl_verifies(stack.home, crl, stack.work)
    dev = stack.devices(("sv-flaky-1", "pumpx"))["sv-flaky-1"]
    answer = dev.enroll("sv-1", timeout=30)
    assert answer["status"] == "ok", answer
    gwkit.openssl_verify(stack.home, dev.cert)
    serial = gwkit.cert_serial(answer)
    # the follower is back too: a revocation reaches the retained CRL (which still verifies)
    gwkit.iomtca(stack.home, "cert", "revoke", serial, "--reason", "keyCompromise")

    def revoked_crl():
        der = gwkit.retained(stack.port, crl_topic, 1)
        return der if der and serial in gwkit.crl_serials(der, stack.work) else None

    crl = wait_until(revoked_crl, 20, interval=0.2, what=f"a retained CRL listing {serial}")
    assert crl_verifies(stack.home, crl, stack.work)

    def revoked_ocsp():
        der = gwkit.retained(stack.port, f"{ROOT}/pki/ocsp/{serial}", 1)
        return der if der and gwkit.ocsp_status(der) == "revoked" else None

    gwkit.openssl_ocsp(stack.home, wait_until(revoked_ocsp, 10, interval=0.2, what="a revoked OCSP response"),
                       dev.cert, stack.work)
    assert gwkit.retained(stack.port, fake_ocsp_topic, 1) is None
    assert gw.proc.alive and gw.proc.pid == pid and gw.proc.starts == 1
    assert not re.search(r"task \S+ (died|returned|was cancelled)", gw.proc.stderr_text()), \
        "a supervised task had to be restarted"
