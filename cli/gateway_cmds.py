"""`iomtca gateway ...`: register gateways at the CA, set one up on its own host, and run it.

On the CA host (--dir CADIR):  gateway add NAME, gateway list, gateway revoke NAME
On the gateway host (--dir GWDIR): gateway init ..., gateway run
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from common.errors import ConfigError
from common.timefmt import to_rfc3339

from .output import print_table

TOKEN_ENV = "IOMTCA_GATEWAY_TOKEN"


def add_parsers(sub, common) -> None:
    gw = sub.add_parser("gateway", help="gateways (registration authorities): register, set up, run")
    cmds = gw.add_subparsers(dest="gateway_command", required=True, metavar="SUBCOMMAND")

    p = cmds.add_parser("add", parents=[common], help="register a gateway at the CA; prints its one-time token")
    p.add_argument("name", help="the gateway's name (letters, digits, '.', '_', '-'), e.g. ward-3-gw")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=add)

    p = cmds.add_parser("list", parents=[common], help="registered gateways and their RA certificates")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_cmd)

    p = cmds.add_parser("revoke", parents=[common],
                        help="revoke a gateway for good: its RA certificates are revoked and the RA API refuses it")
    p.add_argument("name")
    p.add_argument("--reason", default="cessationOfOperation",
                   help="RFC 5280 reason for its certificates (default cessationOfOperation; keyCompromise if stolen)")
    p.set_defaults(func=revoke)

    p = cmds.add_parser("init", parents=[common],
                        help="on the gateway host: make the RA key, enroll with the token, write GWDIR")
    p.add_argument("--ca", dest="ca_url", required=True, metavar="URL", help="the CA's HTTPS URL, https://HOST:PORT")
    p.add_argument("--root", type=Path, required=True, metavar="ROOT.pem",
                   help="the CA's root certificate (root.pem of the CA directory), brought over out of band")
    p.add_argument("--name", required=True, help="the name given to `iomtca gateway add`")
    p.add_argument("--token", metavar="TOKEN|-",
                   help=f"the one-time token; '-' reads it from stdin (default: ${TOKEN_ENV}). A token typed "
                        "here is visible to other users of the host until it is spent")
    p.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT or mqtts://HOST:PORT, written to gateway.toml")
    p.add_argument("--key-type", default="ec-p256", choices=("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519"))
    p.set_defaults(func=init)

    p = cmds.add_parser("run", parents=[common], help="run the MQTT gateway from its own directory (GWDIR)")
    p.add_argument("--broker", metavar="URL", help="mqtt:// or mqtts:// URL (default from gateway.toml)")
    p.add_argument("--ca", dest="ca_url", metavar="URL", help="the CA's HTTPS URL (default from gateway.toml)")
    p.add_argument("--client-id", help="MQTT client id (default iomtca-gateway-NAME)")
    p.add_argument("--share-group", help="MQTT 5 shared-subscription group, for several gateways on one broker")
    p.add_argument("--no-publish-pki", dest="publish_pki", action="store_const", const=False, default=None,
                   help="leave CRL/OCSP publication to another gateway of the group")
    # file options are made absolute here; relative ones in gateway.toml are under GWDIR
    p.add_argument("--broker-ca", metavar="FILE", type=lambda v: Path(v).absolute(),
                   help="the broker's CA certificate(s), PEM (mqtts:// only; default: the system's)")
    p.add_argument("--broker-cert", metavar="FILE", type=lambda v: Path(v).absolute(),
                   help="client certificate for the broker, PEM (mqtts:// only; with --broker-key)")
    p.add_argument("--broker-key", metavar="FILE", type=lambda v: Path(v).absolute(),
                   help="its key, PEM; if encrypted, the passphrase comes from $IOMTCA_BROKER_KEY_PASSPHRASE")
    p.add_argument("--broker-username", metavar="NAME",
                   help="broker user name; the password comes from $IOMTCA_BROKER_PASSWORD or --broker-password-file")
    p.add_argument("--broker-password-file", metavar="FILE", type=lambda v: Path(v).absolute(),
                   help="file holding the broker password (mode 0600; never a password on the command line)")
    p.set_defaults(func=run, log_level=logging.INFO)


def _actor() -> str:
    from ca.authority import operator
    return f"operator:{operator().name}"


async def add(args) -> int:
    from ca import gateways
    from ca.authority import Authority
    async with await Authority.open(args.dir) as authority:
        token = await gateways.register(authority, args.name, actor=_actor())
        root = authority.paths.root_cert
    if args.json:
        print(json.dumps({"name": token.name, "token": token.secret, "expires_at": to_rfc3339(token.expires_at),
                          "root": str(root)}))
    else:
        print(f"registered gateway {token.name}")
        print(f"one-time token (shown once, single use, expires {to_rfc3339(token.expires_at)}):")
        print(token.secret)
        print(f"on the gateway host, with {root} copied there:")
        print(f"  {TOKEN_ENV}=<token> iomtca gateway init --dir GWDIR --ca https://CA-HOST:PORT "
              f"--root root.pem --name {token.name}")
    return 0


def _row(g) -> dict:
    return {"name": g.name, "status": g.status.value, "created_at": to_rfc3339(g.created_at),
            "created_by": g.created_by, "enrolled_at": g.enrolled_at and to_rfc3339(g.enrolled_at),
            "revoked_at": g.revoked_at and to_rfc3339(g.revoked_at),
            "serial": None if g.serial is None else format(g.serial, "x"),
            "not_after": g.not_after and to_rfc3339(g.not_after),
            "token_expires_at": g.token_expires_at and to_rfc3339(g.token_expires_at)}


async def list_cmd(args) -> int:
    from ca import gateways
    from ca.authority import Authority
    async with await Authority.open(args.dir) as authority:
        rows = [_row(g) for g in await gateways.list_gateways(authority)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["name", "status", "serial", "not_after", "enrolled_at", "revoked_at"])
    return 0


async def revoke(args) -> int:
    from ca import gateways
    from ca.authority import Authority
    from ca.model import RevocationReason
    reason = RevocationReason.parse(args.reason)
    async with await Authority.open(args.dir) as authority:
        serials = await gateways.revoke(authority, args.name, actor=_actor(), reason=reason)
    listed = ", ".join(format(s, "x") for s in serials) or "none unexpired"
    print(f"revoked gateway {args.name}; RA certificate(s) revoked: {listed}")
    return 0


def _token(args) -> str:
    if args.token == "-":
        return sys.stdin.readline().strip()
    if args.token:
        return args.token
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value:
        raise ConfigError(f"no gateway token: set ${TOKEN_ENV}, or pass --token - and give it on stdin")
    return value


async def init(args) -> int:
    from gateway.setup import init_gateway
    result = await init_gateway(args.dir, ca_url=args.ca_url, root=args.root, name=args.name, token=_token(args),
                                broker=args.broker, key_type=args.key_type)
    h = result.home
    print(f"gateway {args.name} set up in {h.home}")
    print(f"  RA certificate:   {h.ra_cert} (serial {result.serial:x}, until {result.not_after}; renews itself)")
    print(f"  trust anchor:     {h.root_cert}")
    print(f"  RA key:           {h.ra_key} (encrypted, mode 0600)")
    if result.passphrase_file:
        print(f"  key passphrase:   {result.passphrase_file} (mode 0600; in production set IOMTCA_GATEWAY_PASSPHRASE "
              "from a secret store and delete the file)")
    else:
        print("  key passphrase:   taken from IOMTCA_GATEWAY_PASSPHRASE (not written to disk)")
    print(f"  settings:         {h.config}")
    print(f"run it with: iomtca gateway run --dir {h.home}")
    return 0


async def run(args) -> int:
    from gateway.main import run_gateway
    await run_gateway(args.dir, broker=args.broker, ca_url=args.ca_url, client_id=args.client_id,
                      publish_pki=args.publish_pki, share_group=args.share_group,
                      broker_ca=args.broker_ca, broker_cert=args.broker_cert, broker_key=args.broker_key,
                      broker_username=args.broker_username, broker_password_file=args.broker_password_file)
    return 0
