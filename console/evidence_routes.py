"""The auditor's evidence export on the console's listener (docs/EVIDENCE.md): the signed JSON
document and CSV, the detached CMS signature of either by the SHA-256 of the bytes an auditor
holds, and the printable page. Every route needs the `export` action (auditor and up) before it
reads anything; every export is audited by the core (ca/evidence.py)."""
from __future__ import annotations

import base64

from aiohttp import web

from ca import evidence
from ca.errors import BadRequestError

from . import api, pages
from .state import AUTHORITY

CONTENT_TYPES = {"json": ("application/json", "json"), "csv": ("text/csv", "csv")}
SIGNATURE_TYPE = "application/pkcs7-signature"   # RFC 8551 3.2.1: a detached signature


def _stamp(document: dict) -> str:
    return document["generated_at"].replace("-", "").replace(":", "")


async def export(request: web.Request) -> web.Response:
    """GET /api/v1/evidence[?format=csv]: a new export. Its signature: GET /api/v1/evidence.sig
    ?sha256=<SHA-256 of the bytes received>; the digest is also in Repr-Digest (RFC 9530)."""
    op = api._operator(request, "export")
    fmt = request.query.get("format", "json")
    if fmt not in CONTENT_TYPES:
        raise BadRequestError(f"format must be one of {', '.join(CONTENT_TYPES)}, not {fmt!r}")
    done = await evidence.export(request.app[AUTHORITY], actor=op.actor, fmt=fmt)
    content_type, suffix = CONTENT_TYPES[fmt]
    digest = base64.b64encode(bytes.fromhex(done.sha256)).decode()
    return web.Response(body=done.body, content_type=content_type, charset="utf-8", headers={
        "Content-Disposition": f'attachment; filename="evidence-{_stamp(done.document)}.{suffix}"',
        "Repr-Digest": f"sha-256=:{digest}:",
    })


async def signature(request: web.Request) -> web.Response:
    """GET /api/v1/evidence.sig?sha256=HEX: the detached CMS signature (DER) of that export."""
    api._operator(request, "export")
    der = await evidence.signature_for(request.app[AUTHORITY], request.query.get("sha256", ""))
    return web.Response(body=der, content_type=SIGNATURE_TYPE, headers={
        "Content-Disposition": 'attachment; filename="evidence.sig"'})


async def page(request: web.Request) -> web.Response:
    """GET /evidence: the printable page of a new export (audited, not signed)."""
    op = api._operator(request, "export")
    rendered: list[web.Response] = []

    def encode(document: dict) -> bytes:
        rendered.append(pages.render(request, "evidence.html", doc=document,
                                     origin=f"{request.scheme}://{request.host}"))
        return rendered[0].body

    await evidence.export(request.app[AUTHORITY], actor=op.actor, fmt="html", encode=encode)
    return rendered[0]


def add_routes(app: web.Application) -> None:
    # no HEAD on the two that export: each GET makes (and audits) a new export
    app.router.add_get("/api/v1/evidence", export, allow_head=False)
    app.router.add_get("/api/v1/evidence.sig", signature)
    app.router.add_get("/evidence", page, allow_head=False)
