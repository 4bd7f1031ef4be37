"""HTTPS client of the CA's RA API, authenticated with the gateway's RA certificate.

Answers become our types at this boundary: a dict for `ok`, a `CAError` carrying
the CA's code for a refusal, `PendingApprovalError` for 202, and
`CAUnreachableError` when the CA cannot answer now (connection refused, timeout,
502/503/504): the caller queues the request and tries again later.
"""
from __future__ import annotations

import asyncio
import base64
import json
import ssl

import aiohttp

from common.errors import CAError, PendingApprovalError, UnavailableError

TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)


class CAUnreachableError(UnavailableError):
    pass


class RemoteError(CAError):
    """A refusal from the CA, with the CA's own code."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.code = code


class RAClient:
    def __init__(self, base_url: str, ssl_context: ssl.SSLContext) -> None:
        self._base = base_url.rstrip("/")
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._retiring: set[asyncio.Task] = set()   # sessions of a replaced RA certificate, closing

    async def __aenter__(self) -> "RAClient":
        self._session = aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, *, json=None, params=None, raw=False, timeout=None):
        try:
            async with self._session.request(method, self._base + path, json=json, params=params,
                                             timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None
                                             ) as resp:
                body = await resp.read()
                if resp.status in (502, 503, 504):
                    raise CAUnreachableError(f"CA answered {resp.status}")
                if resp.status == 202:
                    info = _json_or_none(resp, body) or {}
                    raise PendingApprovalError(info.get("message", "waiting for approval"),
                                               retry_after=int(resp.headers.get("Retry-After", "60")))
                if resp.status >= 400:
                    info = _json_or_none(resp, body) or {}
                    raise RemoteError(info.get("code", "unavailable"),
                                      info.get("message", f"CA answered {resp.status}"), info.get("retry_after"))
                return body if raw else await resp.json(content_type=None)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise CAUnreachableError(f"CA at {self._base} is unreachable: {type(exc).__name__} {exc}") from None

    async def simpleenroll(self, device_id: str, csr_b64: str, token: str, request_id: str) -> dict:
        return await self._call("POST", f"/ra/v1/devices/{device_id}/simpleenroll",
                                json={"csr": csr_b64, "token": token, "request_id": request_id})

    async def simplereenroll(self, device_id: str, cms_b64: str, request_id: str) -> dict:
        return await self._call("POST", f"/ra/v1/devices/{device_id}/simplereenroll",
                                json={"cms": cms_b64, "request_id": request_id})

    async def cacerts(self) -> dict:
        return await self._call("GET", "/ra/v1/cacerts")

    async def csrattrs(self) -> dict:
        return await self._call("GET", "/ra/v1/csrattrs")

    async def posture(self, device_id: str, cms_b64: str, request_id: str) -> dict:
        """Signed posture (the device's CMS over its posture JSON): the CA verifies it, and only this
        changes the firmware the renewal gate reads, counts as attendance or lifts a hold."""
        return await self._call("POST", f"/ra/v1/devices/{device_id}/posture",
                                json={"cms": cms_b64, "request_id": request_id})

    async def presence(self, device_id: str, online: bool) -> dict:
        """A plain presence message: the CA records it as reported only (it changes no trust)."""
        return await self._call("POST", f"/ra/v1/devices/{device_id}/presence", json={"online": online})

    async def reported_posture(self, device_id: str, posture: dict) -> dict:
        """A plain (unsigned) posture message: recorded as reported, unverified; it changes no trust."""
        return await self._call("POST", f"/ra/v1/devices/{device_id}/reported-posture", json=posture)

    async def status_changes(self, after: int, wait: float) -> dict:
        return await self._call("GET", "/ra/v1/status-changes", params={"after": str(after), "wait": str(wait)},
                                timeout=wait + 15)

    async def certificates(self, after: str = "", limit: int = 1000) -> list[dict]:
        data = await self._call("GET", "/ra/v1/certificates", params={"after": after, "limit": str(limit)})
        return data["certificates"]

    async def ocsp(self, serial_hex: str) -> bytes:
        return await self._call("GET", f"/ra/v1/ocsp/{serial_hex}", raw=True)

    async def ocsp_many(self, serials: list[str]) -> dict[str, bytes]:
        """Serial (hex) -> OCSP response (DER), at most 1,000 serials per call."""
        data = await self._call("POST", "/ra/v1/ocsp", json={"serials": serials}, timeout=120)
        return {serial: base64.b64decode(der) for serial, der in data["responses"].items()}

    async def crl(self) -> bytes:
        return await self._call("GET", "/crl", raw=True)

    async def renew(self, csr_b64: str) -> dict:
        """A new RA certificate for the CSR's key, authenticated by the current one (POST /ra/v1/renew)."""
        return await self._call("POST", "/ra/v1/renew", json={"csr": csr_b64})

    async def use_context(self, ssl_context: ssl.SSLContext, *, retire_after: float = 130.0) -> None:
        """Send new requests with `ssl_context` (a renewed RA certificate). Requests in flight keep
        the old session; it is closed once the longest request timeout here (120 s) has passed."""
        old, self._ssl = self._session, ssl_context
        self._session = aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(ssl=ssl_context))
        if old is None:
            return

        async def retire() -> None:
            try:
                await asyncio.sleep(retire_after)
            finally:   # also when the loop shuts down first
                await old.close()

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def _json_or_none(resp: aiohttp.ClientResponse, body: bytes):
    if resp.content_type != "application/json":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None
