"""Fill a CA database with many synthetic devices, certificates and revocations, fast.

Written with sqlite3 directly (one transaction, executemany): issuing 100,000
certificates through the CA would take minutes and measure something else.
The rows match the schema of ca/store/sqlite.py; each certificate row carries
the same placeholder DER, which nothing on the measured paths parses.
"""
from __future__ import annotations

import secrets
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ca.crl import encode_entry
from ca.model import Revocation, RevocationReason
from ca.store.sqlite import MIGRATIONS


def seed(db: Path, count: int, revoked: int, der: bytes) -> list[int]:
    """`count` devices with one certificate each, the first `revoked` of them revoked. Returns serials."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    ts = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    serials = [secrets.randbits(159) | (1 << 100) for _ in range(count)]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS), "run iomtca init first"
    with conn:
        conn.executemany(
            "INSERT INTO devices (id, model, owner, status, created_at, last_proven_contact) VALUES (?, 'bench', 'bench', "
            "'active', ?, ?)", ((f"bench-{i:06d}", ts(now), ts(now)) for i in range(count)))
        conn.executemany(
            "INSERT INTO certificates (serial, device_id, profile, not_before, not_after, der, status, created_at) "
            "VALUES (?, ?, 'device', ?, ?, ?, ?, ?)",
            ((format(s, "x"), f"bench-{i:06d}", ts(now - timedelta(minutes=5)), ts(now + timedelta(days=3)), der,
              "revoked" if i < revoked else "good", ts(now)) for i, s in enumerate(serials)))
        # as Tx.change_status stores them: with the encoded CRL entry and the certificate's notAfter
        conn.executemany(
            "INSERT INTO revocations (serial, reason, revoked_at, entry, not_after) VALUES (?, 1, ?, ?, ?)",
            ((format(s, "x"), ts(now), encode_entry(Revocation(s, RevocationReason.keyCompromise, now)),
              ts(now + timedelta(days=3))) for s in serials[:revoked]))
    conn.close()
    return serials
