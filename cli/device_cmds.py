"""`iomtca device ...`: onboarding, listing and retiring devices."""
from __future__ import annotations

import csv
import io
import json
import sys
from datetime import datetime
from pathlib import Path

from ca import views
from ca.assets import read_asset_csv
from ca.authority import Authority, operator
from ca.errors import BadRequestError
from ca.keystore import write_atomic
from ca.model import CertStatus, Device, Token, serial_hex
from ca.registry import new_device
from ca.timefmt import parse_duration, to_rfc3339, utc_now

from .output import print_table



def add_parsers(sub, common) -> None:
    device = sub.add_parser("device", help="register, list and retire devices")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")

    p = dsub.add_parser("add", parents=[common], help="register a device and print its one-time token")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--model", required=True)
    p.add_argument("--owner", required=True, help="department or person responsible")
    p.add_argument("--location", default="")
    p.add_argument("--criticality", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--firmware", default="")
    p.add_argument("--manufacturer", default="")
    p.add_argument("--serial-number", default="")
    p.add_argument("--udi", default="", help="UDI as printed on the label, GS1 '(01)...' or HIBCC '+...'")
    p.add_argument("--asset-tag", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=add)

    p = dsub.add_parser("import", parents=[common], help="register devices from an asset-list CSV")
    p.add_argument("file", type=Path, metavar="FILE.csv")
    p.add_argument("--tokens-out", type=Path, help="write device_id,token,expires_at rows here (mode 0600)")
    p.set_defaults(func=import_csv)

    p = dsub.add_parser("list", parents=[common], help="list devices")
    p.add_argument("--json", action="store_true")
    p.add_argument("--expiring", metavar="DURATION", help="only devices whose certificate expires within it, e.g. 7d")
    p.add_argument("--offline", metavar="DURATION", help="only devices not seen for at least it, e.g. 3d")
    p.set_defaults(func=list_devices)

    p = dsub.add_parser("show", parents=[common], help="show one device and its certificates")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=show)

    p = dsub.add_parser("edit", parents=[common], help="correct a device's registry entry (audited)")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--firmware", help="the firmware the device runs, e.g. after a technician updated it")
    p.add_argument("--location")
    p.add_argument("--owner")
    p.add_argument("--criticality", choices=("low", "medium", "high"))
    p.add_argument("--serial-number")
    p.add_argument("--asset-tag")
    p.add_argument("--udi", help="UDI as printed on the label")
    p.add_argument("--manufacturer")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=edit)

    p = dsub.add_parser("token", parents=[common], help="make a fresh one-time token (burns older ones)")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=token)

    p = dsub.add_parser("approve", parents=[common],
                        help="let a device's first enrollment with one waiting key through ([ca.approval])")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--fingerprint", metavar="FP",
                   help="the key's SHA-256 fingerprint as `device pending` shows it (hex, colons optional); "
                        "needed when several keys wait")
    p.set_defaults(func=approve)

    p = dsub.add_parser("pending", parents=[common],
                        help="list enrollments waiting for approval: key type, fingerprint, source, time")
    p.add_argument("device_id", metavar="ID", nargs="?", help="only this device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=pending)

    p = dsub.add_parser("reject", parents=[common],
                        help="drop a device's waiting enrollment requests (all, or one key's)")
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--fingerprint", metavar="FP", help="only the request of this key")
    p.set_defaults(func=reject)

    p = dsub.add_parser("decommission", parents=[common],
                        help="retire a device: revoke its certificates (cessationOfOperation), burn its tokens")
    p.add_argument("device_id", metavar="ID")
    p.set_defaults(func=decommission)


def _token_json(tok: Token) -> dict:
    return {"device_id": tok.device_id, "token": tok.secret, "expires_at": to_rfc3339(tok.expires_at)}


def _print_token(tok: Token, as_json: bool, what: str) -> None:
    if as_json:
        print(json.dumps(_token_json(tok)))
    else:
        print(f"{what} device {tok.device_id}")
        print(f"enrollment token (shown once, single use, expires {to_rfc3339(tok.expires_at)}):")
        print(tok.secret)


async def add(args) -> int:
    device = new_device(args.device_id, model=args.model, owner=args.owner, location=args.location,
                        criticality=args.criticality, firmware=args.firmware, manufacturer=args.manufacturer,
                        serial_number=args.serial_number, udi=args.udi, asset_tag=args.asset_tag)
    async with await Authority.open(args.dir) as authority:
        tok = await authority.registry.add(device, actor=f"operator:{operator().name}")
    _print_token(tok, args.json, "registered")
    return 0


def parse_asset_csv(text: str) -> list[Device]:
    """Validate every row before anything is imported; errors name the line (ca/assets.py)."""
    assets = read_asset_csv(text)
    if assets.ignored_columns:
        print(f"iomtca: ignoring column(s) {', '.join(assets.ignored_columns)}", file=sys.stderr)
    return assets.check()


async def import_csv(args) -> int:
    try:
        text = args.file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"{args.file} is not UTF-8 text: {exc}") from None
    devices = parse_asset_csv(text)
    async with await Authority.open(args.dir) as authority:
        existing = {d.id for d in await authority.devices()}
        clash = [d.id for d in devices if d.id in existing]
        if clash:
            raise BadRequestError(f"already registered, nothing imported: {', '.join(clash[:10])}"
                                  + (" ..." if len(clash) > 10 else ""))
        tokens = await authority.registry.add_many(devices, actor=f"operator:{operator().name}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["device_id", "token", "expires_at"])
    for tok in tokens:
        writer.writerow([tok.device_id, tok.secret, to_rfc3339(tok.expires_at)])
    if args.tokens_out:
        write_atomic(args.tokens_out, out.getvalue().encode(), mode=0o600)
        print(f"imported {len(tokens)} devices; tokens written to {args.tokens_out}")
    else:
        print(f"imported {len(tokens)} devices; one-time tokens follow", file=sys.stderr)
        sys.stdout.write(out.getvalue())
    return 0


def _reported(d: Device) -> str:
    """What unsigned MQTT messages said, for a table cell: labelled, never mixed with proven facts."""
    parts = []
    if d.reported_online is not None:
        parts.append(f"{'online' if d.reported_online else 'offline'} {views.ts(d.reported_online_at)}")
    if d.reported_firmware:
        parts.append(f"fw {d.reported_firmware}")
    return f"{', '.join(parts)} (unverified)" if parts else ""


# `device show` labels: what is unverified says so
_LABELS = {"firmware": "firmware", "last_proven_contact": "last proven contact",
           "reported_online": "reported online (unverified)", "reported_online_at": "reported at (unverified)",
           "reported_firmware": "reported firmware (unverified)",
           "reported_posture_at": "reported posture at (unverified)", "clone_suspected_at": "CLONE SUSPECTED at"}


async def list_devices(args) -> int:
    now = utc_now()
    expiring = parse_duration(args.expiring) if args.expiring else None
    offline = parse_duration(args.offline) if args.offline else None
    async with await Authority.open(args.dir) as authority:
        devices = await authority.devices()
        current: dict[str, datetime] = {}
        for rec in await authority.certificates():
            if rec.device_id and rec.status is CertStatus.GOOD:
                current[rec.device_id] = max(rec.not_after, current.get(rec.device_id, rec.not_after))
    rows = []
    for d in devices:
        expires = current.get(d.id)
        if expiring is not None and (expires is None or expires > now + expiring):
            continue
        # never in proven contact: count from registration
        if offline is not None and (d.last_proven_contact or d.created_at) > now - offline:
            continue
        row = views.device_json(d, expires)
        row["reported"] = _reported(d)
        row["clone"] = "SUSPECTED" if d.clone_suspected_at else ""
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["device_id", "model", "owner", "location", "criticality", "status", "firmware",
                           "last_proven_contact", "reported", "clone", "cert_not_after"])
    return 0


