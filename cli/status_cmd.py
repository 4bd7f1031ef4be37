"""`iomtca status`: the service certificates and the CA certificates of a CA directory, and each
active gateway's RA certificate, when each expires and when it will renew, with warnings for
what needs an engineer (read from the files and the database; no passphrase needed)."""
from __future__ import annotations

import json

from ca.config import CAPaths, load_config
from ca.service_certs import active_gateway_certificates, directory_status, validity
from ca.store.sqlite import SQLiteStore
from ca.timefmt import to_rfc3339, utc_now

from .output import print_table


def add_parsers(sub, common) -> None:
    p = sub.add_parser("status", parents=[common],
                       help="service and CA certificates: expiry, renewal, warnings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _row(state, now) -> dict:
    cert = state.cert
    if cert is None:
        return {"name": state.name, "path": str(state.path), "serial": None, "not_after": None,
                "expires_in_s": None, "lifetime_s": None, "renew_at": None, "renewal_due": state.due,
                "renewed_by": state.renewed_by}
    not_after = cert.not_valid_after_utc
    return {
        "name": state.name, "path": str(state.path), "serial": format(cert.serial_number, "x"),
        "subject": cert.subject.rfc4514_string(),
        "not_before": to_rfc3339(cert.not_valid_before_utc), "not_after": to_rfc3339(not_after),
        "expires_in_s": int((not_after - now).total_seconds()),
        "lifetime_s": int(validity(cert).total_seconds()),
        "renew_at": to_rfc3339(state.renew_at) if state.renew_at else None,
        "renewal_due": state.due, "renewed_by": state.renewed_by,
    }


def _when(row: dict) -> str:
    if row["renewed_by"] is None:
        return "by hand"
    if row["renewal_due"]:
        return f"due now ({row['renewal_due']}), by {row['renewed_by']}"
    return f"{row['renew_at']} by {row['renewed_by']}"


def _left(seconds: int | None) -> str:
    """Time left in its two largest units (89d23h, 4h12m, 12s)."""
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "expired"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])


async def run(args) -> int:
    paths = CAPaths(args.dir)
    config = load_config(paths)
    now = utc_now()
    store = await SQLiteStore.open(config.database)
    try:
        gateway_certs = await active_gateway_certificates(store)
    finally:
        await store.close()
    states = directory_status(paths, config, now, gateway_certs)
    rows = [_row(s, now) for s in states]
    warnings = [s.warning for s in states if s.warning]
    if args.json:
        print(json.dumps({"home": str(paths.home), "now": to_rfc3339(now), "certificates": rows,
                          "warnings": warnings}, indent=2))
        return 0
    print(f"CA directory {paths.home} (trust domain {config.trust_domain}), now {to_rfc3339(now)}")
    print_table([{"certificate": r["name"], "serial": r["serial"], "not_after": r["not_after"],
                  "expires_in": _left(r["expires_in_s"]), "renews": _when(r)} for r in rows],
                ["certificate", "serial", "not_after", "expires_in", "renews"])
    for warning in warnings:
        print(f"WARNING: {warning}")
    return 0
