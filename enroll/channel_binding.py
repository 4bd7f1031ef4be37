"""TLS channel binding of a connection (tls-unique, tls-exporter) for RFC 7030 section 3.5.

TLS 1.2 connections use tls-unique (RFC 5929), which the stdlib `ssl` module
gives. TLS 1.3 connections need tls-exporter (RFC 9266), i.e.
`SSL_export_keying_material`, which the stdlib does not expose; aiohttp and
asyncio only hand us stdlib `ssl.SSLObject`s. So this module reads the `SSL *`
out of CPython's `_ssl._SSLSocket` struct with ctypes and calls the exporter in
the very libssl `_ssl` is linked against. That is reaching into internals, so
it is trusted only after a once-per-process self-check (in-memory handshakes
whose values are compared with what the stdlib reports); if anything looks
wrong, TLS 1.3 simply has no binding (`None`) and a warning is logged once.
"""
from __future__ import annotations

import base64
import ctypes
import logging
import os
import platform
import ssl
import sys
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

TLS_UNIQUE = "tls-unique"
TLS_EXPORTER = "tls-exporter"
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"  # RFC 9266 section 2
EXPORTER_LENGTH = 32

# Versions (as `SSLObject.version()` names them) whose binding is tls-unique.
_UNIQUE_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2"})
_WIRE_VERSION = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

_PTR = ctypes.sizeof(ctypes.c_void_p)
# Offset of the first field after PyObject_HEAD. CPython's _ssl.c declares
#   PySSLSocket  { PyObject_HEAD; PyObject *Socket; SSL *ssl; PySSLContext *ctx; ... }
#   PySSLContext { PyObject_HEAD; SSL_CTX *ctx; ... }
# (3.11 to 3.13). object.__basicsize__ is sizeof(PyObject), which also covers
# debug (Py_TRACE_REFS) and free-threaded builds whose header is larger.
_HEAD = object.__basicsize__
# Bytes at the SSL pointer that must be readable before libssl may touch it.
_PROBE_BYTES = 256
_HANDSHAKE_ROUNDS = 20
# CPython versions whose struct layout the self-check and tests/enroll/test_channel_binding.py
# have been run on. Another version gets no tls-exporter (TLS 1.2's tls-unique still works) until
# that test file has passed on it and it is added here.
TESTED_PYTHONS = frozenset({(3, 11)})


class _Refused(Exception):
    """The object or the library does not look like what we expect; do not touch it."""


