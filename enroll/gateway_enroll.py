"""A gateway's first RA certificate: `POST /iomt/v1/gateways/{name}/enroll`.

Called by `iomtca gateway init` on the gateway host, over server-authenticated TLS (the gateway
has no certificate yet): `{"token": the one-time token of `iomtca gateway add`, "csr": base64 DER
PKCS#10 for the key it just made}` -> `{"status": "ok", "cert", "chain", "not_after", "serial"}`.
Errors are JSON `{"code", "message"}` like the rest of /iomt/ (an unknown name and a wrong token
get the same answer). `ca.gateways.enroll` checks the token and issues.
"""
from __future__ import annotations

from aiohttp import web

from ca import gateways
from ca.codec import b64decode_strict, load_csr

from .ra import issued_json, read_json, string_field
from .identity import client_source
from .state import AUTHORITY, CONFIG

PATH = "/iomt/v1/gateways/{name}/enroll"


async def enroll(request: web.Request) -> web.Response:
    name = gateways.check_name(request.match_info["name"])
    body = await read_json(request)
    csr = load_csr(b64decode_strict(string_field(body, "csr"), "csr"))
    issued = await gateways.enroll(request.app[AUTHORITY], name, string_field(body, "token"), csr,
                                   source=client_source(request, request.app[CONFIG]))
    return issued_json(issued)


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, enroll)
