"""IEEE 802.1AR IDevID onboarding against the real server: a device's first enrollment over EST
with its manufacturer-installed certificate as TLS client certificate (curl), judged by openssl;
manufacturer CRLs from files and from a URL (a tiny aiohttp server on 127.0.0.1 in this test).

The manufacturers' PKIs (root, intermediate issuing IDevIDs with a subject serialNumber, CRLs)
are made here with cryptography; the devices are registered with `iomtca device add`.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.enroll.conftest import IOMTCA, run
from tests.procs import wait_until

# IEEE 802.1AR 8.5: an IDevID that never expires carries this notAfter
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
RELOAD_TIMEOUT = 20.0   # the server polls CRL files every 2 s


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _name(cn: str, org: str, serial: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


@dataclass
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _cert(subject: x509.Name, key, issuer: Issuer | None, *, ca: bool, not_after: datetime,
          extensions: tuple[x509.ExtensionType, ...] = ()) -> x509.Certificate:
    issuer_name, issuer_key = (issuer.cert.subject, issuer.key) if issuer else (subject, key)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(_now() - timedelta(days=1)).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca and issuer else None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                      crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class Maker:
    """A manufacturer's PKI: a root, intermediates that issue IDevIDs, and their CRLs."""

    def __init__(self, name: str) -> None:
        self.name = name
        root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = Issuer(_cert(_name(f"{name} Root CA", name), root_key, None, ca=True,
                                 not_after=_now() + timedelta(days=3650)), root_key)
        self.intermediates: list[Issuer] = []
        self.intermediate = self.add_intermediate("IDevID CA")

    def add_intermediate(self, label: str, *, not_after: datetime | None = None) -> Issuer:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = Issuer(_cert(_name(f"{self.name} {label}", self.name), key, self.root, ca=True,
                              not_after=not_after or _now() + timedelta(days=3650)), key)
        self.intermediates.append(issuer)
        return issuer

    def trust_pem(self) -> bytes:
        return b"".join(c.cert.public_bytes(serialization.Encoding.PEM) for c in (self.root, *self.intermediates))

    def idevid(self, serial: str, work: Path, issuer: Issuer | None = None, *,
               extensions: tuple[x509.ExtensionType, ...] = ()) -> SimpleNamespace:
        """An IDevID (leaf + key files for curl) with subject serialNumber `serial`."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(_name(f"{self.name} device", self.name, serial), key, issuer or self.intermediate, ca=False,
                     not_after=NO_EXPIRY, extensions=extensions)
        stem = f"idevid-{self.name}-{serial}-{cert.serial_number:x}"
        cert_path, key_path = work / f"{stem}.pem", work / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return SimpleNamespace(cert=cert, cert_path=cert_path, key=key_path, serial=serial)

    def crl_object(self, revoked: list, number: int, *, next_update: datetime | None = None,
                   this_update: datetime | None = None, by: Issuer | None = None, signer: Issuer | None = None,
                   extensions: tuple[tuple[x509.ExtensionType, bool], ...] = ()) -> x509.CertificateRevocationList:
        """A CRL of `by` (the first intermediate by default) listing `revoked` (IDevIDs or CA
        certificates); signed by `signer` when given, else by `by`."""
        by = by or self.intermediate
        this_update = this_update or _now() - timedelta(minutes=1)
        b = (x509.CertificateRevocationListBuilder().issuer_name(by.cert.subject)
             .last_update(this_update).next_update(next_update or _now() + timedelta(days=7))
             .add_extension(x509.CRLNumber(number), critical=False))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        for item in revoked:
            serial = getattr(item, "cert", item).serial_number
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                          .revocation_date(this_update).build())
        return b.sign((signer or by).key, hashes.SHA256())

    def crl(self, revoked: list, number: int, *, der: bool = False, delta: bool = False, **kw) -> bytes:
        extensions = ((x509.DeltaCRLIndicator(number - 1), True),) if delta else ()
        crl = self.crl_object(revoked, number, extensions=extensions, **kw)
        return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def idevid_tables(*entries: dict) -> str:
    """[[enroll.idevid]] tables for config.toml (a JSON string or list of strings is TOML too)."""
    return "\n".join("[[enroll.idevid]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in e.items())
                     for e in entries)


def write_atomically(path: Path, data: bytes) -> None:
    """As an operator's `install`/`mv` would: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def register(ca, device_id: str, *, manufacturer: str | None, serial: str) -> None:
    args = ["device", "add", device_id, "--model", "infusion-pump", "--owner", "icu", "--serial-number", serial,
            "--json"]
    if manufacturer is not None:
        args += ["--manufacturer", manufacturer]
    info = json.loads(ca.iomtca(*args).stdout)
    assert info["device_id"] == device_id


