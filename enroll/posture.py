"""The device API beside EST: `POST /iomt/v1/posture`, a posture the device proves by mutual TLS.

EST (RFC 7030) has no operation for device posture. An EST device reports its firmware here,
over a TLS connection authenticated with its current certificate (the same certificate it would
renew with); the CA treats it as it treats a CMS-signed `req/posture` over MQTT. Without a client
certificate of this CA the request is refused: an unauthenticated posture changes nothing.
"""
from __future__ import annotations

from aiohttp import web

from ca.codec import posture_json
from ca.credentials import CertificateAuth
from ca.errors import UnauthorizedError
from ca.model import serial_hex

from .identity import classify, peer_certificate
from .state import AUTHORITY, CONFIG

PATH = "/iomt/v1/posture"


async def posture(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="Content-Type must be application/json\n")
    authority, config = request.app[AUTHORITY], request.app[CONFIG]
    cert = peer_certificate(request, config)
    credential = classify(cert, authority.issuer.certificate, config, authority.now()) if cert else None
    if not isinstance(credential, CertificateAuth):
        raise UnauthorizedError("a posture must be sent over mutual TLS with the device's current certificate")
    device, released = await authority.prove_posture(None, posture_json(await request.read()), credential)
    return web.json_response({"status": "ok", "device_id": device.id, "firmware": device.firmware,
                              "released": [serial_hex(s) for s in released]})


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, posture)
