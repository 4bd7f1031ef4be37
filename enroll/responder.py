"""OCSP (RFC 6960, RFC 5019 GET) and CRL distribution over plain HTTP, plus the caIssuers certificate."""
from __future__ import annotations

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp as x509_ocsp

from ca import ocsp as ocsp_mod
from ca.codec import b64decode_strict
from ca.errors import BadRequestError

from .identity import client_source
from .publication import Published
from .state import AUTHORITY, CONFIG, PUBLISHER

CT_OCSP_REQUEST = "application/ocsp-request"
CT_OCSP_RESPONSE = "application/ocsp-response"
MAX_OCSP_REQUEST = 10 * 1024
MAX_CACHE_AGE_S = 300


def _ocsp_answer(der: bytes) -> web.Response:
    return web.Response(body=der, headers={"Content-Type": CT_OCSP_RESPONSE, "Cache-Control": "no-cache"})


async def ocsp_post(request: web.Request) -> web.Response:
    if request.content_type != CT_OCSP_REQUEST:
        raise web.HTTPUnsupportedMediaType(text=f"Content-Type must be {CT_OCSP_REQUEST}\n")
    body = await request.read()
    if len(body) > MAX_OCSP_REQUEST:
        return web.Response(status=413, text=f"OCSP request over the {MAX_OCSP_REQUEST}-byte limit\n",
                            content_type="text/plain")
    return _ocsp_answer((await request.app[PUBLISHER].answer(body, client_source(request, request.app[CONFIG])))[0])


async def ocsp_get(request: web.Request) -> web.Response:
    """RFC 6960 A.1 / RFC 5019 5: GET {url}/{url-encoding of base64 of DER request}."""
    encoded = request.match_info["request"]  # aiohttp has already percent-decoded the path
    try:
        der = b64decode_strict(encoded, "OCSP request")
    except BadRequestError:
        return _ocsp_answer(ocsp_mod.error_response(x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST))
    answer, published = await request.app[PUBLISHER].answer(der, client_source(request, request.app[CONFIG]))
    if published is None:
        # not from the cache (a nonce, or an error): cacheable only if it says so itself
        try:
            parsed = x509_ocsp.load_der_ocsp_response(answer)
            if (parsed.response_status is x509_ocsp.OCSPResponseStatus.SUCCESSFUL
                    and parsed.next_update_utc is not None and not _has_nonce(parsed)):
                published = Published(answer, parsed.this_update_utc, parsed.next_update_utc)
        except ValueError:
            pass
    if published is None:
        return _ocsp_answer(answer)
    # RFC 5019 6.2: cacheable answers say for how long,
    # short enough that an HTTP cache does not keep "good" long after a revocation
    now = request.app[AUTHORITY].now()
    max_age = max(0, min(MAX_CACHE_AGE_S, int((published.next_update - now).total_seconds()) // 2))
    last_modified, expires = published.http_dates
    return web.Response(body=answer, headers={
        "Content-Type": CT_OCSP_RESPONSE,
        "Cache-Control": f"max-age={max_age}, public, no-transform, must-revalidate",
        "Last-Modified": last_modified,
        "Expires": expires,
    })


def _has_nonce(parsed: x509_ocsp.OCSPResponse) -> bool:
    return any(isinstance(e.value, x509.OCSPNonce) for e in parsed.extensions)


async def crl(request: web.Request) -> web.Response:
    published = await request.app[PUBLISHER].crl()
    last_modified, expires = published.http_dates
    return web.Response(body=published.der, headers={
        "Content-Type": "application/pkix-crl", "Last-Modified": last_modified, "Expires": expires})


async def ca_cert(request: web.Request) -> web.Response:
    der = request.app[AUTHORITY].issuer.certificate.public_bytes(serialization.Encoding.DER)
    return web.Response(body=der, headers={"Content-Type": "application/pkix-cert"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/ocsp", ocsp_post)
    app.router.add_post("/ocsp/", ocsp_post)
    app.router.add_get("/ocsp/{request:.+}", ocsp_get)
    app.router.add_get("/crl", crl)
    app.router.add_get("/ca.cer", ca_cert)
