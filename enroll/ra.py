"""The registration-authority API the MQTT gateway calls, with its RA client certificate.

The gateway relays each device's own proof (its token, or its CMS-signed renewal)
and the CA verifies it: a compromised gateway cannot mint certificates. JSON in
and out; errors are `{"code", "message"}` with the MQTT contract's codes.
"""
from __future__ import annotations

import asyncio
import base64
import json

from aiohttp import web

from ca import attendance, cms, gateways
from ca.authority import Authority
from ca.codec import b64decode_strict, cert_der, load_csr, posture_json
from ca.credentials import CertificateAuth, SignedRequestAuth, TokenAuth
from ca.errors import BadRequestError, CAError, PolicyViolationError
from ca.failures import RA_PREFIX
from ca.model import CertStatus, Issued, check_device_id, parse_serial, serial_hex
from ca.timefmt import to_rfc3339

from . import codec, ra_batch
from .est import DEFAULT_DEVICE_KEY
from .identity import classify, peer_certificate
from .state import AUTHORITY, CONFIG, PUBLISHER, RA_GATEWAY

MAX_WAIT_S = 30


class ForbiddenError(PolicyViolationError):
    """The caller is not an active gateway. Answered with `X-Refused: ra-credential`, so a gateway
    tells a refusal of itself from a refusal of the device it relays (and keeps the request)."""
    refused = "ra-credential"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _require_ra(request: web.Request) -> None:
    authority, config = request.app[AUTHORITY], request.app[CONFIG]
    cert = peer_certificate(request, config)
    credential = classify(cert, authority.issuer.certificate, config, authority.now()) if cert else None
    if isinstance(credential, CertificateAuth):
        try:
            record = await authority.certificate(cert.serial_number)
        except CAError:
            record = None
        now = authority.now()
        if (record is not None and record.profile == "gateway" and record.status is CertStatus.GOOD
                and record.not_before <= now <= record.not_after):
            # on every call: a revoked gateway is refused at once, whichever of its certificates it shows
            try:
                request[RA_GATEWAY] = (await gateways.active_gateway(authority, record.serial)).name
            except CAError as exc:
                raise ForbiddenError(f"the RA API refuses this gateway: {exc}") from None
            return
    raise ForbiddenError("the RA API requires the gateway's registration-authority client certificate")


@web.middleware
async def ra_only(request: web.Request, handler):
    if request.path.startswith("/ra/"):
        await _require_ra(request)
    return await handler(request)


async def read_json(request: web.Request) -> dict:
    require_json(request)
    return parse_json(await request.read())


def require_json(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="Content-Type must be application/json\n")


def parse_json(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    return body


def string_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"field {name!r} is missing or not a string")
    return value


def issued_fields(issued: Issued) -> dict:
    """The `ok` answer for a certificate: what the single endpoints and each batch item return."""
    return {
        "status": "ok", "cert": _b64(cert_der(issued.certificate)),
        "chain": [_b64(cert_der(c)) for c in issued.chain[:1]],
        "not_after": to_rfc3339(issued.not_after), "serial": serial_hex(issued.serial),
    }


def issued_json(issued: Issued) -> web.Response:
    return web.json_response(issued_fields(issued))


