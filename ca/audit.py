"""The audit log's hash chain: each entry commits to the one before it.

hash_n = SHA-256(hash_{n-1} || canonical JSON of entry n). Changing, inserting or
deleting any entry but the newest breaks every later link, which `verify_chain`
reports. Cutting entries off the end cannot be seen from inside the database:
`iomtca audit verify` prints the head hash so it can be recorded elsewhere.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: str
    actor: str
    action: str
    device_id: str | None
    serial: str | None
    detail: str          # canonical JSON text as stored
    prev_hash: str
    hash: str


def canonical_detail(detail: dict) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)


def chain_hash(prev_hash: str, *, id: int, at: str, actor: str, action: str,
               device_id: str | None, serial: str | None, detail: str) -> str:
    body = json.dumps([id, at, actor, action, device_id, serial, detail], separators=(",", ":"))
    return hashlib.sha256((prev_hash + "\n" + body).encode()).hexdigest()


def verify_chain(rows: Iterable[AuditRow], prev: str = GENESIS) -> list[str]:
    """Problems found, in order; an empty list means the chain is intact. `prev`: the hash of the
    entry before the first of `rows` (GENESIS when they start at the beginning)."""
    problems = []
    for row in rows:
        if row.prev_hash != prev:
            problems.append(f"entry {row.id}: does not follow the entry before it (deleted or reordered)")
        expected = chain_hash(row.prev_hash, id=row.id, at=row.at, actor=row.actor, action=row.action,
                              device_id=row.device_id, serial=row.serial, detail=row.detail)
        if expected != row.hash:
            problems.append(f"entry {row.id}: content does not match its hash (modified)")
        prev = row.hash
    return problems
