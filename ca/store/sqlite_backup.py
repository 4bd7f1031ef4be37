"""A consistent copy of the CA database while the server runs, by SQLite's online backup API
(`sqlite3.Connection.backup`): the copy is the database as of one transaction, taken page by page
without holding the write lock for long, so enrollments go on meanwhile. Also the checks a
restored copy must pass before it is used."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from .sqlite import BUSY_TIMEOUT_S
from .sqlite_check import Database

PAGES_PER_STEP = 1024   # pages copied per step; between steps the server's writers go on


def snapshot(database: Path, target: Path) -> None:
    """Copy `database` to `target` (a new file), consistent as of one moment. Blocking: run it
    in a thread. The copy is in rollback-journal mode, one self-contained file."""
    source = sqlite3.connect(Path(database).resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy, pages=PAGES_PER_STEP)
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            copy.close()
    finally:
        source.close()


async def inspect(database: Path) -> tuple[list[str], int, int, str | None]:
    """(problems, schema version, audit entries, audit head hash) of a database file: integrity,
    foreign keys and the audit chain, read-only."""
    db = Database(database)
    try:
        problems = db.integrity_problems() + db.foreign_key_problems()
        version = db.schema_version()
        chain = await db.verify_audit() if not problems else None
    finally:
        db.close()
    if chain is None:
        return problems, version, 0, None
    return problems + chain.problems, version, chain.entries, chain.head


def crl_number(database: Path) -> int | None:
    """The highest CRL number the database has handed out (a restored CA must sign above it)."""
    conn = sqlite3.connect(Path(database).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT number FROM crl_state WHERE id = 1").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return None if row is None else row[0]