def onboard(srv, idevid, tools, *, name: str = "device"):
    """simpleenroll with no Basic credentials, the IDevID as TLS client certificate (the answer
    carries the key of the CSR as `device_key`)."""
    key, csr = srv.ca.make_csr(name)
    reply = srv.est_post("simpleenroll", tools.b64_body(csr.read_bytes()), cert=idevid, allow_5xx=(503,))
    reply.device_key = key
    return reply


def device_certs(ca, device_id: str) -> list[dict]:
    return [c for c in ca.certificates() if c.get("device_id") == device_id]


def issued_to(srv, reply, device_id: str):
    """The certificate of a 200 answer, checked by openssl against the CA; it names `device_id`."""
    assert reply.status == 200, reply
    got = srv.device_cert(device_id, reply.device_key, reply)
    srv.ca.openssl_verify(got.cert_path)
    names = got.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert names and names[0].value == device_id, got.cert.subject
    return got


def refused(reply, status: int, *words: str) -> str:
    assert reply.status == status, reply
    text = reply.text
    for word in words:
        assert word in text, text
    return text


def log_since(srv, mark: int) -> str:
    return srv.log_text()[mark:]


def wait_for_log(srv, mark: int, needle: str, timeout: float = RELOAD_TIMEOUT) -> str:
    wait_until(lambda: needle in log_since(srv, mark), timeout, interval=0.1, what=f"{needle!r} in the server log")
    return log_since(srv, mark)


# -- one server: maker A with a CRL file, B without CRL, C with an expired one, G with three -------

@pytest.fixture(scope="module")
def makers():
    return SimpleNamespace(a=Maker("maker-a"), b=Maker("maker-b"), c=Maker("maker-c"), g=Maker("maker-g"))


