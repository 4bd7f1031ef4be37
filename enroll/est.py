"""EST (RFC 7030, RFC 8951) handlers: decode, authenticate, call Authority, encode."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca import policy
from ca.credentials import CertificateAuth, IDevIDAuth
from ca.errors import PolicyViolationError, UnauthorizedError
from ca.profiles import SubjectRule
from ca.signer import generate_key

from . import codec
from .channel_binding import challenge_password, channel_binding
from .identity import basic_credentials, classify, client_source, peer_certificate
from .state import AUTHORITY, CONFIG, KEYGEN

log = logging.getLogger(__name__)

# The key type a device is asked for in csrattrs and given by serverkeygen by default.
DEFAULT_DEVICE_KEY = "ec-p256"


def est_response(body: bytes, content_type: str) -> web.Response:
    # RFC 8951: base64 without Content-Transfer-Encoding is the rule; the header is
    # still sent because older clients (RFC 7030 as first written) look for it.
    return web.Response(body=body, headers={"Content-Type": content_type,
                                            "Content-Transfer-Encoding": "base64"})


def profile_for(request: web.Request) -> str:
    """/.well-known/est/{label}/...: a label names a device profile (directly or via [enroll.labels])."""
    label = request.match_info.get("label")
    if label is None:
        return "device"
    name = request.app[CONFIG].labels.get(label, label)
    profile = request.app[AUTHORITY].config.profiles.get(name)
    if profile is None or profile.subject_rule is not SubjectRule.DEVICE:
        raise web.HTTPNotFound(text=f"unknown EST label {label!r}\n")
    return name


async def read_csr(request: web.Request) -> x509.CertificateSigningRequest:
    if request.content_type != codec.CT_PKCS10:
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Type must be {codec.CT_PKCS10}, not {request.content_type or 'missing'}\n")
    return codec.decode_csr_body(await request.read())


def check_channel_binding(request: web.Request, csr: x509.CertificateSigningRequest, profile: str) -> None:
    """RFC 7030 3.5 for profiles configured to require it: the CSR names this TLS connection."""
    if profile not in request.app[CONFIG].channel_binding:
        return
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    binding = channel_binding(ssl_object) if ssl_object is not None else None
    if binding is None:
        raise PolicyViolationError("profile requires TLS channel binding, which this connection cannot provide")
    policy.channel_bound(csr, challenge_password(binding[1]))


async def _enroll_identity(request: web.Request):
    """(device_id, credential) for simpleenroll/serverkeygen: Basic token, IDevID, or current certificate."""
    authority, config = request.app[AUTHORITY], request.app[CONFIG]
    basic = basic_credentials(request, client_source(request, config))
    if basic is not None:   # counted and limited per device and source in the core (ca/failures.py)
        return basic.device_id, basic.token
    cert = peer_certificate(request, config)
    if cert is not None:
        credential = classify(cert, authority.issuer.certificate, config, authority.now())
        if isinstance(credential, IDevIDAuth):
            credential = replace(credential, source=client_source(request, config))
            return await authority.device_for_idevid(credential), credential
        if isinstance(credential, CertificateAuth):
            return None, credential
    raise UnauthorizedError("authentication required: HTTP Basic with the device id and its enrollment token, "
                            "or a client certificate from a trusted manufacturer")


async def _issue(request: web.Request, csr: x509.CertificateSigningRequest, profile: str, identity=None,
                 approval_csr: x509.CertificateSigningRequest | None = None):
    """`approval_csr`: serverkeygen's request CSR, whose key an operator's approval names (the
    server-made key is new on every attempt)."""
    authority = request.app[AUTHORITY]
    device_id, credential = identity or await _enroll_identity(request)
    if isinstance(credential, CertificateAuth):
        return await authority.renew(device_id, csr, credential)
    return await authority.enroll(device_id, csr, credential, profile=profile, approval_csr=approval_csr)


async def cacerts(request: web.Request) -> web.Response:
    profile_for(request)
    chain = list(request.app[AUTHORITY].issuer.chain)
    return est_response(codec.encode_certs_only(chain), codec.CT_CERTS_ONLY)


async def csrattrs(request: web.Request) -> web.Response:
    profile = profile_for(request)
    body = codec.encode_csrattrs([DEFAULT_DEVICE_KEY],
                                 challenge_password=profile in request.app[CONFIG].channel_binding)
    return est_response(codec.wrap64(body), codec.CT_CSRATTRS)


async def simpleenroll(request: web.Request) -> web.Response:
    profile = profile_for(request)
    csr = await read_csr(request)
    check_channel_binding(request, csr, profile)
    issued = await _issue(request, csr, profile)
    return est_response(codec.encode_certs_only([issued.certificate]), codec.CT_CERTS_ONLY)


async def simplereenroll(request: web.Request) -> web.Response:
    profile = profile_for(request)
    authority, config = request.app[AUTHORITY], request.app[CONFIG]
    csr = await read_csr(request)
    cert = peer_certificate(request, config)
    credential = classify(cert, authority.issuer.certificate, config, authority.now()) if cert else None
    if not isinstance(credential, CertificateAuth):
        raise UnauthorizedError("simplereenroll needs the device's current certificate as TLS client certificate")
    check_channel_binding(request, csr, profile)
    issued = await authority.renew(None, csr, credential)
    return est_response(codec.encode_certs_only([issued.certificate]), codec.CT_CERTS_ONLY)


def _keygen(key_type: str) -> bytes:
    """Runs in a worker process: key generation (RSA above all) must not stall the event loop."""
    return generate_key(key_type).private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())


def _serverkeygen_type(csr: x509.CertificateSigningRequest) -> str:
    """The key type the client's own CSR hints at (RFC 7030 4.4.1), else the default."""
    try:
        kind = policy.key_type(csr.public_key())
    except Exception:
        return DEFAULT_DEVICE_KEY
    return {"rsa": "rsa-2048"}.get(kind, kind if kind in ("ec-p256", "ec-p384", "ed25519") else DEFAULT_DEVICE_KEY)


