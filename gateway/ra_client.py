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
BATCH_TIMEOUT_S = 60   # a batch of a few hundred issuances behind other gateways' batches


class CAUnreachableError(UnavailableError):
    pass


class GatewayRefusedError(CAUnreachableError):
    """The CA refuses this gateway itself (its RA certificate revoked, expired or of no registered
    gateway): not an answer for the device. Its request stays queued, as when the CA is away, for
    this gateway once it is set up anew, or for another gateway of its group."""


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
                if resp.status == 202 or resp.status >= 400:
                    info = _json_or_none(resp, body) or {}
                    if resp.status == 403 and resp.headers.get("X-Refused") == "ra-credential":
                        raise GatewayRefusedError(f"the CA refuses this gateway: {info.get('message', '')} "
                                                  "(revoked? set it up anew: iomtca gateway add / gateway init)")
                    raise refusal(resp.status, info, resp.headers.get("Retry-After"))
                return body if raw else await resp.json(content_type=None)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise CAUnreachableError(f"CA at {self._base} is unreachable: {type(exc).__name__} {exc}") from None

    async def simpleenroll(self, device_id: str, csr_b64: str, token: str, request_id: str) -> dict:
        return await self._call("POST", f"/ra/v1/devices/{device_id}/simpleenroll",
                                json={"csr": csr_b64, "token": token, "request_id": request_id})

    async def simplereenroll(self, device_id: str, cms_b64: str, request_id: str) -> dict:
        return await self._call("POST", f"/ra/v1/devices/{device_id}/simplereenroll",
                                json={"cms": cms_b64, "request_id": request_id})

    async def batch(self, requests: list[dict]) -> list[dict | CAError]:
        """Many enrollments and renewals in one call (POST /ra/v1/batch, at most BATCH_MAX): each
        item `{"op", "device_id", "csr"/"cms", "token", "request_id"}` gets, in order, the `ok`
        answer (a dict, with `ocsp`: the new certificate's OCSP response, base64 DER) or the
        `CAError` its single call would have raised (`PendingApprovalError`, `CAUnreachableError`,
        `RemoteError`). The whole call failing raises as any call does."""
        data = await self._call("POST", "/ra/v1/batch", json={"requests": requests}, timeout=BATCH_TIMEOUT_S)
        results = data["results"]
        if not isinstance(results, list) or len(results) != len(requests):
            raise TypeError(f"batch answer of the wrong shape: {str(data)[:200]}")
        out: list[dict | CAError] = []
        for result in results:
            if not isinstance(result, dict):
                raise TypeError(f"batch result of the wrong shape: {str(result)[:200]}")
            if result.get("status") == "ok":
                out.append(result)
                continue
            status = result.get("http_status")
            status = status if isinstance(status, int) and (status == 202 or status >= 400) else 500
            out.append(refusal(status, result))
        return out

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


def refusal(status: int, info: dict, retry_after_header: str | None = None) -> CAError:
    """The error a refusal of the CA becomes, from its HTTP status (202 or >= 400) and JSON error
    body: the same for a single call and for one item of a batch."""
    if status in (502, 503, 504):
        return CAUnreachableError(f"CA answered {status}")
    if status == 202:
        retry = retry_after_header or info.get("retry_after") or 60
        return PendingApprovalError(info.get("message", "waiting for approval"), retry_after=int(retry))
    return RemoteError(info.get("code", "unavailable"), info.get("message", f"CA answered {status}"),
                       info.get("retry_after"))


def _json_or_none(resp: aiohttp.ClientResponse, body: bytes):
    if resp.content_type != "application/json":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None