@pytest.fixture(scope="module")
def env(start_server, makers, tmp_path_factory):
    srv = start_server("idevid")
    srv.stop()   # the files below go into the CA directory before the configured server starts
    ca, work = srv.ca, srv.ca.work
    ids = SimpleNamespace(**{k: makers.a.idevid(f"SN-{k.upper()}", work) for k in
                             ("a1", "a2", "a3", "a4x", "a5", "a6", "a7")})
    ids.b5 = makers.b.idevid("SN-A5", work)     # maker B's IDevID with the serial of maker A's device
    ids.c1 = makers.c.idevid("SN-C1", work)
    g, line2 = makers.g, makers.g.add_intermediate("Line 2 CA")
    ids.g1, ids.g2 = g.idevid("SN-G1", work), g.idevid("SN-G2", work, line2)
    lapsed = makers.b.add_intermediate("Lapsed CA", not_after=_now() - timedelta(hours=1))
    ids.b8 = makers.b.idevid("SN-B8", work, lapsed)   # the IDevID is current, its CA is not (no CRL for B)
    for m in (makers.a, makers.b, makers.c, makers.g):
        (ca.home / f"{m.name}.pem").write_bytes(m.trust_pem())
    (ca.home / "maker-g-1.crl").write_bytes(g.crl([], 1))
    (ca.home / "maker-g-2.crl").write_bytes(g.crl([], 1, by=line2, der=True))
    (ca.home / "maker-g-root.crl").write_bytes(g.crl([g.intermediate.cert], 1, by=g.root))   # line 1 revoked
    (ca.home / "maker-a.crl").write_bytes(makers.a.crl([ids.a6], 1))
    expired = makers.c.crl([], 1, this_update=_now() - timedelta(days=8), next_update=_now() - timedelta(days=1))
    (ca.home / "maker-c.crl").write_bytes(expired)
    ca.configure(enroll=idevid_tables(
        {"manufacturer": "maker-a", "file": "maker-a.pem", "crl": "maker-a.crl"},
        {"manufacturer": "maker-b", "file": "maker-b.pem"},
        {"manufacturer": "maker-c", "file": "maker-c.pem", "crl": "maker-c.crl"},
        {"manufacturer": "maker-g", "file": "maker-g.pem",
         "crl": ["maker-g-1.crl", "maker-g-2.crl", "maker-g-root.crl"]}))
    srv.start()
    for device_id, manufacturer, serial in (
            ("pump-a1", "maker-a", "SN-A1"), ("pump-a2", None, "SN-A2"), ("pump-a3", "maker-b", "SN-A3"),
            ("pump-a4", "maker-a", "SN-A4"), ("pump-a5", "maker-a", "SN-A5"), ("pump-b5", "maker-b", "SN-A5"),
            ("pump-a6", "maker-a", "SN-A6"), ("pump-a7", "maker-a", "SN-A7"), ("pump-c1", "maker-c", "SN-C1"),
            ("pump-g1", "maker-g", "SN-G1"), ("pump-g2", "maker-g", "SN-G2"), ("pump-b8", "maker-b", "SN-B8")):
        register(ca, device_id, manufacturer=manufacturer, serial=serial)
    return SimpleNamespace(srv=srv, ca=ca, ids=ids, makers=makers)


def test_matching_manufacturer_and_serial_onboards(env, tools):
    reply = onboard(env.srv, env.ids.a1, tools, name="pump-a1")
    got = issued_to(env.srv, reply, "pump-a1")
    issued = env.ca.audit("certificate_issued", "pump-a1")
    assert [r["actor"] for r in issued] == ["device:pump-a1:idevid"], issued
    assert [c["serial"] for c in device_certs(env.ca, "pump-a1")] == [got.serial_hex]


def test_an_idevid_from_a_manufacturer_ca_outside_its_validity_cannot_onboard(env, tools):
    """TLS leaves time checks to us (tls.py): the issuing manufacturer CA's validity is checked too."""
    with env.ca.no_new_certificates():
        reply = onboard(env.srv, env.ids.b8, tools, name="pump-b8")
    refused(reply, 401, "maker-b CA certificate", "outside its validity")


def test_a_device_registered_without_manufacturer_cannot_onboard(env, tools):
    with env.ca.no_new_certificates():
        reply = onboard(env.srv, env.ids.a2, tools)
    refused(reply, 401, "no registered device of maker-a", "SN-A2")
    assert (reply.header("www-authenticate") or "").startswith("Basic"), reply.raw_headers


def test_a_device_of_another_manufacturer_cannot_onboard(env, tools):
    with env.ca.no_new_certificates():
        reply = onboard(env.srv, env.ids.a3, tools)   # pump-a3 is registered as maker-b's
    refused(reply, 401, "no registered device of maker-a")
    assert device_certs(env.ca, "pump-a3") == []


def test_a_serial_number_mismatch_cannot_onboard(env, tools):
    with env.ca.no_new_certificates():
        reply = onboard(env.srv, env.ids.a4x, tools)  # pump-a4 is SN-A4, the IDevID says SN-A4X
    refused(reply, 401, "SN-A4X")
    assert device_certs(env.ca, "pump-a4") == []


def test_each_makers_idevid_gets_its_own_device_of_a_shared_serial(env, tools):
    """pump-a5 (maker-a) and pump-b5 (maker-b) share SN-A5: maker B's IDevID never gets pump-a5."""
    reply = onboard(env.srv, env.ids.b5, tools, name="pump-b5")
    issued_to(env.srv, reply, "pump-b5")
    assert device_certs(env.ca, "pump-a5") == []
    reply = onboard(env.srv, env.ids.a5, tools, name="pump-a5")
    issued_to(env.srv, reply, "pump-a5")
    assert len(device_certs(env.ca, "pump-b5")) == 1