async def serverkeygen(request: web.Request) -> web.Response:
    """RFC 7030 4.4: the server makes the key pair; the request CSR contributes only its key type."""
    profile = profile_for(request)
    request_csr = await read_csr(request)
    check_channel_binding(request, request_csr, profile)
    identity = await _enroll_identity(request)
    if identity[0] is not None:
        # no key generation for callers who could not enroll anyway (keygen costs CPU)
        await request.app[AUTHORITY].precheck(*identity)
    key_type = _serverkeygen_type(request_csr)
    loop = asyncio.get_running_loop()
    key_der = await loop.run_in_executor(request.app[KEYGEN], _keygen, key_type)
    key = serialization.load_der_private_key(key_der, password=None)
    # a CSR signed with the new key, so issuance runs its usual proof-of-possession check
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, None if key_type == "ed25519" else hashes.SHA256()))
    issued = await _issue(request, csr, profile, identity, approval_csr=request_csr)
    body, content_type = codec.encode_serverkeygen(key_der, issued.certificate)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def fullcmc(request: web.Request) -> web.Response:
    # 404, not 501: no input makes this server answer 5xx (docs/SECURITY.md); the operation is
    # optional (RFC 7030 4.3) and simply not here
    raise web.HTTPNotFound(text="fullcmc is not supported by this server (RFC 7030 4.3 is optional); "
                                "use simpleenroll or simplereenroll\n")


def add_routes(app: web.Application) -> None:
    for prefix in ("/.well-known/est", "/.well-known/est/{label}"):
        app.router.add_get(f"{prefix}/cacerts", cacerts)
        app.router.add_get(f"{prefix}/csrattrs", csrattrs)
        app.router.add_post(f"{prefix}/simpleenroll", simpleenroll)
        app.router.add_post(f"{prefix}/simplereenroll", simplereenroll)
        app.router.add_post(f"{prefix}/serverkeygen", serverkeygen)
        app.router.add_post(f"{prefix}/fullcmc", fullcmc)
