"""Channel binding values (RFC 7030 3.5) over real loopback TLS, judged by openssl and pyOpenSSL.

Both ends of each connection must compute the same value with `channel_binding`;
the TLS 1.3 tls-exporter value, which we read through libssl behind the stdlib's
back, is checked against `openssl s_client -keymatexport` and against pyOpenSSL
(its own, separately built OpenSSL), and tls-unique against the client Finished
message `openssl s_client -msg` prints.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import platform
import re
import shutil
import socket
import ssl
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL as PyOpenSSL

from enroll import channel_binding as cb

TIMEOUT = 5.0
LENGTH = {cb.TLS_UNIQUE: 12, cb.TLS_EXPORTER: 32}
VERSIONS = {
    "TLSv1.2": (ssl.TLSVersion.TLSv1_2, cb.TLS_UNIQUE, PyOpenSSL.TLS1_2_VERSION, "-tls1_2"),
    "TLSv1.3": (ssl.TLSVersion.TLSv1_3, cb.TLS_EXPORTER, PyOpenSSL.TLS1_3_VERSION, "-tls1_3"),
}
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed EC server certificate for 127.0.0.1 and its key."""
    home = tmp_path_factory.mktemp("chanbind")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "est.test")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = home / "cert.pem", home / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def contexts(pki, version: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) stdlib contexts pinned to one TLS version; the client verifies the server."""
    cert_file, key_file = pki
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert_file)
    for ctx in (server, client):
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version][0]
    return server, client


def assert_pair(client_value, server_value, version: str) -> None:
    name = VERSIONS[version][1]
    assert client_value is not None and server_value is not None
    assert client_value == server_value
    assert client_value[0] == name
    assert len(client_value[1]) == LENGTH[name]


# -- blocking sockets, server in a thread (ssl.SSLSocket on both ends) ------------------------

def socket_connections(server_ctx, client_ctx, count: int) -> list[tuple]:
    """(client value, server value, client value after close) for `count` loopback connections."""
    server_values: list = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                for _ in range(count):
                    conn, _ = listener.accept()
                    conn.settimeout(TIMEOUT)
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        server_values.append(cb.channel_binding(tls))
                        tls.sendall(b"k")  # lets the client know the value is taken
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        results = []
        for i in range(count):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    client_value = cb.channel_binding(tls)
                    assert tls.recv(1) == b"k"
            results.append([client_value, None, cb.channel_binding(tls)])
        thread.join(TIMEOUT)
        assert not thread.is_alive() and not errors, errors
    for row, server_value in zip(results, server_values, strict=True):
        row[1] = server_value
    return [tuple(r) for r in results]


@pytest.mark.parametrize("version", VERSIONS)
def test_sockets_in_thread_agree_and_differ_per_connection(pki, version):
    rows = socket_connections(*contexts(pki, version), count=2)
    for client_value, server_value, after_close in rows:
        assert_pair(client_value, server_value, version)
        assert after_close is None
    assert rows[0][0][1] != rows[1][0][1]


# -- asyncio streams (ssl.SSLObject on both ends, as under aiohttp) ---------------------------

async def asyncio_connections(server_ctx, client_ctx, count: int) -> list[tuple]:
    server_values: list = []

    async def handle(reader, writer):
        server_values.append(cb.channel_binding(writer.get_extra_info("ssl_object")))
        writer.write(b"k")
        await writer.drain()
        writer.close()

    async with asyncio.timeout(3 * TIMEOUT):
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            client_values = []
            for _ in range(count):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                               server_hostname="127.0.0.1")
                ssl_object = writer.get_extra_info("ssl_object")
                assert isinstance(ssl_object, ssl.SSLObject)
                client_values.append(cb.channel_binding(ssl_object))
                assert await reader.read(1) == b"k"
                writer.close()
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    await writer.wait_closed()
    return list(zip(client_values, server_values, strict=True))


@pytest.mark.parametrize("version", VERSIONS)
async def test_asyncio_streams_agree_and_differ_per_connection(pki, version):
    rows = await asyncio_connections(*contexts(pki, version), count=2)
    for client_value, server_value in rows:
        assert_pair(client_value, server_value, version)
    assert rows[0][0][1] != rows[1][0][1]


# -- independent judges ------------------------------------------------------------------------

async def judge_with_s_client(pki, version: str, *extra: str) -> tuple[tuple, str]:
    """Our asyncio server against `openssl s_client`; (server-side value, s_client output)."""
    server_values: list = []

    async def handle(reader, writer):
        server_values.append(cb.channel_binding(writer.get_extra_info("ssl_object")))
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await reader.read()  # until s_client, whose stdin is empty, hangs up
        writer.close()

    server_ctx, _ = contexts(pki, version)
    async with asyncio.timeout(2 * TIMEOUT):
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            proc = await asyncio.create_subprocess_exec(
                OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", VERSIONS[version][3],
                "-CAfile", str(pki[0]), "-verify_return_error", *extra,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = await proc.communicate()
            assert proc.returncode == 0, out.decode(errors="replace")
    assert len(server_values) == 1
    return server_values[0], out.decode(errors="replace")


@needs_openssl
async def test_openssl_s_client_judges_tls_exporter(pki):
    value, out = await judge_with_s_client(pki, "TLSv1.3", "-keymatexport", "EXPORTER-Channel-Binding",
                                           "-keymatexportlen", "32")
    printed = re.search(r"Keying material: ([0-9A-Fa-f]+)", out)
    assert printed, out
    assert value == (cb.TLS_EXPORTER, bytes.fromhex(printed.group(1)))


@needs_openssl
async def test_openssl_s_client_judges_tls_unique(pki):
    value, out = await judge_with_s_client(pki, "TLSv1.2", "-msg")
    # The first Finished of a full handshake is the client's; -msg prints it decrypted:
    # ">>> TLS 1.2, Handshake [length 0010], Finished" then "14 00 00 0c" + verify_data.
    sent = re.search(r">>> [^\n]*Handshake[^\n]*Finished\n((?:\s+(?:[0-9a-f]{2} ?)+\n)+)", out)
    assert sent, out
    message = bytes.fromhex("".join(sent.group(1).split()))
    assert message[:4] == b"\x14\x00\x00\x0c"
    assert value == (cb.TLS_UNIQUE, message[4:16])
    assert "Extended master secret: yes" in out  # tls-unique is only sound with RFC 7627


def pyopenssl_pair(pki, version: str, stdlib_is_server: bool):
    """A finished in-memory handshake between a stdlib SSLObject and a pyOpenSSL Connection."""
    server_ctx, client_ctx = contexts(pki, version)
    other_ctx = PyOpenSSL.Context(PyOpenSSL.TLS_METHOD)
    other_ctx.set_min_proto_version(VERSIONS[version][2])
    other_ctx.set_max_proto_version(VERSIONS[version][2])
    if not stdlib_is_server:
        other_ctx.use_certificate_file(str(pki[0]))
        other_ctx.use_privatekey_file(str(pki[1]))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    other = PyOpenSSL.Connection(other_ctx, None)
    if stdlib_is_server:
        ours = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
        other.set_connect_state()
    else:
        ours = client_ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        other.set_accept_state()
    done = {"ours": False, "other": False}
    for _ in range(20):
        if not done["ours"]:
            with contextlib.suppress(ssl.SSLWantReadError):
                ours.do_handshake()
                done["ours"] = True
        if not done["other"]:
            with contextlib.suppress(PyOpenSSL.WantReadError):
                other.do_handshake()
                done["other"] = True
        if data := outgoing.read():
            other.bio_write(data)
        with contextlib.suppress(PyOpenSSL.WantReadError):
            incoming.write(other.bio_read(65536))
        if all(done.values()):
            return ours, other
    raise AssertionError("in-memory handshake with pyOpenSSL did not finish")


@pytest.mark.parametrize("stdlib_is_server", [True, False], ids=["stdlib-server", "stdlib-client"])
@pytest.mark.parametrize("version", VERSIONS)
def test_pyopenssl_judges(pki, version, stdlib_is_server):
    ours, other = pyopenssl_pair(pki, version, stdlib_is_server)
    name, value = cb.channel_binding(ours)
    if version == "TLSv1.3":
        expected = other.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    else:  # tls-unique: the client's Finished, whichever end reads it
        expected = other.get_finished() if stdlib_is_server else other.get_peer_finished()
    assert (name, value) == (VERSIONS[version][1], expected)


# -- self-check and degradation ----------------------------------------------------------------

def memory_pair(pki, version: str) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """(client, server) after an in-memory handshake, the same pump the self-check uses."""
    return cb._memory_handshake(*contexts(pki, version))


def test_self_check_passes_here():
    assert cb.exporter_available() is True


def test_self_check_certificate_is_built_by_the_ca_core(monkeypatch):
    """The self-check's throwaway server certificate comes from ca/issuance.py (one builder of
    certificates), and a fresh check really performs its handshakes with it."""
    import ca.issuance

    made = []
    real = ca.issuance.self_check_certificate

    def recording(key, now, **kw):
        made.append(real(key, now, **kw))
        return made[-1]

    monkeypatch.setattr(ca.issuance, "self_check_certificate", recording)
    monkeypatch.setattr(cb, "_state", cb._UNCHECKED)
    assert cb.exporter_available() is True
    assert len(made) == 2   # one per TLS version checked (1.2, then 1.3)
    usage = made[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert made[0].not_valid_after_utc - made[0].not_valid_before_utc <= timedelta(hours=2)

    def broken(key, now, **kw):
        raise ValueError("no certificate today")

    monkeypatch.setattr(ca.issuance, "self_check_certificate", broken)
    monkeypatch.setattr(cb, "_state", cb._UNCHECKED)
    assert cb.exporter_available() is False   # no certificate, no trusted exporter


def test_not_connected_yet_is_none(pki):
    server_ctx, _ = contexts(pki, "TLSv1.3")
    fresh = server_ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert cb.channel_binding(fresh) is None


def test_rejects_other_types():
    with pytest.raises(TypeError):
        cb.channel_binding(object())  # type: ignore[arg-type]


def test_failed_self_check_disables_only_tls13(pki, monkeypatch, caplog):
    monkeypatch.setattr(cb, "_state", cb._UNCHECKED)

    def broken():
        raise cb._Refused("simulated layout change")

    monkeypatch.setattr(cb, "_self_check", broken)
    with caplog.at_level(logging.WARNING, logger=cb.__name__):
        assert cb.exporter_available() is False
        assert cb.exporter_available() is False
        client, server = memory_pair(pki, "TLSv1.3")
        assert cb.channel_binding(server) is None and cb.channel_binding(client) is None
        client, server = memory_pair(pki, "TLSv1.2")
        assert cb.channel_binding(server) == cb.channel_binding(client)
        assert cb.channel_binding(server)[0] == cb.TLS_UNIQUE
    warnings = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(warnings) == 1 and "simulated layout change" in warnings[0].getMessage()


def test_other_python_implementation_is_not_trusted(monkeypatch, caplog):
    monkeypatch.setattr(cb, "_state", cb._UNCHECKED)
    monkeypatch.setattr(platform, "python_implementation", lambda: "PyPy")
    with caplog.at_level(logging.WARNING, logger=cb.__name__):
        assert cb.exporter_available() is False
    assert "not CPython" in caplog.text


def test_an_untested_python_version_is_not_trusted(monkeypatch, caplog):
    monkeypatch.setattr(cb, "_state", cb._UNCHECKED)
    monkeypatch.setattr(cb, "TESTED_PYTHONS", frozenset({(3, 99)}))
    with caplog.at_level(logging.WARNING, logger=cb.__name__):
        assert cb.exporter_available() is False
    assert "not among the versions this ctypes path was tested on (3.99)" in caplog.text


def test_this_python_is_among_the_tested_ones():
    """The suite runs on this interpreter: if it is new, this file passing is the test that lets
    it into TESTED_PYTHONS (and this assertion says so)."""
    import sys
    assert sys.version_info[:2] in cb.TESTED_PYTHONS, (
        f"run tests/enroll/test_channel_binding.py on {sys.version_info[:2]} and add it to TESTED_PYTHONS")


def test_shifted_layout_is_refused_before_libssl_sees_the_pointer(pki, monkeypatch, caplog):
    """If the struct moved by one pointer, the ctx-slot identity check fails; nothing is called."""
    assert cb.exporter_available()
    client, server = memory_pair(pki, "TLSv1.3")
    monkeypatch.setattr(cb, "_HEAD", cb._HEAD + cb._PTR)
    calls = []
    lib = cb._state
    monkeypatch.setattr(lib, "_get_ssl_ctx", lambda p: calls.append(p))
    monkeypatch.setattr(lib, "_export", lambda *a: calls.append(a))
    with caplog.at_level(logging.WARNING, logger=cb.__name__):
        assert cb.channel_binding(server) is None
    assert calls == []
    assert "layout differs" in caplog.text


def test_challenge_password_is_padded_standard_base64():
    value = bytes(range(250, 256)) + b"\xfb\xff" * 13  # 32 bytes with + and / in base64
    password = cb.challenge_password(value)
    assert password == base64.b64encode(value).decode()
    assert len(password) == 44 and password.endswith("=")
    assert base64.b64decode(password, validate=True) == value
    assert cb.challenge_password(b"\x00" * 12) == "AAAAAAAAAAAAAAAA"
