"""The audit chain outside the database: anchors of its head in an append-only file, and the
export records from which a SIEM or a later replay re-verifies the chain (ca/audit.py says what
the chain is).

The chain shows an entry changed, inserted or deleted anywhere but at the end. What it cannot
show from inside the database is entries cut off the end, or a history rewritten with every later
hash recomputed. An anchor is one line of JSON, `{"at", "id", "hash", "crl_number"}`, appended
to a file (`[audit] anchor_file`) by the server every `[audit] anchor_every` and when it stops;
`check_anchors` then holds the database to every line: an anchored entry beyond the head means
entries were cut off the end, an anchored entry whose hash differs means history was rewritten,
and ids that go backwards mean the anchor file itself was edited. The file is only ever appended
to (O_APPEND, fsync per line, 0600), so it can live on a disk or behind a log shipper that
whoever can write the database cannot rewrite. `crl_number` is the highest CRL number stored so
far (a restore must continue above it, RFC 5280 5.2.3).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .audit import AuditRow, canonical_detail
from .timefmt import Clock, to_rfc3339, utc_now

if TYPE_CHECKING:
    from .authority import Authority
    from .store import Store

log = logging.getLogger(__name__)

PAGE = 5000            # rows per read when exporting or checking
MAX_MISMATCHES = 10    # rewritten-history lines reported one by one; the rest counted
_TAIL = 64 * 1024      # how much of the file's end the writer reads to find the last anchor
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Anchor:
    """One line of the anchor file: the head `id`/`hash` as it was `at`."""

    at: str
    id: int
    hash: str
    crl_number: int | None
    line: int = 0   # 1-based line in the file it was read from (0: not read from a file)

    def json(self) -> dict:
        return {"at": self.at, "id": self.id, "hash": self.hash, "crl_number": self.crl_number}


@dataclass(frozen=True)
class AnchorLog:
    """An anchor file as read: its anchors, lines a crash left incomplete (`torn`: reported, not
    held against anyone), and lines that are no anchor at all (`problems`: the file was edited)."""

    anchors: tuple[Anchor, ...]
    torn: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


# -- the file ------------------------------------------------------------------------------------

def append_anchor(path: Path, row: AuditRow, crl_number: int | None, *, at: datetime | None = None) -> Anchor:
    """Append one anchor of `row` (the head) and fsync it; the file is created 0600 if missing.
    Earlier lines are never rewritten: a torn last line left by a crash is closed with a newline
    first, so the new anchor stands on a line of its own. Blocking: call it in a thread."""
    anchor = Anchor(at=to_rfc3339(at or utc_now()), id=row.id, hash=row.hash, crl_number=crl_number)
    line = (json.dumps(anchor.json(), separators=(",", ":")) + "\n").encode()
    path = Path(path)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:   # the new directory entry survives a crash too
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return anchor


def read_anchors(path: Path) -> AnchorLog:
    """Every anchor in the file, in file order. A line that is not JSON at all is what a crash
    leaves (a write cut short, zeros where the data never landed): reported in `torn`, ignored
    (such a line is no more than a deleted one, which the file alone cannot show either). A line
    of JSON that is not an anchor was put there by someone: a problem. A missing file raises
    FileNotFoundError."""
    anchors, torn, problems = [], [], []
    with open(path, "rb") as f:
        data = f.read()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            torn.append(f"line {number}: an incomplete anchor (a write cut short by a crash?); ignored")
            continue
        anchor, why = _anchor(obj, number)
        if anchor is None:
            problems.append(f"anchor file edited: line {number} is not an anchor ({why})")
        else:
            anchors.append(anchor)
    return AnchorLog(tuple(anchors), tuple(torn), tuple(problems))


def last_anchor(path: Path) -> Anchor | None:
    """The file's last complete anchor (None: no file, or none in its last 64 KiB). Blocking."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except FileNotFoundError:
        return None
    lines = tail.split(b"\n")
    for raw in reversed(lines if size <= _TAIL else lines[1:]):   # the first may be cut by the seek
        try:
            anchor, _ = _anchor(json.loads(raw), 0)
        except (ValueError, UnicodeDecodeError):
            continue
        if anchor is not None:
            return anchor
    return None


def _anchor(obj, number: int) -> tuple[Anchor | None, str]:
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    id_, hash_, at, crl = obj.get("id"), obj.get("hash"), obj.get("at"), obj.get("crl_number")
    if type(id_) is not int or id_ < 1:
        return None, "no entry id"
    if not isinstance(hash_, str) or not _HASH_RE.match(hash_):
        return None, "no SHA-256 hash"
    if not isinstance(at, str):
        return None, "no time"
    if crl is not None and (type(crl) is not int or crl < 0):
        return None, "a bad crl_number"
    return Anchor(at=at, id=id_, hash=hash_, crl_number=crl, line=number), ""


# -- holding the database to the anchors -----------------------------------------------------------

