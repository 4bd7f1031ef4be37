"""`iomtca audit verify` and `iomtca audit export`: the hash-chained audit log for the security team.

Both read only the database (no CA passphrase), a page of entries at a time: the log is never
held in memory whole. `verify` checks every link (ca/audit.py) and holds the log to the anchors
the server wrote outside it (ca/audit_anchor.py); `export` writes the entries as JSON lines that
a SIEM or a later replay re-verifies (`ca.audit_anchor.record_row`, then `verify_chain`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from ca.audit import GENESIS, verify_chain
from ca.audit_anchor import PAGE, check_anchors, export_record, read_anchors
from ca.config import CAPaths, load_config
from ca.errors import BadRequestError
from ca.store.sqlite import SQLiteStore
from ca.timefmt import from_rfc3339, parse_duration, utc_now


def add_parsers(sub, common) -> None:
    audit = sub.add_parser("audit", help="the hash-chained audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = asub.add_parser("verify", parents=[common],
                        help="check every link of the audit log, and the log against its anchors")
    p.add_argument("--anchors", type=Path, metavar="FILE",
                   help="anchor file to hold the log to (default: [audit] anchor_file, when it exists)")
    p.set_defaults(func=audit_verify)

    p = asub.add_parser("export", parents=[common],
                        help="write the audit log as JSON, oldest first, for a SIEM or a later re-verification")
    p.add_argument("--since", metavar="RFC3339|DURATION",
                   help="only entries written at or after this time (e.g. 2026-11-01T00:00:00Z, or 7d ago)")
    p.add_argument("--after-id", type=_entry_id, default=0, metavar="N", help="only entries after entry N")
    p.add_argument("--format", choices=("jsonl", "json"), default="jsonl",
                   help="jsonl: one object per line (default); json: one array")
    p.add_argument("--out", type=Path, metavar="FILE", help="write here (mode 0600) instead of stdout")
    p.set_defaults(func=audit_export)


def _entry_id(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an entry id (0, 1, 2, ...)")
    return value


@contextlib.asynccontextmanager
async def _store(home: Path):
    config = load_config(CAPaths(home))
    store = await SQLiteStore.open(config.database)
    try:
        yield config, store
    finally:
        await store.close()


async def _pages(store, after_id: int, through_id: int):
    """The entries after `after_id` up to `through_id`, oldest first, a page at a time."""
    while after_id < through_id:
        async with store.read() as tx:
            rows = await tx.audit_rows(after_id=after_id, limit=PAGE)
        rows = [r for r in rows if r.id <= through_id]
        if not rows:
            return
        yield rows
        after_id = rows[-1].id


async def _head_id(store) -> int:
    async with store.read() as tx:
        newest = await tx.audit_entries(limit=1)
    return newest[0].id if newest else 0


# -- verify ---------------------------------------------------------------------------------------

async def audit_verify(args) -> int:
    async with _store(args.dir) as (config, store):
        problems, entries, prev = [], 0, GENESIS
        async for rows in _pages(store, 0, await _head_id(store)):
            problems += verify_chain(rows, prev=prev)
            entries, prev = entries + len(rows), rows[-1].hash
        anchors_file, configured = args.anchors, False
        if anchors_file is None and config.audit.anchor_file.exists():
            anchors_file, configured = config.audit.anchor_file, True
        anchor_problems, anchor_note = [], None
        if anchors_file is not None:
            try:
                found = read_anchors(anchors_file)
            except FileNotFoundError:
                raise BadRequestError(f"anchor file {anchors_file} does not exist") from None
            for torn in found.torn:
                print(f"audit anchors: {anchors_file}: {torn}", file=sys.stderr)
            anchor_problems = list(found.problems) + await check_anchors(found.anchors, store)
            source = " (the configured [audit] anchor_file)" if configured else ""
            newest = max(found.anchors, key=lambda a: a.id, default=None)
            anchor_note = (f"anchors: {len(found.anchors)} in {anchors_file}{source}"
                           + (f", the newest at entry {newest.id} ({newest.at})" if newest else ""))
    for problem in problems:
        print(f"audit log: {problem}", file=sys.stderr)
    for problem in anchor_problems:
        print(f"audit anchors: {problem}", file=sys.stderr)
    if problems or anchor_problems:
        if anchor_note:
            print(f"{anchor_note}: {len(anchor_problems)} problem(s)", file=sys.stderr)
        what = [f"{len(problems)} problem(s) in {entries} entries"] if problems else []
        what += [f"{len(anchor_problems)} contradiction(s) of its anchors"] if anchor_problems else []
        print(f"iomtca: error: audit log is damaged: {', '.join(what)}", file=sys.stderr)
        return 1
    print(f"audit log intact: {entries} entries, head {prev if entries else '-'}")
    if anchor_note:
        print(f"{anchor_note}: the log agrees with every one")
    else:
        print(f"no anchor file ({config.audit.anchor_file} does not exist): entries cut off the end "
              "cannot be seen; record the head above elsewhere, or run the server, which writes anchors")
    return 0


# -- export ---------------------------------------------------------------------------------------

def _since(text: str) -> datetime:
    """An RFC 3339 time, or a duration back from now ("7d": the last week)."""
    try:
        return from_rfc3339(text)
    except BadRequestError:
        pass
    try:
        return utc_now() - parse_duration(text)
    except BadRequestError:
        raise BadRequestError(f"--since {text!r}: give an RFC 3339 time (2026-11-01T00:00:00Z) or a duration "
                              "back from now (90m, 7d)") from None


async def audit_export(args) -> int:
    async with _store(args.dir) as (_, store):
        after_id = args.after_id
        if args.since is not None:
            async with store.read() as tx:
                after_id = max(after_id, await tx.audit_first_id_at(_since(args.since)) - 1)
        head = await _head_id(store)   # entries written meanwhile wait for the next export
        with _output(args.out) as out:
            count, first, last = 0, None, None
            if args.format == "json":
                out.write("[")
            async for rows in _pages(store, after_id, head):
                lines = [json.dumps(export_record(r), separators=(",", ":")) for r in rows]
                if args.format == "json":
                    out.write(("," if count else "") + "\n" + ",\n".join(lines))
                else:
                    out.write("\n".join(lines) + "\n")
                first = rows[0].id if first is None else first
                count, last = count + len(rows), rows[-1].id
            if args.format == "json":
                out.write("\n]\n")
    where = f" to {args.out} (mode 0600)" if args.out else ""
    span = f" (entries {first} to {last})" if count else ""
    print(f"exported {count} audit entries{span}{where}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _output(path: Path | None):
    """stdout, or a file of mode 0600 that appears whole (written aside, fsynced, renamed) or not at all."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
