"""`iomtca` entry point: argument parsing, dispatch, and the one error-to-exit-code map."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from ca.errors import CAError, ConfigError
from common import logsafe
from ca.signer import KEY_TYPES

from . import (audit_cmds, backup_cmds, cert_cmds, check_cmd, device_cmds, gateway_cmds, init_cmd, operator_cmds,
               status_cmd)

EXIT_ERROR = 1
EXIT_INTERNAL = 70


def default_home() -> Path:
    return Path(os.environ.get("IOMTCA_HOME", "./iomtca-data"))


def default_gateway_home() -> Path:
    return Path(os.environ.get("IOMTCA_GATEWAY_HOME", "./iomtca-gateway"))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=None,
                        help="CA directory (default: $IOMTCA_HOME, else ./iomtca-data); for `gateway init` and "
                             "`gateway run` the gateway's own (default: $IOMTCA_GATEWAY_HOME, else ./iomtca-gateway)")
    parser = argparse.ArgumentParser(prog="iomtca", description="iomt-ca: private CA for connected medical devices")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    from_env = os.environ.get("IOMTCA_LOG_FORMAT", "text")
    log_format = dict(choices=logsafe.FORMATS, help="text (default) or json: one JSON object per log line "
                      "(also $IOMTCA_LOG_FORMAT)")
    parser.add_argument("--log-format", default=from_env if from_env in logsafe.FORMATS else "text", **log_format)
    common.add_argument("--log-format", default=argparse.SUPPRESS, **log_format)   # after the command too
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create a CA directory")
    p.add_argument("--trust-domain", default="iomt.local", help="SPIFFE trust domain (default iomt.local)")
    p.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256")
    p.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP for the enrollment server certificate (repeatable)")
    p.add_argument("--base-url", help="base URL of the OCSP/CRL listener written into certificates")
    p.add_argument("--force", action="store_true", help="move an existing CA directory aside and start anew")
    p.set_defaults(func=init_cmd.run)

    p = sub.add_parser("serve", parents=[common], help="run the EST server and the OCSP/CRL responder")
    p.add_argument("--listen", metavar="HOST:PORT", help="HTTPS listener (EST, RA API); default 127.0.0.1:8443")
    p.add_argument("--http-listen", metavar="HOST:PORT", help="plain-HTTP OCSP/CRL listener; default 127.0.0.1:8080")
    p.add_argument("--console-listen", metavar="HOST:PORT",
                   help="HTTPS listener of the web console and the admin API; default 127.0.0.1:8444 ([console] listen)")
    p.add_argument("--workers", metavar="N", type=_workers_arg,
                   help='worker processes sharing both listeners, or "auto" for one per CPU; default 1 '
                        "([enroll] workers)")
    p.set_defaults(func=serve_cmd, log_level=logging.INFO)

    p = sub.add_parser("sim", parents=[common], help="run a fleet of simulated devices against the server and gateway")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--transport", choices=("http", "mqtt", "mixed"), default="mixed")
    p.add_argument("--offline-ratio", type=float, default=0.3, help="share of intermittently connected devices")
    p.add_argument("--duration", default="60s", help="wall-clock run time, e.g. 60s")
    p.add_argument("--time-scale", type=float, default=8640.0,
                   help="nominal device seconds per wall second for online/offline windows (8640: 72 h in 30 s)")
    p.add_argument("--est", default="https://127.0.0.1:8443", help="EST base URL")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--old-firmware-ratio", type=float, default=0.0, help="share of new devices on firmware 1.0.0")
    p.add_argument("--tokens", type=Path, help="device_id,token CSV from `device import --tokens-out`")
    p.add_argument("--json-out", type=Path, help="write the summary as JSON here")
    p.add_argument("--final-sync", default="20s", help="how long devices get to come back at the end")
    p.set_defaults(func=sim_cmd, log_level=logging.WARNING)

    device_cmds.add_parsers(sub, common)
    gateway_cmds.add_parsers(sub, common)
    cert_cmds.add_parsers(sub, common)
    audit_cmds.add_parsers(sub, common)
    operator_cmds.add_parsers(sub, common)
    status_cmd.add_parsers(sub, common)
    check_cmd.add_parsers(sub, common)
    backup_cmds.add_parsers(sub, common)
    return parser


def _workers_arg(text: str) -> int:
    from enroll.config import parse_workers
    try:
        return parse_workers(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def serve_cmd(args) -> int:
    from enroll.server import serve
    return await serve(args.dir, listen=args.listen, http_listen=args.http_listen,
                       console_listen=args.console_listen, workers=args.workers)


async def sim_cmd(args) -> int:
    from ca.timefmt import parse_duration
    from firmware_sim.fleet import SimOptions, run_sim
    options = SimOptions(
        home=args.dir, devices=args.devices, transport=args.transport, offline_ratio=args.offline_ratio,
        duration=parse_duration(args.duration).total_seconds(), time_scale=args.time_scale, est_url=args.est,
        broker=args.broker, seed=args.seed, old_firmware_ratio=args.old_firmware_ratio, tokens=args.tokens,
        json_out=args.json_out, final_sync=parse_duration(args.final_sync).total_seconds())
    return await run_sim(options)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dir is None:
        on_gateway_host = getattr(args, "gateway_command", None) in ("init", "run")
        args.dir = default_gateway_home() if on_gateway_host else default_home()
    # Without -v the CLI speaks only through its own one-line messages.
    quiet = getattr(args, "log_level", logging.CRITICAL)  # servers log at INFO, admin commands stay quiet
    logsafe.configure(logging.INFO if args.verbose else quiet, args.log_format)
    try:
        return asyncio.run(args.func(args)) or 0
    except (CAError, ConfigError) as exc:
        print(f"iomtca: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"iomtca: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # our bug: say so in one line, details with -v
        logging.getLogger("iomtca").debug("internal error", exc_info=True)
        print(f"iomtca: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