def test_an_idevid_listed_in_the_makers_crl_is_refused(env, tools):
    with env.ca.no_new_certificates():
        reply = onboard(env.srv, env.ids.a6, tools)
    text = refused(reply, 401, "revoked by its manufacturer")
    assert "maker-a.crl" not in text and f"{env.ids.a6.cert.serial_number:x}" not in text   # nothing more than needed
    assert reply.header("x-error-code") == "unauthorized"


def test_a_crl_file_updated_to_list_a_serial_takes_effect_without_restart(env, tools):
    reply = onboard(env.srv, env.ids.a7, tools, name="pump-a7")
    issued_to(env.srv, reply, "pump-a7")
    mark = len(env.srv.log_text())
    write_atomically(env.ca.home / "maker-a.crl", env.makers.a.crl([env.ids.a6, env.ids.a7], 2, der=True))
    wait_for_log(env.srv, mark, "loaded: number 2, 2 revoked")
    with env.ca.no_new_certificates():
        reply = onboard(env.srv, env.ids.a7, tools)
    refused(reply, 401, "revoked by its manufacturer")


def test_a_crl_swapped_in_with_a_bad_signature_or_older_is_refused_and_the_last_good_kept(env, tools):
    """After test_a_crl_file_updated...: CRL number 2 (listing A6 and A7) is in force."""
    rogue = Issuer(env.makers.a.intermediate.cert, ec.generate_private_key(ec.SECP256R1()))
    for data, complaint in ((env.makers.a.crl([], 3, signer=rogue), "signature does not verify"),
                            (env.makers.a.crl([], 1), "older than the CRL in force")):
        mark = len(env.srv.log_text())
        write_atomically(env.ca.home / "maker-a.crl", data)
        log = wait_for_log(env.srv, mark, complaint)
        assert "WARNING" in log and "keeping the CRL in force (number 2" in log, log
        with env.ca.no_new_certificates():
            reply = onboard(env.srv, env.ids.a7, tools)
        refused(reply, 401, "revoked by its manufacturer")
    mark = len(env.srv.log_text())
    write_atomically(env.ca.home / "maker-a.crl", env.makers.a.crl([env.ids.a6], 4))
    wait_for_log(env.srv, mark, "loaded: number 4, 1 revoked")
    reply = onboard(env.srv, env.ids.a7, tools, name="pump-a7")   # no longer listed: accepted again
    issued_to(env.srv, reply, "pump-a7")


def test_an_expired_crl_fails_closed_logged_once_and_a_new_one_reopens(env, tools):
    for _ in range(3):
        with env.ca.no_new_certificates():
            reply = onboard(env.srv, env.ids.c1, tools)
        refused(reply, 503, "IDevID onboarding from maker-c is suspended", "out of date")
        assert reply.header("retry-after") == "60" and reply.header("x-error-code") == "unavailable"
    warnings = [line for line in env.srv.log_text().splitlines()
                if "WARNING" in line and "from maker-c" in line and "out of date" in line]
    assert len(warnings) == 1, warnings   # once per change of state, not per request
    mark = len(env.srv.log_text())
    write_atomically(env.ca.home / "maker-c.crl", env.makers.c.crl([], 2))
    log = wait_for_log(env.srv, mark, "is current again")
    assert "IDevID CRL of maker-c from maker-c.crl loaded: number 2" in log
    reply = onboard(env.srv, env.ids.c1, tools, name="pump-c1")
    issued_to(env.srv, reply, "pump-c1")


def test_an_idevid_of_a_maker_without_crl_is_not_checked_against_another_makers(env, tools):
    """maker-b has no CRL: its IDevIDs pass, maker-a's CRL (listing A6) has no say over them."""
    b6 = env.makers.b.idevid("SN-B6", env.ca.work)
    register(env.ca, "pump-b6", manufacturer="maker-b", serial="SN-B6")
    reply = onboard(env.srv, b6, tools, name="pump-b6")
    issued_to(env.srv, reply, "pump-b6")


