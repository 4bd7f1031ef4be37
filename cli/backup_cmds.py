"""`iomtca backup` and `iomtca restore` (ca/backup.py): the CA directory in one archive while the
server runs, and back into a new directory only when every part checks out."""
from __future__ import annotations

from pathlib import Path

from ca import backup


def add_parsers(sub, common) -> None:
    p = sub.add_parser("backup", parents=[common], help="copy the CA directory (database, keys, config) into one "
                       "archive while the server runs")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the archive to write (0600; never "
                   "overwritten)")
    p.add_argument("--include-passphrase", action="store_true",
                   help="also copy private/passphrase (the archive then opens the CA's keys: keep it as a key)")
    p.set_defaults(func=run_backup)

    p = sub.add_parser("restore", parents=[common], help="unpack a backup archive into a new CA directory (--dir), "
                       "refusing a damaged one")
    p.add_argument("archive", type=Path, metavar="FILE")
    p.set_defaults(func=run_restore)


async def run_backup(args) -> int:
    s = await backup.backup(args.dir, args.out, include_passphrase=args.include_passphrase)
    print(f"backup {s.path}: {s.members} files, {s.bytes} bytes; schema {s.schema_version}, audit {s.audit_entries} "
          f"entries (head {s.audit_head}), CRL number {s.crl_number}")
    if not args.include_passphrase:
        print("the CA passphrase is not in it: keep the passphrase apart, a restore needs it")
    return 0


async def run_restore(args) -> int:
    s = await backup.restore(args.archive, args.dir)
    print(f"restored {s.path}: {s.members} files; schema {s.schema_version}, audit {s.audit_entries} entries "
          f"(head {s.audit_head}), CRL number {s.crl_number}")
    print("revocations made after this backup are not in it: check the audit export or SIEM for them "
          "before serving (iomtca audit verify --anchors with the live anchor file shows the gap)")
    return 0