class _Libssl:
    """The libssl functions of the `_ssl` extension, with typed signatures.

    Loaded with `PyDLL` so every call keeps the GIL, as `_ssl` itself does for
    its own non-I/O calls such as `get_channel_binding`.
    """

    def __init__(self) -> None:
        import _ssl

        self._ssl_socket_type = _ssl._SSLSocket
        self._ssl_context_type = _ssl._SSLContext
        library = getattr(_ssl, "__file__", None)  # None: _ssl built into the interpreter
        # dlsym on the extension's own handle searches the extension and then its
        # dependencies, so it finds the libssl _ssl was linked against, never an
        # unrelated copy (cryptography's is static and hidden anyway).
        handle = ctypes.PyDLL(library)
        try:
            self._export = _function(handle, "SSL_export_keying_material", ctypes.c_int, [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
            self._get_finished = _function(handle, "SSL_get_finished", ctypes.c_size_t,
                                           [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t])
            self._get_peer_finished = _function(handle, "SSL_get_peer_finished", ctypes.c_size_t,
                                                [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t])
            self._version = _function(handle, "SSL_version", ctypes.c_int, [ctypes.c_void_p])
            self._get_ssl_ctx = _function(handle, "SSL_get_SSL_CTX", ctypes.c_void_p, [ctypes.c_void_p])
            self._err_clear = _function(handle, "ERR_clear_error", None, [])
            version_num = _function(handle, "OpenSSL_version_num", ctypes.c_ulong, [])
        except AttributeError as exc:
            raise _Refused(f"libssl symbol not reachable from _ssl: {exc}") from None
        if version_num() != ssl.OPENSSL_VERSION_NUMBER:
            raise _Refused(f"libssl found is {version_num():#x}, _ssl reports {ssl.OPENSSL_VERSION_NUMBER:#x}")
        self.path = _shared_object_of(self._export) or str(library)

    # -- the pointer -------------------------------------------------------------------------

    def ssl_pointer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
        """The `SSL *` behind a stdlib object, or `_Refused`; every check reads only."""
        inner = getattr(ssl_object, "_sslobj", None)
        if not isinstance(inner, self._ssl_socket_type):
            raise _Refused(f"_sslobj is {type(inner).__name__}, not _ssl._SSLSocket")
        context = inner.context
        if not isinstance(context, self._ssl_context_type):
            raise _Refused("the _SSLSocket's context is not an _ssl._SSLContext")
        socket_field, ssl_ptr, ctx_field = _fields(inner, self._ssl_socket_type, 3)
        (ssl_ctx,) = _fields(context, self._ssl_context_type, 1)
        # The layout check: the slot after `ssl` must be the very context object
        # Python gives us, and `Socket` must be NULL exactly for memory-BIO objects.
        if ctx_field != id(context):
            raise _Refused("PySSLSocket layout differs (ctx slot is not the context object)")
        if bool(socket_field) != isinstance(ssl_object, ssl.SSLSocket):
            raise _Refused("PySSLSocket layout differs (Socket slot)")
        if not ssl_ptr or not ssl_ctx:
            raise _Refused("NULL SSL or SSL_CTX pointer")
        if not _readable(ssl_ptr, _PROBE_BYTES):
            raise _Refused("SSL pointer is not readable memory")
        # First libssl call on the pointer: a pure read, answer known in advance.
        if self._get_ssl_ctx(ssl_ptr) != ssl_ctx:
            raise _Refused("SSL_get_SSL_CTX disagrees with the context's SSL_CTX")
        wire = _WIRE_VERSION.get(ssl_object.version() or "")
        if wire is None or self._version(ssl_ptr) != wire:
            raise _Refused("SSL_version disagrees with SSLObject.version()")
        return ssl_ptr

    # -- reads through the pointer -----------------------------------------------------------

    def finished(self, ssl_ptr: int, *, peer: bool) -> bytes:
        buf = (ctypes.c_ubyte * 64)()
        n = (self._get_peer_finished if peer else self._get_finished)(ssl_ptr, buf, len(buf))
        return bytes(buf[:min(n, len(buf))])

    def exporter(self, ssl_ptr: int) -> bytes | None:
        out = (ctypes.c_ubyte * EXPORTER_LENGTH)()
        rc = self._export(ssl_ptr, out, EXPORTER_LENGTH, EXPORTER_LABEL, len(EXPORTER_LABEL), None, 0, 0)
        if rc != 1:
            self._err_clear()  # leave no stale error for _ssl to report on the next read
            return None
        return bytes(out)

    def tls_exporter(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes | None:
        try:
            ssl_ptr = self.ssl_pointer(ssl_object)
        except _Refused as exc:
            log.warning("tls-exporter refused for this connection: %s", exc)
            return None
        return self.exporter(ssl_ptr)


def _function(handle, name: str, restype, argtypes):
    fn = getattr(handle, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def _fields(obj: object, base: type, count: int) -> list[int]:
    """The first `count` pointer fields of a C object, read inside its own allocation."""
    if _HEAD + count * _PTR > base.__basicsize__:
        raise _Refused(f"{base.__name__} is smaller than the expected layout")
    return [v or 0 for v in (ctypes.c_void_p * count).from_address(id(obj) + _HEAD)]


def _readable(address: int, size: int) -> bool:
    """Whether [address, address+size) is mapped: the kernel copies it to a pipe
    and answers EFAULT instead of this process taking a SIGSEGV."""
    r, w = os.pipe()
    try:
        return os.write(w, (ctypes.c_char * size).from_address(address)) == size
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _shared_object_of(fn) -> str | None:
    """File the function was resolved from (for the log), via dladdr where it exists."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
        info = _DlInfo()
        if dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
    except (AttributeError, OSError, TypeError):
        pass
    return None


# -- self-check ------------------------------------------------------------------------------

def _throwaway_contexts(directory: Path, version: ssl.TLSVersion) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography.hazmat.primitives import serialization

    from ca.issuance import self_check_certificate
    from common.keys import generate_key

    key = generate_key("ec-p256")
    cert = self_check_certificate(key, datetime.now(timezone.utc))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # a throwaway key in the process's own 0700 temporary directory, removed when the check ends
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # only the bytes of the handshake matter here
    for ctx in (server, client):
        ctx.minimum_version = ctx.maximum_version = version
    return server, client


def _memory_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    pending = [client, server]
    for _ in range(_HANDSHAKE_ROUNDS):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            return client, server
    raise _Refused("in-memory handshake did not finish")


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise _Refused(what)


def _self_check() -> _Libssl:
    """Build the library wrapper and prove, on connections we made, that it reads the right SSL."""
    _check(platform.python_implementation() == "CPython", "not CPython")
    _check(sys.version_info[:2] in TESTED_PYTHONS,
           f"CPython {sys.version_info[0]}.{sys.version_info[1]} is not among the versions this ctypes path was "
           f"tested on ({', '.join('%d.%d' % v for v in sorted(TESTED_PYTHONS))})")
    lib = _Libssl()
    with tempfile.TemporaryDirectory(prefix="chanbind-") as tmp:
        if ssl.HAS_TLSv1_2:
            server_ctx, client_ctx = _throwaway_contexts(Path(tmp), ssl.TLSVersion.TLSv1_2)
            client, server = _memory_handshake(server_ctx, client_ctx)
            c_ptr, s_ptr = lib.ssl_pointer(client), lib.ssl_pointer(server)
            _check(c_ptr != s_ptr, "client and server resolve to one SSL")
            unique = client.get_channel_binding(TLS_UNIQUE)
            _check(unique is not None and len(unique) == 12, "stdlib tls-unique is not 12 bytes")
            _check(server.get_channel_binding(TLS_UNIQUE) == unique, "stdlib tls-unique differs by side")
            _check(lib.finished(c_ptr, peer=False) == unique, "client SSL_get_finished != tls-unique")
            _check(lib.finished(s_ptr, peer=True) == unique, "server SSL_get_peer_finished != tls-unique")
            _check(lib.finished(s_ptr, peer=False) == lib.finished(c_ptr, peer=True),
                   "server Finished seen differently by the client")
        _check(ssl.HAS_TLSv1_3, "TLS 1.3 not available")
        server_ctx, client_ctx = _throwaway_contexts(Path(tmp), ssl.TLSVersion.TLSv1_3)
        seen = []
        for _ in range(2):
            client, server = _memory_handshake(server_ctx, client_ctx)
            c_ptr, s_ptr = lib.ssl_pointer(client), lib.ssl_pointer(server)
            # Identity before any exporter call: the Finished bytes read through
            # our pointers must be the ones the stdlib reads through its own.
            _check(lib.finished(c_ptr, peer=False) == client.get_channel_binding(TLS_UNIQUE),
                   "TLS 1.3 client Finished mismatch")
            _check(lib.finished(s_ptr, peer=True) == server.get_channel_binding(TLS_UNIQUE),
                   "TLS 1.3 server Finished mismatch")
            c_val, s_val = lib.exporter(c_ptr), lib.exporter(s_ptr)
            _check(c_val is not None and c_val == s_val, "exporter differs between client and server")
            _check(len(c_val) == EXPORTER_LENGTH and any(c_val), "exporter value malformed")
            seen.append(c_val)
        _check(seen[0] != seen[1], "exporter value repeats across connections")
    return lib


_UNCHECKED = object()
_state: object = _UNCHECKED  # _UNCHECKED, a _Libssl, or None after a failed check
_lock = threading.Lock()


def _libssl() -> _Libssl | None:
    global _state
    with _lock:
        if _state is _UNCHECKED:
            try:
                _state = _self_check()
                log.debug("tls-exporter enabled through %s", _state.path)
            except Exception as exc:  # noqa: BLE001 - any surprise means: do not trust it
                _state = None
                log.warning("tls-exporter channel binding disabled (TLS 1.3 connections get none): %s", exc)
        return _state  # type: ignore[return-value]


# -- public API ------------------------------------------------------------------------------

def exporter_available() -> bool:
    """Whether tls-exporter can be computed here (runs the self-check on first call)."""
    return _libssl() is not None


def channel_binding(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, bytes] | None:
    """("tls-unique", value) on TLS 1.2, ("tls-exporter", value) on TLS 1.3, None when unavailable.

    Works on either end of a finished handshake, so a client computes the value
    it puts in its CSR with the same call the server uses to check it. None
    also before the handshake completes, after close, and on TLS 1.3 when the
    exporter failed its self-check. TLS 1.0/1.1 get tls-unique as well.
    """
    if not isinstance(ssl_object, (ssl.SSLObject, ssl.SSLSocket)):
        raise TypeError(f"expected ssl.SSLObject or ssl.SSLSocket, got {type(ssl_object).__name__}")
    if getattr(ssl_object, "_sslobj", None) is None:
        return None  # closed, unwrapped, or never connected
    version = ssl_object.version()
    if version in _UNIQUE_VERSIONS:
        value = ssl_object.get_channel_binding(TLS_UNIQUE)
        return (TLS_UNIQUE, value) if value else None
    if version == "TLSv1.3":
        lib = _libssl()
        value = lib.tls_exporter(ssl_object) if lib is not None else None
        return (TLS_EXPORTER, value) if value else None
    return None


def challenge_password(binding: bytes) -> str:
    """The challengePassword a CSR carries for a binding value: standard base64 with padding (RFC 7030 3.5)."""
    return base64.b64encode(binding).decode("ascii")
