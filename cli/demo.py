"""`make demo` (until the fleet simulator lands): a CA, a few devices, issuance and revocation,
each step a real command, judged by openssl.

Usage: python -m cli.demo --dir demo-data
"""
from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ca.authority import Authority

MARKER = ".iomtca-demo"
ASSETS = """device_id,model,owner,location,criticality,firmware,manufacturer,udi
pump-0001,infusion-pump,ICU,ICU bed 1,high,12.1.2,Acme Medical,(01)00844588003288(10)LOT42
pump-0002,infusion-pump,ICU,ICU bed 2,high,12.1.2,Acme Medical,
mon-0003,patient-monitor,Emergency,ED bay 3,medium,M.00.03,Vitals Inc,
vent-0004,ventilator,ICU,ICU bed 4,high,2.0.1,Breath Co,
ct-0005,imaging-ct,Radiology,CT room 1,low,VB20,Imaging AG,
"""


def sh(*argv: str, capture: bool = False) -> str:
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"demo: step failed: {argv[0]} exited {proc.returncode}")
    if not capture and proc.stdout.strip():
        print("  " + proc.stdout.strip().replace("\n", "\n  "))
    return proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("demo-data"))
    args = parser.parse_args(argv)
    data = args.dir.resolve()
    if data.exists():
        if not (data / MARKER).exists():
            raise SystemExit(f"demo: {data} exists and was not made by the demo; choose another --dir")
        shutil.rmtree(data)
    data.mkdir(parents=True)
    (data / MARKER).write_text("made by make demo; deleted by the next run\n")
    home, work = data / "ca", data / "devices"
    work.mkdir()
    iomtca = str(Path(sys.executable).with_name("iomtca"))

    print("== 1. initialise the CA")
    sh(iomtca, "init", "--dir", str(home), "--trust-domain", "demo-hospital.test")
    print("\n== 2. onboard devices from the asset list")
    (work / "assets.csv").write_text(ASSETS)
    sh(iomtca, "device", "import", str(work / "assets.csv"), "--tokens-out", str(work / "tokens.csv"),
       "--dir", str(home))
    print("\n== 3. each device makes its key and CSR; the CA issues from the registry")
    ids = [line.split(",")[0] for line in ASSETS.splitlines()[1:]]
    for device_id in ids:
        key, csr, cert = (work / f"{device_id}.{ext}" for ext in ("key", "csr", "pem"))
        sh("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", str(key), "-subj", "/CN=whatever-the-device-says", "-out", str(csr), capture=True)
        sh(iomtca, "cert", "issue", device_id, "--csr", str(csr), "--out", str(cert), "--dir", str(home))
        sh("openssl", "verify", "-CAfile", str(home / "root.pem"), "-untrusted", str(home / "issuing.pem"),
           str(cert))
    sh("openssl", "x509", "-in", str(work / "pump-0001.pem"), "-noout", "-subject", "-ext", "subjectAltName")

    print("\n== 4. retire a device and show every verifier sees it")
    sh(iomtca, "device", "decommission", "vent-0004", "--dir", str(home))
    crl = work / "crl.der"
    sh(iomtca, "crl", "--out", str(crl), "--dir", str(home))
    sh("openssl", "crl", "-inform", "DER", "-in", str(crl), "-CAfile", str(home / "chain.pem"), "-noout", "-verify")
    for device_id in ("pump-0001", "vent-0004"):
        req, resp = work / f"{device_id}.ocsp-req", work / f"{device_id}.ocsp-resp"
        sh("openssl", "ocsp", "-issuer", str(home / "issuing.pem"), "-cert", str(work / f"{device_id}.pem"),
           "-reqout", str(req), capture=True)
        resp.write_bytes(asyncio.run(_answer(home, req.read_bytes())))
        print("  (answered in-process by Authority.ocsp: the HTTP responder is not built yet)")
        sh("openssl", "ocsp", "-reqin", str(req), "-respin", str(resp), "-VAfile", str(home / "ocsp.pem"),
           "-CAfile", str(home / "chain.pem"))  # signature, delegation and nonce
        sh("openssl", "ocsp", "-respin", str(resp), "-VAfile", str(home / "ocsp.pem"), "-CAfile",
           str(home / "chain.pem"), "-issuer", str(home / "issuing.pem"), "-cert", str(work / f"{device_id}.pem"),
           "-no_nonce")  # the status of this certificate

    print("\n== 5. registry and audit trail")
    sh(iomtca, "device", "list", "--dir", str(home))
    sh(iomtca, "audit", "verify", "--dir", str(home))
    print(f"\ndemo finished. CA directory: {home}\n  device keys, CSRs, certificates, CRL, OCSP: {work}"
          f"\n  try: {iomtca} cert list --dir {home}")
    return 0


async def _answer(home: Path, request: bytes) -> bytes:
    async with await Authority.open(home) as authority:
        return await authority.ocsp(request)


if __name__ == "__main__":
    sys.exit(main())
