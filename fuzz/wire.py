"""Seeded mutated requests against a real `iomtca serve`: every listener, no 5xx, no traceback.

    python -m fuzz.wire [--requests 100000] [--seed 1] [--concurrency 16] [--max-seconds 900]

A fresh CA directory (`iomtca init`), a gateway enrolled as an operator enrolls one (`gateway add`,
`gateway init`: its RA certificate opens the RA API), devices registered with `device add`, then
the server on free loopback ports. Requests are drawn from a seeded generator: EST (simpleenroll,
serverkeygen, simplereenroll, cacerts, csrattrs, with mutated bodies, content types, Basic headers
and labels), the RA API with the RA certificate (single calls and the batch, mutated JSON and
device ids), gateway enrollment, OCSP (POST and GET) and the CRL on the plain-HTTP listener, the
console's admin API (an engineer's API token, mutated tokens, query strings, ids and JSON bodies)
and login form, and random paths. Afterwards: counts per status, the 5xx (must be 0), tracebacks and ERROR lines in the
server's log (must be 0), and a real enrollment that must still work. Exit status 1 otherwise.
`make fuzz` runs 100,000; the suite runs a few hundred (tests/fuzz/test_wire.py).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import free_port

from .seeds import seeds

ROOT = Path(__file__).resolve().parent.parent
IOMTCA = str(Path(sys.executable).with_name("iomtca"))
DEVICES = 40


def _run(*args: str, input: str | None = None) -> str:
    return subprocess.run([IOMTCA, *args], check=True, capture_output=True, text=True, timeout=120,
                          input=input).stdout


class Mutator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def bytes(self, data: bytes) -> bytes:
        out, rng = bytearray(data), self.rng
        for _ in range(rng.choice((0, 1, 1, 2, 3, 8))):
            if not out:
                out.append(rng.randrange(256))
                continue
            at, kind = rng.randrange(len(out)), rng.randrange(5)
            if kind == 0:
                out[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                out[at] = rng.randrange(256)
            elif kind == 2:
                del out[at:at + rng.randrange(1, 16)]
            elif kind == 3:
                out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
            else:
                del out[at:]
        return bytes(out)

    def text(self, value: str) -> str:
        return self.bytes(value.encode()).decode("latin-1")

    def json(self, value):
        """A JSON value with a field dropped, replaced by another type, or its string mutated."""
        rng = self.rng
        if isinstance(value, dict) and value and rng.random() < 0.7:
            value = dict(value)
            key = rng.choice(list(value))
            choice = rng.randrange(4)
            if choice == 0:
                del value[key]
            elif choice == 1:
                value[key] = rng.choice([None, 0, -1, 2 ** 70, True, [], {}, "", "x" * 5000, 1.5])
            else:
                value[key] = self.json(value[key])
            return value
        if isinstance(value, list) and value:
            return [self.json(v) if rng.random() < 0.3 else v for v in value][: rng.randrange(len(value) + 2)]
        if isinstance(value, str):
            return self.text(value)
        return value


class Fleet:
    """The CA, its gateway (RA credential) and devices, in a temporary directory."""

    def __init__(self, work: Path) -> None:
        self.work, self.home, self.gw = work, work / "ca", work / "gateway"
        _run("init", "--dir", str(self.home), "--base-url", "http://127.0.0.1:8080")
        config = self.home / "config.toml"
        text = config.read_text()
        # one source sends everything here: the failure limits would answer 429 to most of it
        limits = "source_failures = 100000000\ndevice_source_failures = 100000000\n"
        config.write_text(text.replace("[enroll]\n", "[enroll]\n" + limits, 1)
                          if "[enroll]\n" in text else text + "\n[enroll]\n" + limits)
        assets, tokens = work / "devices.csv", work / "tokens.csv"
        assets.write_text("device_id,model,owner\n" + "".join(f"fuzz-{i:03d},infusion-pump,icu\n" for i in range(DEVICES)))
        _run("device", "import", str(assets), "--tokens-out", str(tokens), "--dir", str(self.home))
        rows = [line.split(",") for line in tokens.read_text().splitlines()[1:]]
        self.tokens = {row[0]: row[1] for row in rows}
        assert len(self.tokens) == DEVICES, tokens.read_text()[:500]
        self.est_port, self.http_port, self.console_port = free_port(), free_port(), free_port()
        _run("operator", "add", "fuzz-engineer", "--role", "engineer", "--password-stdin", "--dir", str(self.home),
             input="fuzz-engineer-password\n")
        self.api_token = json.loads(_run("operator", "token", "fuzz-engineer", "--json", "--dir", str(self.home)))["token"]
        self.log_path = work / "serve.log"

    def start(self) -> subprocess.Popen:
        log = open(self.log_path, "w")
        proc = subprocess.Popen([IOMTCA, "serve", "--dir", str(self.home), "--listen", f"127.0.0.1:{self.est_port}",
                                 "--http-listen", f"127.0.0.1:{self.http_port}", "--console-listen",
                                 f"127.0.0.1:{self.console_port}"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
        line = proc.stdout.readline()
        if "listening" not in line:
            proc.kill()
            raise RuntimeError(f"iomtca serve did not start: {line!r}; see {self.log_path}")
        added = json.loads(_run("gateway", "add", "fuzz-gw", "--json", "--dir", str(self.home)))
        _run("gateway", "init", "--dir", str(self.gw), "--ca", self.url, "--root", str(self.home / "root.pem"),
             "--name", "fuzz-gw", "--token", "-", input=added["token"] + "\n")
        return proc

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.est_port}"

    def context(self, ra: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.home / "root.pem"))
        if ra:
            passphrase = (self.gw / "private" / "passphrase").read_text().strip()
            ctx.load_cert_chain(self.gw / "ra.pem", self.gw / "private" / "ra.key", password=passphrase)
        return ctx


class Requests:
    """The seeded request generator: (method, url, headers, body, which session)."""

    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        self.fleet, self.rng, self.m = fleet, rng, Mutator(rng)
        self.seeds = seeds()
        self.http = f"http://127.0.0.1:{fleet.http_port}"

    def basic(self) -> str:
        rng, m = self.rng, self.m
        device = rng.choice(list(self.fleet.tokens))
        user, token = device, self.fleet.tokens[device]
        roll = rng.random()
        if roll < 0.2:
            token = m.text(token)
        elif roll < 0.3:
            user = m.text(user)
        elif roll < 0.35:
            user = rng.choice(["nobody\nINJECTED", "x" * 300, "", "../etc", "dev\x00ice", "pump-0001"])
        value = "Basic " + base64.b64encode(f"{user}:{token}".encode("utf-8", "replace")).decode()
        return m.text(value) if rng.random() < 0.05 else value

    def est(self):
        rng, m = self.rng, self.m
        op = rng.choice(["simpleenroll", "simpleenroll", "serverkeygen", "simplereenroll", "cacerts", "csrattrs",
                         "fullcmc"])
        label = rng.choice(["", "", "", "device/", "nolabel/", m.text("lbl") + "/"])
        url = f"{self.fleet.url}/.well-known/est/{label}{op}"
        if op in ("cacerts", "csrattrs"):
            return "GET", url, {}, None, False
        body = rng.choice(self.seeds["est_csr_body"])
        if rng.random() < 0.8:
            body = m.bytes(body) if rng.random() < 0.5 else base64.encodebytes(m.bytes(
                base64.b64decode(b"".join(body.split())) if not body.startswith(b"-----") else body))
        headers = {"Content-Type": rng.choice(["application/pkcs10"] * 6 + ["text/plain", "", "application/pkcs10; x=" + "y" * 50])}
        if rng.random() < 0.9:
            headers["Authorization"] = self.basic()
        return "POST", url, headers, body, False

    def ra(self):
        rng, m = self.rng, self.m
        device = rng.choice(list(self.fleet.tokens))
        if rng.random() < 0.15:
            device = rng.choice([m.text(device), "%0aINJ", "a" * 200, "..", "dev%00x"])
        body = json.loads(rng.choice(self.seeds["ra_json"]))
        if "requests" in body:
            for item in body["requests"]:
                item["device_id"] = device if rng.random() < 0.5 else rng.choice(list(self.fleet.tokens))
                item["token"] = self.fleet.tokens.get(item["device_id"], "x")
            path = "/ra/v1/batch"
        else:
            body["token"] = self.fleet.tokens.get(device, "x")
            path = f"/ra/v1/devices/{device}/" + rng.choice(["simpleenroll", "simplereenroll", "presence", "posture",
                                                             "reported-posture"])
        if rng.random() < 0.6:
            body = m.json(body)
        raw = json.dumps(body).encode()
        if rng.random() < 0.2:
            raw = m.bytes(raw)
        if rng.random() < 0.1:
            path = rng.choice(["/ra/v1/status-changes?after=" + m.text("12"), "/ra/v1/certificates?after=" + m.text("ab"),
                               "/ra/v1/ocsp/" + m.text("abcdef"), "/ra/v1/cacerts", "/ra/v1/csrattrs"])
            return "GET", self.fleet.url + path, {}, None, True
        return "POST", self.fleet.url + path, {"Content-Type": "application/json"}, raw, True

    def gateway_enroll(self):
        rng, m = self.rng, self.m
        name = rng.choice(["fuzz-gw", "other", m.text("fuzz-gw"), "x" * 100])
        body = m.bytes(json.dumps({"token": "t" * 32, "csr": base64.b64encode(self.seeds["csr_der"][0]).decode()}).encode())
        return "POST", f"{self.fleet.url}/iomt/v1/gateways/{name}/enroll", {"Content-Type": "application/json"}, body, False

    def ocsp(self):
        rng, m = self.rng, self.m
        der = m.bytes(rng.choice(self.seeds["ocsp_request"]))
        if rng.random() < 0.5:
            return "POST", f"{self.http}/ocsp", {"Content-Type": rng.choice(["application/ocsp-request"] * 5 + ["x/y"])}, der, False
        path = base64.b64encode(der).decode()
        return "GET", f"{self.http}/ocsp/{m.text(path) if rng.random() < 0.3 else path}", {}, None, False

    def console(self):
        """The admin API with the engineer's token (or a mutated one), and the login form."""
        rng, m = self.rng, self.m
        base = f"https://127.0.0.1:{self.fleet.console_port}"
        token = self.fleet.api_token if rng.random() < 0.85 else m.text(self.fleet.api_token)
        headers = {"Authorization": f"Bearer {token}" if rng.random() < 0.95 else m.text("Bearer x")}
        device = rng.choice(list(self.fleet.tokens))
        if rng.random() < 0.2:
            device = rng.choice([m.text(device), "%0aINJ", "a" * 200, "..", "dev%00x"])
        roll = rng.random()
        if roll < 0.45:
            path = rng.choice(["/api/v1/devices?" + m.text("q=fuzz&limit=5&offset=1&status=active"),
                               f"/api/v1/devices/{device}", "/api/v1/certificates?device=" + device,
                               "/api/v1/audit?" + m.text("device=fuzz-001&limit=3"), "/api/v1/me",
                               "/api/v1/changes?" + m.text("after=10&limit=7"), "/api/v1/approvals",
                               "/api/v1/openapi.json", "/devices?" + m.text("q=a"), "/"])
            return "GET", base + path, headers, None, False
        if roll < 0.75:
            rows = [{"device_id": f"fuzz-{rng.randrange(DEVICES + 20):03d}", "model": "infusion-pump", "owner": "icu",
                     "location": m.text("bed 1")}]
            body = json.dumps(m.json({"devices": rows}) if rng.random() < 0.7 else {"devices": rows}).encode()
            headers["Content-Type"] = rng.choice(["application/json"] * 4 + ["text/csv", "x/y"])
            return "POST", base + "/api/v1/bulk/devices", headers, m.bytes(body) if rng.random() < 0.2 else body, False
        if roll < 0.9:
            serial = m.text("%x" % rng.getrandbits(64))
            headers["Content-Type"] = "application/json"
            body = json.dumps(m.json({"reason": "keyCompromise"})).encode()
            return "POST", f"{base}/api/v1/certificates/{serial}/" + rng.choice(["revoke", "hold", "release"]), headers, body, False
        form = m.bytes(b"nonce=x&name=fuzz-engineer&password=fuzz-engineer-password")
        return "POST", base + "/login", {"Content-Type": "application/x-www-form-urlencoded"}, form, False

    def other(self):
        rng, m = self.rng, self.m
        base = rng.choice([self.fleet.url, self.http])
        path = rng.choice(["/crl", "/ca.pem", "/", "/.well-known/est", "/ra/v1", "/health", "/" + m.text("abc/def")])
        return rng.choice(["GET", "POST", "PUT", "DELETE", "HEAD"]), base + path, {}, m.bytes(b"{}"), False

    def raw(self):
        """Bytes on a TLS connection of their own: a mutated HTTP request line, headers and framing
        (what the HTTP parser sees; a scanner's bread and butter)."""
        rng, m = self.rng, self.m
        body = rng.choice(self.seeds["est_csr_body"])
        head = (f"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/pkcs10\r\n"
                f"Authorization: {self.basic()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        choice = rng.randrange(4)
        if choice == 0:
            data = m.bytes(head) + body
        elif choice == 1:
            data = head.replace(b"Content-Length", b"Transfer-Encoding: chunked\r\nContent-Length") + body
        elif choice == 2:
            data = head[:-2] + b"X-Long: " + b"a" * rng.choice([100, 9000, 70000]) + b"\r\n\r\n" + body
        else:
            data = m.bytes(b"GET /crl HTTP/1.1\r\nHost: x\r\n\r\n")
        return "RAW", None, {}, data, False

    def next(self):
        roll = self.rng.random()
        if roll < 0.03:
            return self.raw()
        for share, make in ((0.36, self.est), (0.58, self.ra), (0.63, self.gateway_enroll), (0.8, self.ocsp),
                            (0.93, self.console)):
            if roll < share:
                return make()
        return self.other()


async def storm(fleet: Fleet, count: int, seed: int, concurrency: int, max_seconds: float) -> collections.Counter:
    rng = random.Random(seed)
    gen = Requests(fleet, rng)
    statuses: collections.Counter = collections.Counter()
    deadline = time.monotonic() + max_seconds
    timeout = aiohttp.ClientTimeout(total=30)
    plain = aiohttp.TCPConnector(ssl=fleet.context(False), limit=concurrency)
    ra = aiohttp.TCPConnector(ssl=fleet.context(True), limit=concurrency)
    async with aiohttp.ClientSession(connector=plain, timeout=timeout) as anon, \
            aiohttp.ClientSession(connector=ra, timeout=timeout) as relay:
        queue: asyncio.Queue = asyncio.Queue(maxsize=concurrency * 2)

        async def worker() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    return
                method, url, headers, body, as_ra = item
                if method == "RAW":
                    statuses[await raw(fleet, body)] += 1
                    continue
                try:
                    async with (relay if as_ra else anon).request(method, url, headers=headers, data=body,
                                                                  skip_auto_headers=["Content-Type"]) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                        if resp.status >= 500:
                            statuses[f"5xx {method} {url[:80]}"] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    statuses[f"client error {type(exc).__name__}"] += 1

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        sent = 0
        while sent < count and time.monotonic() < deadline:
            await queue.put(gen.next())
            sent += 1
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    statuses["sent"] = sent
    return statuses


async def raw(fleet: Fleet, data: bytes):
    """Send `data` on its own TLS connection; the status of the answer, or what happened instead."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", fleet.est_port, ssl=fleet.context(False)), 10)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
        return f"raw connect {type(exc).__name__}"
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        line = b""
    finally:
        writer.close()
    parts = line.split()
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return "raw no answer (closed)"


async def real_enrollment(fleet: Fleet) -> int:
    """A fresh device enrolls over EST afterwards: the server still does its job."""
    from cryptography.hazmat.primitives import serialization

    from ca.signer import generate_key
    from firmware_sim.est_client import make_csr
    token = json.loads(_run("device", "add", "fuzz-after", "--model", "m", "--owner", "o", "--json", "--dir",
                            str(fleet.home)))["token"]
    body = base64.encodebytes(make_csr(generate_key("ec-p256"), "fuzz-after").public_bytes(serialization.Encoding.DER))
    auth = "Basic " + base64.b64encode(f"fuzz-after:{token}".encode()).decode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fleet.context(False))) as session:
        async with session.post(f"{fleet.url}/.well-known/est/simpleenroll", data=body,
                                headers={"Content-Type": "application/pkcs10", "Authorization": auth}) as resp:
            await resp.read()
            return resp.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("IOMTCA_FUZZ_SEED", "1")))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="iomtca-fuzzwire-"))
    fleet = Fleet(work)
    proc = fleet.start()
    try:
        started = time.monotonic()
        statuses = asyncio.run(storm(fleet, args.requests, args.seed, args.concurrency, args.max_seconds))
        elapsed = time.monotonic() - started
        after = asyncio.run(real_enrollment(fleet))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = fleet.log_path.read_text(errors="replace")
    tracebacks = log.count("Traceback")
    errors = sum(1 for line in log.splitlines() if " ERROR " in line)
    five = sum(n for k, n in statuses.items() if isinstance(k, int) and k >= 500)
    codes = ", ".join(f"{k}: {n}" for k, n in sorted((k, n) for k, n in statuses.items() if isinstance(k, int)))
    print(f"{statuses['sent']:,} requests (seed {args.seed}) in {elapsed:.1f} s: {codes}")
    for key, n in sorted((k, n) for k, n in statuses.items() if isinstance(k, str) and k != "sent"):
        print(f"  {key}: {n}")
    print(f"5xx: {five}; tracebacks in the server log: {tracebacks}; ERROR lines: {errors}; "
          f"a real enrollment afterwards: {after}")
    ok = five == 0 and tracebacks == 0 and errors == 0 and after == 200
    if not ok or args.keep:
        print(f"server log: {fleet.log_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
