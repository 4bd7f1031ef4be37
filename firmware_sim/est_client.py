"""A real EST client (RFC 7030) for HTTP devices: TLS verified against root.pem, Basic auth for
the first enrollment, the current certificate for renewal and for posture (`POST /iomt/v1/posture`,
beside the EST paths), PKCS#7 parsing via enroll.codec."""
from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as x509_ocsp

from enroll import codec

TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)


class ESTError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.code = code or f"http_{status}"   # the server's X-Error-Code when it sent one


class ESTClient:
    """One session (keep-alive) for Basic-auth and unauthenticated calls; mTLS gets its own."""

    def __init__(self, base_url: str, root_pem: Path) -> None:
        self._server = base_url.rstrip("/")
        self._base = self._server + "/.well-known/est"
        self._root = str(root_pem)
        self._session: aiohttp.ClientSession | None = None

    def _context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self._root)
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    async def __aenter__(self) -> "ESTClient":
        self._session = aiohttp.ClientSession(timeout=TIMEOUT,
                                              connector=aiohttp.TCPConnector(ssl=self._context(), limit=64))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def _post(self, op: str, csr: x509.CertificateSigningRequest, *, basic: tuple[str, str] | None = None,
                    session=None):
        body = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
        headers = {"Content-Type": codec.CT_PKCS10}
        if basic is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        s = session or self._session
        async with s.post(f"{self._base}/{op}", data=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise _refusal(resp, data)
            return data, resp.headers.get("Content-Type", "")

    async def cacerts(self) -> list[x509.Certificate]:
        async with self._session.get(f"{self._base}/cacerts") as resp:
            if resp.status != 200:
                raise ESTError(resp.status, (await resp.text()).strip())
            return codec.decode_certs_only(await resp.read())

    async def simpleenroll(self, device_id: str, token: str, csr) -> x509.Certificate:
        data, _ = await self._post("simpleenroll", csr, basic=(device_id, token))
        return codec.decode_certs_only(data)[0]

    async def serverkeygen(self, device_id: str, token: str, csr) -> tuple[bytes, x509.Certificate]:
        data, content_type = await self._post("serverkeygen", csr, basic=(device_id, token))
        return codec.decode_serverkeygen(data, content_type)

    async def simplereenroll(self, cert: Path, key: Path, csr) -> x509.Certificate:
        """Renewal over a fresh connection authenticated by the device's current certificate."""
        connector = aiohttp.TCPConnector(ssl=self._context(cert, key), force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
            data, _ = await self._post("simplereenroll", csr, session=session)
        return codec.decode_certs_only(data)[0]

    async def posture(self, cert: Path, key: Path, posture: dict) -> dict:
        """Report posture (`{"firmware": ...}`) over a fresh mutual-TLS connection with `cert`: the
        certificate proves it is this device, so the CA takes the firmware as proven and counts the
        contact. The server's answer: `{"status": "ok", "device_id", "firmware", "released"}`."""
        connector = aiohttp.TCPConnector(ssl=self._context(cert, key), force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
            async with session.post(f"{self._server}/iomt/v1/posture", data=json.dumps(posture).encode(),
                                    headers={"Content-Type": "application/json"}) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise _refusal(resp, data)
        try:
            answer = json.loads(data)
        except ValueError:
            raise ESTError(resp.status, "posture answer is not JSON") from None
        if not isinstance(answer, dict) or answer.get("status") != "ok":
            raise ESTError(resp.status, f"unexpected posture answer {data[:200]!r}")
        return answer

    async def ocsp(self, url: str, cert: x509.Certificate, issuer: x509.Certificate) -> x509_ocsp.OCSPResponse:
        der = (x509_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
               .public_bytes(serialization.Encoding.DER))
        async with self._session.post(url, data=der, headers={"Content-Type": "application/ocsp-request"}) as resp:
            if resp.status != 200:
                raise ESTError(resp.status, "OCSP responder refused the request")
            return x509_ocsp.load_der_ocsp_response(await resp.read())


def _refusal(resp: aiohttp.ClientResponse, body: bytes) -> ESTError:
    retry = resp.headers.get("Retry-After")
    return ESTError(resp.status, body.decode("utf-8", "replace").strip(),
                    int(retry) if retry and retry.isdigit() else None, resp.headers.get("X-Error-Code"))


def make_csr(key, device_id: str) -> x509.CertificateSigningRequest:
    algorithm = None if key.__class__.__name__.startswith("Ed") else hashes.SHA256()
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)]))
            .sign(key, algorithm))


def ocsp_url(cert: x509.Certificate) -> str | None:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        if desc.access_method == x509.oid.AuthorityInformationAccessOID.OCSP:
            return desc.access_location.value
    return None