async def check_anchors(anchors: Sequence[Anchor], store: "Store") -> list[str]:
    """Problems, one line each (empty: the log agrees with every anchor): entries cut off the end
    (an anchored id beyond the head), history rewritten (an anchored entry gone, or with another
    hash), the anchor file edited (ids that go backwards, or one id with two hashes)."""
    problems: list[str] = []
    before: Anchor | None = None
    for anchor in anchors:
        if before is not None and anchor.id < before.id:
            problems.append(f"anchor file edited: line {anchor.line} anchors entry {anchor.id}, below entry "
                            f"{before.id} of line {before.line} before it (ids only ever rise)")
        elif before is not None and anchor.id == before.id and anchor.hash != before.hash:
            problems.append(f"anchor file edited or history rewritten: lines {before.line} and {anchor.line} "
                            f"anchor entry {anchor.id} with different hashes")
        if before is None or anchor.id >= before.id:
            before = anchor
    async with store.read() as tx:
        newest = await tx.audit_entries(limit=1)
    head = newest[0].id if newest else 0
    beyond = [a for a in anchors if a.id > head]
    if beyond:
        top = max(beyond, key=lambda a: a.id)
        problems.append(f"entries cut off the end: line {top.line} anchored entry {top.id} at {top.at}, but the "
                        f"log ends at entry {head} ({len(beyond)} anchor(s) beyond the head)")
    mismatched = 0
    wanted = sorted({(a.id, a.hash, a.line, a.at) for a in anchors if a.id <= head})
    for start in range(0, len(wanted), PAGE):
        page = wanted[start:start + PAGE]
        ids = sorted({w[0] for w in page})
        rows = await _rows_at(store, ids)
        for id_, hash_, line, at in page:
            row = rows.get(id_)
            if row is not None and row.hash == hash_:
                continue
            mismatched += 1
            if mismatched <= MAX_MISMATCHES:
                what = "is gone" if row is None else f"now has hash {row.hash[:16]}..., not {hash_[:16]}..."
                problems.append(f"history rewritten: entry {id_}, anchored at line {line} ({at}), {what}")
    if mismatched > MAX_MISMATCHES:
        problems.append(f"history rewritten: {mismatched - MAX_MISMATCHES} more anchored entries differ")
    return problems


async def _rows_at(store: "Store", ids: list[int]) -> dict[int, AuditRow]:
    """The rows of `ids` that exist, one point read each (anchors are far apart in the log)."""
    found: dict[int, AuditRow] = {}
    async with store.read() as tx:
        for id_ in ids:
            rows = await tx.audit_rows(after_id=id_ - 1, limit=1)
            if rows and rows[0].id == id_:
                found[id_] = rows[0]
    return found


# -- the server's anchors -------------------------------------------------------------------------

async def anchor_now(store: "Store", path: Path, *, clock: Clock = utc_now) -> Anchor | None:
    """Append an anchor of the head, unless the file's last anchor already records it (same entry
    and hash, and a CRL number no lower than the store's); the anchor written, or None."""
    async with store.read() as tx:
        newest = await tx.audit_entries(limit=1)
        crl = await tx.latest_crl()
    if not newest:
        return None
    head, crl_number = newest[0], (crl[1] if crl is not None else None)
    last = await asyncio.to_thread(last_anchor, path)
    if last is not None and (last.id, last.hash) == (head.id, head.hash) and (last.crl_number or 0) >= (crl_number or 0):
        return None
    anchor = await asyncio.to_thread(append_anchor, path, head, crl_number, at=clock())
    log.info("audit anchor: entry %d hash %s... crl_number=%s written to %s", anchor.id, anchor.hash[:16],
             crl_number, path)
    return anchor


async def anchor_task(authority: "Authority") -> None:
    """The server's duty: an anchor every `[audit] anchor_every` while the head moves."""
    settings = authority.config.audit
    while True:
        await asyncio.sleep(settings.anchor_every.total_seconds())
        try:
            await anchor_now(authority.store, settings.anchor_file)
        except Exception:
            log.exception("writing the audit anchor to %s failed; retrying next period", settings.anchor_file)


async def final_anchor(authority: "Authority") -> None:
    """The anchor written when the server stops; a failure is logged, never raised (it must not
    mask the shutdown)."""
    try:
        await anchor_now(authority.store, authority.config.audit.anchor_file)
    except Exception:
        log.exception("writing the audit anchor at shutdown to %s failed", authority.config.audit.anchor_file)


# -- export records --------------------------------------------------------------------------------

def export_record(row: AuditRow) -> dict:
    """One entry as `iomtca audit export` writes it: every field, `detail` parsed. When the stored
    detail is not canonical JSON (a damaged row), its text is kept as `detail_text` too, so a
    replay computes exactly the hash the database holds."""
    record = {"id": row.id, "at": row.at, "actor": row.actor, "action": row.action, "device_id": row.device_id,
              "serial": row.serial, "detail": None, "prev_hash": row.prev_hash, "hash": row.hash}
    try:
        record["detail"] = json.loads(row.detail)
        exact = canonical_detail(record["detail"]) == row.detail
    except (ValueError, TypeError):
        exact = False
    if not exact:
        record["detail_text"] = row.detail
    return record


def record_row(record: dict) -> AuditRow:
    """An exported entry back as the row whose hash the chain checks (`verify_chain`)."""
    detail = record["detail_text"] if "detail_text" in record else canonical_detail(record["detail"])
    return AuditRow(id=record["id"], at=record["at"], actor=record["actor"], action=record["action"],
                    device_id=record["device_id"], serial=record["serial"], detail=detail,
                    prev_hash=record["prev_hash"], hash=record["hash"])
