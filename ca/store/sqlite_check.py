"""The CA database inspected for `iomtca check`, over one read-only connection (a check never
writes unless asked to migrate): PRAGMA integrity_check and foreign_key_check, the schema
version, and the audit chain verified a page at a time through the store's own read methods."""
from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..audit import GENESIS, verify_chain
from .sqlite import BUSY_TIMEOUT_S, MIGRATIONS, SQLiteTx, _Direct

SCHEMA_VERSION = len(MIGRATIONS)   # the schema this code runs on
AUDIT_PAGE = 5000                  # audit entries read and verified at a time


@dataclass(frozen=True)
class ChainResult:
    entries: int
    head: str | None       # the newest entry's hash
    problems: list[str]    # from verify_chain, in order; empty when intact


class Database:
    """The CA database opened read-only. Raises sqlite3.Error as SQLite does (a file of random
    bytes: "file is not a database"; a damaged page: "database disk image is malformed")."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version: int | None = None   # the schema version once checked (set by the caller)
        self._conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True,
                                     timeout=BUSY_TIMEOUT_S)

    def close(self) -> None:
        self._conn.close()

    def integrity_problems(self) -> list[str]:
        """PRAGMA integrity_check: empty when the file is sound (it reports up to 100 problems)."""
        rows = [r[0] for r in self._conn.execute("PRAGMA integrity_check").fetchall()]
        if rows == ["ok"]:
            return []
        # a row may hold several lines under a "*** in database main ***" heading: one problem a line
        lines = (line.strip() for row in rows for line in row.splitlines())
        return [line for line in lines if line and not line.startswith("***")]

    def foreign_key_problems(self) -> list[str]:
        return [f"{table} row {rowid} refers to a missing row of {parent}"
                for table, rowid, parent, _ in self._conn.execute("PRAGMA foreign_key_check").fetchall()]

    def schema_version(self) -> int:
        """How many migrations have run (PRAGMA user_version, ca/store/sqlite_schema.py)."""
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.asynccontextmanager
    async def read(self):
        """The store's read methods (`Store.read`) over this connection."""
        yield SQLiteTx(_Direct(self._conn))

    async def verify_audit(self) -> ChainResult:
        """verify_chain over the whole audit log, AUDIT_PAGE entries at a time."""
        prev, after, entries, problems = GENESIS, 0, 0, []
        async with self.read() as tx:
            while rows := await tx.audit_rows(after_id=after, limit=AUDIT_PAGE):
                problems += verify_chain(rows, prev=prev)
                prev, after, entries = rows[-1].hash, rows[-1].id, entries + len(rows)
        return ChainResult(entries, prev if entries else None, problems)