def test_a_root_crl_listing_an_intermediate_refuses_every_idevid_under_it(env, tools):
    """maker-g: two intermediates, a CRL each and the root's CRL, which lists the first one."""
    with env.ca.no_new_certificates():
        reply = onboard(env.srv, env.ids.g1, tools)
    refused(reply, 401, "the manufacturer CA that issued this IDevID certificate has been revoked")
    reply = onboard(env.srv, env.ids.g2, tools, name="pump-g2")   # under the other intermediate
    issued_to(env.srv, reply, "pump-g2")


# -- crl_url: fetched at start, again before nextUpdate, the last good kept until it expires -------

class CRLServer:
    """A tiny aiohttp server on 127.0.0.1 in a thread, serving one CRL or an error status."""

    def __init__(self) -> None:
        self.body, self.status, self.requests = b"", 200, 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "CRLServer":
        self._thread.start()
        assert self._ready.wait(10), "the CRL server did not start"
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/maker-d.crl", self._handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable\n")
        return web.Response(body=self.body, content_type="application/pkix-crl")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/maker-d.crl"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def crl_server():
    server = CRLServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def url_env(start_server, crl_server):
    srv = start_server("idevid-url")
    srv.stop()
    ca, work = srv.ca, srv.ca.work
    d, e = Maker("maker-d"), Maker("maker-e")
    ids = SimpleNamespace(**{k: d.idevid(f"SN-{k.upper()}", work) for k in ("d1", "d2", "d3", "d4")})
    ids.e1 = e.idevid("SN-E1", work)
    for m in (d, e):
        (ca.home / f"{m.name}.pem").write_bytes(m.trust_pem())
    crl_server.body = d.crl([ids.d1], 1, der=True, next_update=_now() + timedelta(seconds=12))
    ca.configure(enroll=idevid_tables(
        {"manufacturer": "maker-d", "file": "maker-d.pem", "crl_url": crl_server.url},
        {"manufacturer": "maker-e", "file": "maker-e.pem", "crl_url": f"http://127.0.0.1:{_closed_port()}/maker-e.crl"}))
    srv.start()   # fetches maker-d's CRL before it says it is listening
    for k in ("d1", "d2", "d3", "d4"):
        register(ca, f"pump-{k}", manufacturer="maker-d", serial=f"SN-{k.upper()}")
    register(ca, "pump-e1", manufacturer="maker-e", serial="SN-E1")
    return SimpleNamespace(srv=srv, ca=ca, ids=ids, d=d)


def test_a_crl_url_is_fetched_at_start_refreshed_and_kept_until_it_expires(url_env, crl_server, tools):
    srv, ids = url_env.srv, url_env.ids
    assert crl_server.requests >= 1   # fetched at start, before the listening line
    refused(onboard(srv, ids.d1, tools), 401, "revoked by its manufacturer")
    issued_to(srv, onboard(srv, ids.d2, tools, name="pump-d2"), "pump-d2")

    # the manufacturer publishes number 2 (listing D2 too): fetched again before number 1 expires
    mark = len(srv.log_text())
    crl_server.body = url_env.d.crl([ids.d1, ids.d2], 2, next_update=_now() + timedelta(seconds=12))
    wait_for_log(srv, mark, "loaded: number 2, 2 revoked")
    refused(onboard(srv, ids.d2, tools), 401, "revoked by its manufacturer")

    # the CRL server fails: the last good CRL stays in force until its nextUpdate...
    mark = len(srv.log_text())
    crl_server.status = 503
    log = wait_for_log(srv, mark, "the server answered HTTP 503")
    assert "keeping the CRL in force (number 2" in log, log
    issued_to(srv, onboard(srv, ids.d3, tools, name="pump-d3"), "pump-d3")
    refused(onboard(srv, ids.d2, tools), 401, "revoked by its manufacturer")

    # ...and then IDevID logins from maker-d fail closed, said once in the log
    wait_for_log(srv, mark, "is out of date")
    for _ in range(2):
        reply = onboard(srv, ids.d4, tools)
        refused(reply, 503, "IDevID onboarding from maker-d is suspended")
    stale = [line for line in log_since(srv, mark).splitlines() if "WARNING" in line and "out of date" in line]
    assert len(stale) == 1, stale
    assert device_certs(url_env.ca, "pump-d4") == []


