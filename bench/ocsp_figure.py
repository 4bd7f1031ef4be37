"""Figure 4: OCSP responses/s (POST and GET, keep-alive, 8 clients) from `iomtca serve` against
`openssl ocsp` running as a responder over the same certificates, in the same run."""
from __future__ import annotations

import asyncio
import base64
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ca import ocsp as ocsp_mod
from ca.keystore import load_private_key_pem

from .common import Figure, Server, env_passphrase, init_ca
from .seed import seed

NUMBERS = (4,)
CLIENTS = 8


def requests_for(issuer: x509.Certificate, serials: list[int]) -> list[bytes]:
    name_hash, key_hash = ocsp_mod.issuer_hashes(issuer, hashes.SHA1())
    return [ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, s, hashes.SHA1()).build()
            .public_bytes(serialization.Encoding.DER) for s in serials]


async def load(url: str, bodies: list[bytes], seconds: float, method: str = "POST", keepalive: bool = True) -> float:
    """Responses per second from CLIENTS clients (keep-alive unless told), bounded in time."""
    done = 0
    deadline = time.monotonic() + seconds

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        i = k
        while time.monotonic() < deadline:
            body = bodies[i % len(bodies)]
            i += CLIENTS
            if method == "POST":
                ctx = session.post(url, data=body, headers={"Content-Type": "application/ocsp-request"})
            else:
                ctx = session.get(url + "/" + urllib.parse.quote(base64.b64encode(body).decode(), safe=""))
            async with ctx as resp:
                data = await resp.read()
                if resp.status == 200 and data:
                    done += 1

    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=CLIENTS, force_close=not keepalive)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(client(k, session) for k in range(CLIENTS)))
    return done / (time.monotonic() - start)


async def warm(url: str, bodies: list[bytes]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for body in bodies:
            async with session.post(url, data=body, headers={"Content-Type": "application/ocsp-request"}) as r:
                await r.read()


def check_answer(url: str, body: bytes) -> ocsp.OCSPResponse:
    async def one():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.post(url, data=body, headers={"Content-Type": "application/ocsp-request"}) as r:
                return ocsp.load_der_ocsp_response(await r.read())
    return asyncio.run(one())


def openssl_baseline(home: Path, serials: list[int], bodies: list[bytes], work: Path, seconds: float) -> float:
    """`openssl ocsp` as a responder, loaded by the same client. openssl 3.0 can only listen on
    every interface, so it runs in a private network namespace whose only interface is loopback."""
    work.mkdir(parents=True, exist_ok=True)
    pem = (home / "private" / "ocsp-signer.pem").read_bytes()
    key = load_private_key_pem(pem[pem.index(b"-----BEGIN ENCRYPTED"):], env_passphrase(home), "ocsp key")
    key_file = work / "ocsp.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    index = work / "index.txt"
    index.write_text("".join(f"V\t301231235959Z\t\t{format(s, 'X')}\tunknown\t/CN=bench\n" for s in serials))
    (work / "index.txt.attr").write_text("unique_subject = no\n")
    bodies_file = work / "requests.b64"
    bodies_file.write_text("\n".join(base64.b64encode(b).decode() for b in bodies))
    port = 18888
    # `ip` first on its own, so that $! below is openssl itself and `kill` stops it
    script = (f"ip link set lo up || exit 1; openssl ocsp -index {index} -port {port} -rsigner {home / 'ocsp.pem'} "
              f"-rkey {key_file} -CA {home / 'issuing.pem'} -nmin 60 >{work / 'openssl.log'} 2>&1 & "
              f"pid=$!; for i in $(seq 200); do grep -q 'waiting for OCSP' {work / 'openssl.log'} && break; "
              f"sleep 0.05; done; {sys.executable} -m bench.ocsp_figure --client http://127.0.0.1:{port}/ {bodies_file} "
              f"{seconds}; status=$?; kill $pid; wait $pid 2>/dev/null; exit $status")
    out = subprocess.run(["unshare", "--net", "--", "bash", "-c", script], capture_output=True, text=True,
                         timeout=seconds + 60)
    match = re.search(r"rate=([0-9.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"openssl baseline failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    return float(match.group(1))


def client_main(url: str, bodies_file: Path, seconds: float) -> None:
    bodies = [base64.b64decode(line) for line in bodies_file.read_text().splitlines()]
    assert check_answer(url, bodies[0]).certificate_status is ocsp.OCSPCertStatus.GOOD
    # openssl's responder serves one connection at a time and holds it open: one request per connection
    print(f"rate={asyncio.run(load(url, bodies, seconds, keepalive=False)):.1f}", flush=True)


def run(work: Path, quick: bool) -> list[Figure]:
    seconds = 3.0 if quick else 10.0
    home = init_ca(work / "fig4")
    serials = seed(home / "iomtca.db", 1000, 0, (home / "issuing.pem").read_bytes())
    issuer = x509.load_pem_x509_certificate((home / "issuing.pem").read_bytes())
    bodies = requests_for(issuer, serials)
    results = {}
    with Server(home) as server:
        url = f"http://127.0.0.1:{server.http_port}/ocsp"
        assert check_answer(url, bodies[0]).certificate_status is ocsp.OCSPCertStatus.GOOD
        asyncio.run(warm(url, bodies))  # every response signed once, as in a responder that has run a while
        results["ours_post"] = asyncio.run(load(url, bodies, seconds))
        results["ours_get"] = asyncio.run(load(url, bodies, seconds, "GET"))
    results["openssl_post"] = openssl_baseline(home, serials, bodies, work / "fig4-openssl", seconds)
    return [
        Figure(4, "OCSP POST, keep-alive, 8 clients (responses/s)", round(results["ours_post"]),
               round(results["openssl_post"]), "responses/s", "openssl ocsp responder (signs each response)",
               ">= 1.0 x cfssl ocspserve (not measured yet)", None, "python -m bench.run --only 4",
               notes=(f"{seconds:.0f} s of load per figure, load generator on the same 2 cores; openssl's "
                      "responder serves one connection at a time, so it gets one request per connection, "
                      "in a private network namespace (it cannot listen on loopback only)"), runs=results),
        Figure(4, "OCSP GET, keep-alive, 8 clients (responses/s)", round(results["ours_get"]),
               round(results["openssl_post"]), "responses/s", "openssl ocsp responder, POST",
               "-", None, "python -m bench.run --only 4", runs=results),
    ]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--client":
    client_main(sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]))
