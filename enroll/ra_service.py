"""The RA API's own endpoint for the gateway's credential: `POST /ra/v1/renew`.

The gateway renews its RA certificate with its current one, before 2/3 of its validity
(`gateway/ra_identity.py`). The `ra.ra_only` middleware has already required a good, unexpired
`gateway`-profile client certificate; `ca.service_certs.renew_ra_certificate` checks it again, checks
the CSR (proof of possession, key policy) and issues a new `gateway` certificate with the same
subject and SANs through `Authority.issue_service`.
"""
from __future__ import annotations

from aiohttp import web

from ca import service_certs
from ca.codec import b64decode_strict, load_csr

from .identity import peer_certificate
from .ra import ForbiddenError, issued_json, read_json, string_field
from .state import AUTHORITY, CONFIG

RENEW_PATH = "/ra/v1/renew"


async def renew(request: web.Request) -> web.Response:
    """`{"csr": base64 DER PKCS#10}` -> `{"status": "ok", "cert", "chain", "not_after", "serial"}`."""
    presented = peer_certificate(request, request.app[CONFIG])
    if presented is None:   # ra_only let it through, so this is a bug rather than a stranger
        raise ForbiddenError("the RA API requires the gateway's registration-authority client certificate")
    body = await read_json(request)
    csr = load_csr(b64decode_strict(string_field(body, "csr"), "csr"))
    issued = await service_certs.renew_ra_certificate(request.app[AUTHORITY], presented, csr)
    return issued_json(issued)


def add_routes(app: web.Application) -> None:
    app.router.add_post(RENEW_PATH, renew)