def test_a_crl_url_never_fetched_refuses_its_makers_idevids(url_env, tools):
    with url_env.ca.no_new_certificates():
        reply = onboard(url_env.srv, url_env.ids.e1, tools)
    refused(reply, 503, "IDevID onboarding from maker-e is not available yet")
    log = url_env.srv.log_text()
    assert "IDevID CRL of maker-e from http://127.0.0.1:" in log and "refused until one loads" in log, log


# -- settings that cannot do what they say stop `iomtca serve` before it listens -------------------

@pytest.fixture(scope="module")
def bare_ca(tmp_path_factory, makers):
    home = tmp_path_factory.mktemp("idevid-config") / "ca"
    run([IOMTCA, "init", "--dir", home])
    (home / "maker-a.pem").write_bytes(makers.a.trust_pem())
    base = (home / "config.toml").read_text()

    def configure(setting: str) -> None:
        """maker-a's table with one more line, `setting`."""
        table = idevid_tables({"manufacturer": "maker-a", "file": "maker-a.pem"})
        (home / "config.toml").write_text(f"{base}\n[enroll]\n\n{table}{setting}\n")
    return SimpleNamespace(home=home, configure=configure)


@pytest.mark.parametrize("setting, crl, complaint", [
    ('crl = "missing.crl"', None, "crl 'missing.crl': No such file or directory"),
    ('crl = "maker-a.crl"', b"not a CRL\n", "not a CRL in PEM or DER"),
    ('crl = "maker-a.crl"', "rogue", "its signature does not verify"),
    ('crl = "maker-a.crl"', "other-maker", "none of the manufacturer's CA certificates"),
    ('crl = "maker-a.crl"', "delta", "delta CRL"),
    ('crl_url = "ftp://127.0.0.1/maker-a.crl"', None, "must be an http:// or https:// URL"),
    ('crl_url = "http://user:secret@127.0.0.1/maker-a.crl"', None, "must not carry credentials"),
    ('crl = 7', None, "crl must be a string or a list of strings"),
    ('crl_uri = "http://127.0.0.1/maker-a.crl"', None, "unknown setting(s) in [[enroll.idevid]] maker-a: crl_uri"),
])
def test_a_crl_setting_that_cannot_work_stops_the_server(bare_ca, makers, setting, crl, complaint):
    if crl == "rogue":
        crl = makers.a.crl([], 1, signer=Issuer(makers.a.intermediate.cert, ec.generate_private_key(ec.SECP256R1())))
    elif crl == "other-maker":
        crl = makers.b.crl([], 1)
    elif crl == "delta":
        crl = makers.a.crl([], 2, delta=True)
    if crl is not None:
        (bare_ca.home / "maker-a.crl").write_bytes(crl)
    bare_ca.configure(setting)
    out = run([IOMTCA, "serve", "--dir", bare_ca.home, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0"],
              check=False, timeout=30)
    assert out.returncode != 0, out.stdout
    assert "listening" not in out.stdout
    assert complaint in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_valid_crl_file_in_der_lets_the_server_start(bare_ca, makers):
    """The counterpart of the refusals above: the same entry with a good CRL is accepted."""
    (bare_ca.home / "maker-a.crl").write_bytes(makers.a.crl([], 1, der=True))
    bare_ca.configure('crl = ["maker-a.crl"]')
    from enroll.config import load_enroll_config
    from ca.config import CAPaths
    cfg = load_enroll_config(CAPaths(bare_ca.home))
    (maker,) = cfg.idevid
    assert maker.revocation is not None and [s.held.number for s in maker.revocation.sources] == [1]


# -- the rules without a server (ca/idevid.py, pure: the clock comes in) ---------------------------

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def pure():
    maker = Maker("maker-p")
    return SimpleNamespace(maker=maker, cas=(maker.root.cert, maker.intermediate.cert))


def _accepted(pure, revoked, number=1, **kw):
    from ca import idevid
    crl = pure.maker.crl_object(revoked, number, this_update=kw.pop("this_update", T0),
                                next_update=kw.pop("next_update", T0 + timedelta(days=7)), **kw)
    return idevid.accept_crl(crl, pure.cas)


def _check(pure, leaf, crls, now=T0):
    from ca import idevid
    idevid.check_revocation(leaf.cert, pure.maker.intermediate.cert, pure.cas, crls, now, "maker-p")


def test_the_newest_current_crl_decides_and_a_future_one_only_within_the_skew(pure, tmp_path):
    from ca.errors import UnauthorizedError, UnavailableError
    leaf = pure.maker.idevid("SN-P1", tmp_path)
    listing, clean = _accepted(pure, [leaf], 5), _accepted(pure, [], 6)
    with pytest.raises(UnauthorizedError, match="revoked by its manufacturer"):
        _check(pure, leaf, [listing])
    _check(pure, leaf, [listing, clean])                   # number 6 is newer: not listed any more
    early = _accepted(pure, [], 7, this_update=T0 + timedelta(minutes=4))
    _check(pure, leaf, [early])                            # 4 min ahead of our clock: within the skew
    ahead = _accepted(pure, [], 8, this_update=T0 + timedelta(minutes=10))
    with pytest.raises(UnavailableError, match="out of date"):
        _check(pure, leaf, [ahead])
    with pytest.raises(UnavailableError, match="out of date"):
        _check(pure, leaf, [clean], now=T0 + timedelta(days=7))   # at nextUpdate exactly: stale


def test_a_partitioned_crl_covers_only_the_idevids_that_name_it(pure, tmp_path):
    from ca import idevid
    from ca.errors import UnauthorizedError
    part = x509.UniformResourceIdentifier("http://maker-p.example/part-1.crl")
    idp = x509.IssuingDistributionPoint(full_name=[part], relative_name=None, only_contains_user_certs=True,
                                        only_contains_ca_certs=False, only_some_reasons=None,
                                        indirect_crl=False, only_contains_attribute_certs=False)
    dp = x509.CRLDistributionPoints([x509.DistributionPoint([part], None, None, None)])
    named, unnamed = pure.maker.idevid("SN-P2", tmp_path, extensions=(dp,)), pure.maker.idevid("SN-P3", tmp_path)
    crl = _accepted(pure, [named, unnamed], extensions=((idp, True),))
    with pytest.raises(UnauthorizedError, match="revoked by its manufacturer"):
        _check(pure, named, [crl])
    with pytest.raises(UnauthorizedError, match="no CRL of its manufacturer covers"):
        _check(pure, unnamed, [crl])   # another partition's certificate: this CRL cannot clear it
    reasons = x509.IssuingDistributionPoint(full_name=None, relative_name=None, only_contains_user_certs=False,
                                            only_contains_ca_certs=False,
                                            only_some_reasons=frozenset({x509.ReasonFlags.key_compromise}),
                                            indirect_crl=False, only_contains_attribute_certs=False)
    with pytest.raises(idevid.CRLError, match="only some revocation reasons"):
        _accepted(pure, [], extensions=((reasons, True),))


def test_a_crl_of_the_root_does_not_clear_an_idevid_of_the_intermediate(pure, tmp_path):
    from ca.errors import UnauthorizedError
    leaf = pure.maker.idevid("SN-P4", tmp_path)
    root_crl = _accepted(pure, [], by=pure.maker.root)
    with pytest.raises(UnauthorizedError, match="no CRL of its manufacturer covers"):
        _check(pure, leaf, [root_crl])