def _request_id(body: dict) -> str | None:
    """The device's request id: the same id again gets the same certificate (idempotent relay)."""
    value = body.get("request_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise BadRequestError("request_id must be a string of 1 to 64 characters")
    return value


def _device_id(request: web.Request) -> str:
    return check_device_id(request.match_info["device_id"])


async def enroll_device(authority: Authority, device_id: str, body: dict, source: str | None = None) -> Issued:
    """A relayed first enrollment (`{"csr", "token"[, "request_id"]}`): the single endpoint and
    each batch item (enroll/ra_batch.py) parse and issue through this one function. `source`:
    `ra:GATEWAY`, under which its failed tokens are counted (ca/failures.py)."""
    csr = load_csr(b64decode_strict(string_field(body, "csr"), "csr"))
    return await authority.enroll(device_id, csr, TokenAuth(string_field(body, "token"), source=source),
                                  request_id=_request_id(body))


def relay_source(request: web.Request) -> str:
    """`ra:GATEWAY` of the gateway `_require_ra` let in."""
    return f"{RA_PREFIX}{request.get(RA_GATEWAY, 'unknown')}"


async def reenroll_device(authority: Authority, device_id: str, body: dict) -> Issued:
    """A relayed renewal (`{"cms"[, "request_id"]}`, the device's CMS-signed CSR), as above."""
    signed = cms.verify_signed_request(b64decode_strict(string_field(body, "cms"), "cms"))
    csr = load_csr(signed.csr_der)
    credential = SignedRequestAuth(signed.signer, signing_time=signed.signing_time)
    return await authority.renew(device_id, csr, credential, request_id=_request_id(body))


async def simpleenroll(request: web.Request) -> web.Response:
    device_id = _device_id(request)
    return issued_json(await enroll_device(request.app[AUTHORITY], device_id, await read_json(request),
                                           relay_source(request)))


async def simplereenroll(request: web.Request) -> web.Response:
    device_id = _device_id(request)
    return issued_json(await reenroll_device(request.app[AUTHORITY], device_id, await read_json(request)))


async def presence(request: web.Request) -> web.Response:
    """An unsigned presence report: stored as reported, changes no trust."""
    device_id = _device_id(request)   # checked before anything else is read
    body = await read_json(request)
    online = body.get("online")
    if not isinstance(online, bool):
        raise BadRequestError("field 'online' must be true or false")
    await request.app[AUTHORITY].record_presence(device_id, online=online)
    return web.json_response({"status": "ok"})


async def reported_posture(request: web.Request) -> web.Response:
    """An unsigned posture report: stored as reported firmware, changes no trust."""
    await request.app[AUTHORITY].record_reported_posture(_device_id(request), await read_json(request))
    return web.json_response({"status": "ok"})


async def posture(request: web.Request) -> web.Response:
    """A signed posture (MQTT `req/posture`): CMS SignedData over the posture JSON, signed with the
    device's current certificate; verified here end to end, like a renewal."""
    device_id = _device_id(request)
    body = await read_json(request)
    signed = cms.verify_signed_request(b64decode_strict(string_field(body, "cms"), "cms"))
    device, released = await request.app[AUTHORITY].prove_posture(
        device_id, posture_json(signed.csr_der), SignedRequestAuth(signed.signer, signing_time=signed.signing_time),
        request_id=_request_id(body))
    return web.json_response({"status": "ok", "firmware": device.firmware,
                              "released": [serial_hex(s) for s in released]})


async def cacerts(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok",
                              "certs": [_b64(cert_der(c)) for c in request.app[AUTHORITY].issuer.chain]})


async def csrattrs(request: web.Request) -> web.Response:
    attrs = codec.encode_csrattrs([DEFAULT_DEVICE_KEY], challenge_password=False)
    return web.json_response({"status": "ok", "csrattrs": _b64(attrs), "key_types": [DEFAULT_DEVICE_KEY]})