async def show(args) -> int:
    async with await Authority.open(args.dir) as authority:
        device = await authority.registry.get(args.device_id)
        certs = await authority.certificates(args.device_id)
    good = [c.not_after for c in certs if c.status is CertStatus.GOOD]
    info = views.device_json(device, max(good) if good else None)
    info["certificates"] = [
        {"serial": serial_hex(c.serial), "not_after": to_rfc3339(c.not_after), "status": c.status.value}
        for c in certs]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "certificates":
            print(f"{_LABELS.get(key, key):32} {value if value not in (None, '') else '-'}")
    print("certificates:")
    print_table(info["certificates"], ["serial", "not_after", "status"], indent="  ")
    return 0


async def edit(args) -> int:
    changes = {name: getattr(args, name) for name in ("firmware", "location", "owner", "criticality",
                                                      "serial_number", "asset_tag", "udi", "manufacturer", "model")
               if getattr(args, name) is not None}
    if not changes:
        raise BadRequestError("nothing to change: give at least one of --firmware, --location, --owner, "
                              "--criticality, --serial-number, --asset-tag, --udi, --manufacturer, --model")
    async with await Authority.open(args.dir) as authority:
        device = await authority.edit_device(args.device_id, changes, actor=f"operator:{operator().name}")
    if args.json:
        print(json.dumps(views.device_json(device, None), indent=2))
    else:
        print(f"updated device {device.id}: {', '.join(sorted(changes))}")
    return 0


async def token(args) -> int:
    async with await Authority.open(args.dir) as authority:
        tok = await authority.registry.new_token(args.device_id, actor=f"operator:{operator().name}")
    _print_token(tok, args.json, "new token for")
    return 0


async def decommission(args) -> int:
    async with await Authority.open(args.dir) as authority:
        revoked = await authority.decommission(args.device_id, actor=f"operator:{operator().name}")
    print(f"decommissioned device {args.device_id}; revoked {len(revoked)} certificate(s)"
          " with cessationOfOperation; its tokens no longer work")
    for serial in revoked:
        print(f"  {serial_hex(serial)}")
    return 0


async def approve(args) -> int:
    async with await Authority.open(args.dir) as authority:
        approved = await authority.approve(args.device_id, args.fingerprint, actor=f"operator:{operator().name}")
    print(f"approved key {approved.key_type} {approved.fingerprint} of device {approved.device_id} "
          f"(from {approved.source or '-'}, first seen {to_rfc3339(approved.requested_at)})")
    print("its next enrollment with this key gets its certificate; any other key waits again")
    return 0


async def pending(args) -> int:
    async with await Authority.open(args.dir) as authority:
        rows = [views.approval_json(r) for r in await authority.pending_approvals(args.device_id)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["device_id", "key_type", "fingerprint", "source", "requested_at", "last_seen_at",
                           "state"])
    return 0


async def reject(args) -> int:
    async with await Authority.open(args.dir) as authority:
        dropped = await authority.reject_approval(args.device_id, args.fingerprint,
                                                  actor=f"operator:{operator().name}")
    print(f"dropped {len(dropped)} waiting request(s) of device {args.device_id}; a key that asks again waits again")
    for r in dropped:
        print(f"  {r.describe()}")
    return 0
