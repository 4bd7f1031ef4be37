"""The RA API's batch call: many relayed enrollments and renewals in one HTTPS request.

`POST /ra/v1/batch` with `{"requests": [item, ...]}` (1 to BATCH_MAX items), each item
`{"op": "simpleenroll", "device_id", "csr", "token"[, "request_id"]}` or
`{"op": "simplereenroll", "device_id", "cms"[, "request_id"]}`, answered
`{"results": [result, ...]}` in the same order. A result is what the single endpoint
(`/ra/v1/devices/{id}/{op}`) would have answered, as JSON: `{"status": "ok", "cert", "chain",
"not_after", "serial", "ocsp"}` (`ocsp`: the new certificate's OCSP response, base64 DER, from
the publisher's cache) or `{"status": "error", "code", "message", "retry_after", "http_status"}`
(the error body and the HTTP status of the one map in enroll/middleware.py). One bad item fails
only itself; an envelope that is not a list of objects, or too long, is a 400.

One issuance path: each item is parsed and issued by enroll/ra.py's `enroll_device` /
`reenroll_device`, the functions the single endpoints call (`Authority.enroll` / `renew`).
The items run concurrently, so their write blocks queue behind one another and share the
store's group commits (one fsync for up to GROUP_MAX issuances instead of one per HTTPS
request); as for a single call, no certificate is returned before its commit. The path is
under /ra/, so `ra.ra_only` requires the gateway's RA client certificate before any of this runs.
"""
from __future__ import annotations

import asyncio
import base64
import logging

from aiohttp import web

from ca import metrics
from ca.errors import BadRequestError, CAError
from ca.model import check_device_id

from . import ra
from .middleware import HTTP_STATUS, error_fields
from .publication import Publisher
from .state import AUTHORITY, PUBLISHER

log = logging.getLogger(__name__)

# items per batch (the gateway sends gateway/service.py BATCH at most)
BATCH_MAX = 256
# and bytes per batch body: 8 KiB per item on average (a CSR or a CMS renewal with its signer's
# certificate is 0.5 to 4 kB in base64)
BATCH_BODY_MAX = BATCH_MAX * 8 * 1024
OPS = ("simpleenroll", "simplereenroll")


def error_result(exc: CAError) -> dict:
    """A failed item: the single endpoint's JSON error body, and the HTTP status it would have had."""
    return {"status": "error", **error_fields(exc), "http_status": HTTP_STATUS.get(exc.code, 500)}


INTERNAL = {"status": "error", "code": "internal", "message": "internal error; see the server log",
            "retry_after": None, "http_status": 500}


async def read_body(request: web.Request) -> bytes:
    """The request body, up to BATCH_BODY_MAX (the app's `max_body` is for one request, not hundreds)."""
    ra.require_json(request)
    if (request.content_length or 0) > BATCH_BODY_MAX:
        raise web.HTTPRequestEntityTooLarge(max_size=BATCH_BODY_MAX, actual_size=request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > BATCH_BODY_MAX:
            raise web.HTTPRequestEntityTooLarge(max_size=BATCH_BODY_MAX, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


async def batch(request: web.Request) -> web.Response:
    items = ra.parse_json(await read_body(request)).get("requests")
    if not isinstance(items, list) or not 0 < len(items) <= BATCH_MAX:
        got = f" (got {len(items)})" if isinstance(items, list) else ""
        raise BadRequestError(f"field 'requests' must be a list of 1 to {BATCH_MAX} requests{got}")
    if not all(isinstance(item, dict) for item in items):
        raise BadRequestError("every entry of 'requests' must be a JSON object")
    authority, publisher = request.app[AUTHORITY], request.app[PUBLISHER]
    source = ra.relay_source(request)
    results = await asyncio.gather(*(_one(authority, publisher, index, item, source)
                                     for index, item in enumerate(items)))
    issued = sum(1 for r in results if r["status"] == "ok")
    log.info("RA batch of %d: %d issued, %d refused", len(items), issued, len(items) - issued)
    return web.json_response({"results": results})


async def _one(authority, publisher: Publisher, index: int, item: dict, source: str | None = None) -> dict:
    op, device = item.get("op"), item.get("device_id")
    seen = publisher.last_change   # before the issuance: see Publisher.issued
    try:
        if op not in OPS:
            raise BadRequestError(f"field 'op' must be one of {', '.join(OPS)}")
        device_id = check_device_id(device)
        if op == "simpleenroll":
            issued = await ra.enroll_device(authority, device_id, item, source)
        else:
            issued = await ra.reenroll_device(authority, device_id, item)
    except CAError as exc:
        log.info("refused batch item %d op=%r device=%r: %s %s", index, str(op)[:32], str(device)[:64], exc.code, exc)
        metrics.refused(f"batch {op if op in OPS else 'unknown'}", exc.code)
        return error_result(exc)
    except Exception:
        log.exception("internal error on batch item %d op=%r device=%r", index, str(op)[:32], str(device)[:64])
        return dict(INTERNAL)
    result = ra.issued_fields(issued)
    try:
        result["ocsp"] = base64.b64encode(await publisher.issued(issued, seen)).decode()
    except Exception:   # the certificate is committed and goes out; the gateway fetches its OCSP itself
        log.exception("no OCSP response for the new certificate serial=%s", result["serial"])
    return result
