"""`iomtca cert ...` and `iomtca crl` (`iomtca audit ...` is cli/audit_cmds.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ca import views
from ca.authority import Authority, operator
from ca.codec import cert_pem, load_csr
from ca.errors import BadRequestError
from ca.keystore import write_atomic
from ca.model import RevocationReason, parse_serial, serial_hex
from ca.timefmt import to_rfc3339

from .output import print_table


def add_parsers(sub, common) -> None:
    cert = sub.add_parser("cert", help="issue, list and revoke certificates")
    csub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")

    p = csub.add_parser("issue", parents=[common], help="issue a device certificate from a CSR file (PEM or DER)")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--csr", type=Path, required=True)
    p.add_argument("--out", type=Path, help="write certificate + issuing CA (PEM) here instead of stdout")
    p.set_defaults(func=issue)

    p = csub.add_parser("list", parents=[common], help="list certificates")
    p.add_argument("--device", help="only this device's certificates")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_certs)

    reasons = [r.name for r in RevocationReason if r not in (RevocationReason.removeFromCRL,
                                                              RevocationReason.certificateHold)]
    p = csub.add_parser("revoke", parents=[common], help="revoke a certificate for good")
    p.add_argument("serial", metavar="SERIAL", help="serial number in hex")
    p.add_argument("--reason", default="unspecified", help=f"RFC 5280 reason: {', '.join(reasons)}")
    p.set_defaults(func=revoke)

    p = csub.add_parser("hold", parents=[common], help="suspend a certificate (certificateHold)")
    p.add_argument("serial", metavar="SERIAL")
    p.set_defaults(func=hold)

    p = csub.add_parser("release", parents=[common], help="lift a certificateHold")
    p.add_argument("serial", metavar="SERIAL")
    p.set_defaults(func=release)

    p = sub.add_parser("crl", parents=[common], help="sign a fresh CRL (DER)")
    p.add_argument("--out", type=Path, help="write it here instead of stdout")
    p.set_defaults(func=crl)


def _actor() -> str:
    return f"operator:{operator().name}"


async def issue(args) -> int:
    try:
        data = args.csr.read_bytes()
    except FileNotFoundError:
        raise BadRequestError(f"CSR file {args.csr} does not exist") from None
    csr = load_csr(data)
    async with await Authority.open(args.dir) as authority:
        issued = await authority.enroll(args.device_id, csr, operator())
    pem = cert_pem(issued.certificate) + cert_pem(issued.chain[0])
    if args.out:
        write_atomic(args.out, pem)
        print(f"issued certificate {serial_hex(issued.serial)} for {args.device_id}, valid until "
              f"{to_rfc3339(issued.not_after)}; written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(pem.decode())
    return 0


async def list_certs(args) -> int:
    async with await Authority.open(args.dir) as authority:
        records = await authority.certificates(args.device)
    rows = [views.cert_json(r) for r in records]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["serial", "device_id", "profile", "not_after", "status", "reason"])
    return 0


async def revoke(args) -> int:
    reason = RevocationReason.parse(args.reason)
    if reason is RevocationReason.certificateHold:
        raise BadRequestError("use `iomtca cert hold` to put a certificate on hold")
    async with await Authority.open(args.dir) as authority:
        rec = await authority.revoke(parse_serial(args.serial), reason, actor=_actor())
    print(f"revoked {serial_hex(rec.serial)} ({reason.name})")
    return 0


async def hold(args) -> int:
    async with await Authority.open(args.dir) as authority:
        rec = await authority.hold(parse_serial(args.serial), actor=_actor())
    print(f"put {serial_hex(rec.serial)} on hold (certificateHold); `iomtca cert release` lifts it")
    return 0


async def release(args) -> int:
    async with await Authority.open(args.dir) as authority:
        rec = await authority.release(parse_serial(args.serial), actor=_actor())
    print(f"released {serial_hex(rec.serial)}; it is good again")
    return 0


async def crl(args) -> int:
    async with await Authority.open(args.dir) as authority:
        der = await authority.crl()
    if args.out:
        write_atomic(args.out, der)
        print(f"CRL written to {args.out} ({len(der)} bytes)", file=sys.stderr)
    else:
        sys.stdout.buffer.write(der)
    return 0