async def status_changes(request: web.Request) -> web.Response:
    """Long poll: revocations, holds and releases after change id `after` (waits up to `wait` s)."""
    try:
        after = int(request.query.get("after", "0"))
        wait = min(float(request.query.get("wait", "0")), MAX_WAIT_S)
    except ValueError:
        raise BadRequestError("after must be an integer and wait a number of seconds") from None
    authority, publisher = request.app[AUTHORITY], request.app[PUBLISHER]
    changes = await authority.status_changes(after)
    if not changes and wait > 0:
        try:
            async with publisher.changed:
                # the follower may have seen a change since the query above: then do not wait
                if publisher.last_change <= after:
                    await asyncio.wait_for(publisher.changed.wait(), wait)
        except asyncio.TimeoutError:
            pass
        changes = await authority.status_changes(after)
    records = [(change_id, await authority.certificate(serial)) for change_id, serial in changes]
    absent = await attendance.held_for_absence(authority.store, [r for _, r in records])
    items = []
    for change_id, record in records:
        items.append({"id": change_id, "serial": serial_hex(record.serial), "device_id": record.device_id,
                      "status": record.status.value, "reason": record.reason.name if record.reason else None,
                      "at": to_rfc3339(record.revoked_at) if record.revoked_at else None,
                      "attendance_hold": record.serial in absent})
    return web.json_response({"last": changes[-1][0] if changes else after, "changes": items})


async def certificates(request: web.Request) -> web.Response:
    """Unexpired device certificates, paged by serial (`after`, `limit` <= 1000)."""
    try:
        limit = max(1, min(int(request.query.get("limit", "1000")), 1000))
    except ValueError:
        raise BadRequestError("limit must be an integer") from None
    after = request.query.get("after", "")
    if after:
        after = serial_hex(parse_serial(after))
    authority = request.app[AUTHORITY]
    records = await authority.unexpired_certificates(after, limit)
    absent = await attendance.held_for_absence(authority.store, [r for r, _ in records])
    return web.json_response({"certificates": [
        {"serial": serial_hex(r.serial), "device_id": r.device_id, "not_before": to_rfc3339(r.not_before),
         "issued_at": to_rfc3339(r.created_at),
         "not_after": to_rfc3339(r.not_after), "status": r.status.value, "criticality": criticality,
         "attendance_hold": r.serial in absent}
        for r, criticality in records]})


async def ocsp(request: web.Request) -> web.Response:
    serial = parse_serial(request.match_info["serial"])
    der = await request.app[PUBLISHER].cached(serial)
    return web.Response(body=der, headers={"Content-Type": "application/ocsp-response"})


# serials per batch request: a gateway's start-up sweep over 100,000 certificates is then 100
# requests instead of 100,000, and one request stays well under the body size limit
OCSP_BATCH_MAX = 1000


async def ocsp_batch(request: web.Request) -> web.Response:
    """The cached OCSP responses of many serials at once: `{"serials": [hex, ...]}` ->
    `{"responses": {hex: base64 DER}}`."""
    serials = (await read_json(request)).get("serials")
    if not isinstance(serials, list) or not 0 < len(serials) <= OCSP_BATCH_MAX:
        raise BadRequestError(f"field 'serials' must be a list of 1 to {OCSP_BATCH_MAX} serial numbers")
    if not all(isinstance(s, str) for s in serials):
        raise BadRequestError("every serial must be a hexadecimal string")
    parsed = [parse_serial(s) for s in serials]   # all checked before any is signed
    publisher = request.app[PUBLISHER]
    responses = {serial_hex(s): _b64(await publisher.cached(s)) for s in parsed}
    return web.json_response({"responses": responses})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/ra/v1/devices/{device_id}/simpleenroll", simpleenroll)
    r.add_post("/ra/v1/devices/{device_id}/simplereenroll", simplereenroll)
    r.add_post("/ra/v1/devices/{device_id}/presence", presence)
    r.add_post("/ra/v1/devices/{device_id}/posture", posture)
    r.add_post("/ra/v1/devices/{device_id}/reported-posture", reported_posture)
    r.add_get("/ra/v1/cacerts", cacerts)
    r.add_get("/ra/v1/csrattrs", csrattrs)
    r.add_get("/ra/v1/status-changes", status_changes)
    r.add_get("/ra/v1/certificates", certificates)
    r.add_get("/ra/v1/ocsp/{serial}", ocsp)
    r.add_post("/ra/v1/ocsp", ocsp_batch)
    r.add_post("/ra/v1/batch", ra_batch.batch)
