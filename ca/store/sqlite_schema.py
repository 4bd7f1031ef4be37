"""The SQLite schema: numbered, forward-only migrations and the function that runs them.

PRAGMA user_version records how many have run. A migration is never edited once released: a
change of schema is a new migration at the end.
"""
from __future__ import annotations

import sqlite3

# Numbered migrations; PRAGMA user_version records how many have run.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        owner TEXT NOT NULL,
        location TEXT NOT NULL DEFAULT '',
        criticality TEXT NOT NULL DEFAULT 'medium',
        firmware TEXT NOT NULL DEFAULT '',
        manufacturer TEXT NOT NULL DEFAULT '',
        serial_number TEXT NOT NULL DEFAULT '',
        udi_di TEXT NOT NULL DEFAULT '',
        udi_pi TEXT NOT NULL DEFAULT '',
        asset_tag TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'active',
        created_at TEXT NOT NULL,
        last_seen TEXT
    );
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        digest BLOB NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT,
        burned_at TEXT
    );
    CREATE INDEX tokens_device ON tokens(device_id);
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT REFERENCES devices(id),
        profile TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        der BLOB NOT NULL,
        status TEXT NOT NULL DEFAULT 'good',
        created_at TEXT NOT NULL
    );
    CREATE INDEX certificates_device ON certificates(device_id, not_after);
    CREATE TABLE revocations (
        id INTEGER PRIMARY KEY,
        serial TEXT NOT NULL REFERENCES certificates(serial),
        reason INTEGER NOT NULL,
        revoked_at TEXT NOT NULL,
        released_at TEXT
    );
    CREATE UNIQUE INDEX revocations_active ON revocations(serial) WHERE released_at IS NULL;
    CREATE TABLE crl_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        number INTEGER NOT NULL
    );
    INSERT INTO crl_state (id, number) VALUES (1, 0);
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device_id TEXT,
        serial TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 2: a feed of status changes (revoke, hold, release) that responders and the
    # gateway follow by id, and enrollment approvals.
    """
    CREATE TABLE status_changes (
        id INTEGER PRIMARY KEY,
        serial TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE approvals (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        requested_at TEXT NOT NULL,
        approved_at TEXT,
        approved_by TEXT
    );
    """,
    # 3: holds placed because a device stayed away too long (released when it returns),
    # and high-criticality devices flagged instead of held.
    """
    CREATE TABLE attendance_holds (
        serial TEXT PRIMARY KEY REFERENCES certificates(serial),
        device_id TEXT NOT NULL,
        held_at TEXT NOT NULL
    );
    CREATE TABLE attendance_flags (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        flagged_at TEXT NOT NULL
    );
    """,
    # 4: the certificate each relayed request (device, request id) produced, so a relay that
    # retries after a crash gets the same certificate back instead of "token already used".
    """
    CREATE TABLE request_results (
        device_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        serial TEXT NOT NULL REFERENCES certificates(serial),
        created_at TEXT NOT NULL,
        PRIMARY KEY (device_id, request_id)
    );
    """,
    # 5: each revocation keeps its DER CRL entry (fixed once recorded) and its certificate's
    # notAfter, so a CRL of 100k entries is one scan of this table, no join and no re-encoding.
    # Rows from before this migration have no entry yet and are encoded when read.
    """
    ALTER TABLE revocations ADD COLUMN entry BLOB;
    ALTER TABLE revocations ADD COLUMN not_after TEXT;
    UPDATE revocations SET not_after = (SELECT c.not_after FROM certificates c WHERE c.serial = revocations.serial);
    """,
    # 6: the latest CRL signed, with its number and the last status change it covers, so that
    # every process serving the CA (server workers) publishes the same CRL and the numbers a
    # client sees never go down.
    """
    ALTER TABLE crl_state ADD COLUMN der BLOB;
    ALTER TABLE crl_state ADD COLUMN der_number INTEGER;
    ALTER TABLE crl_state ADD COLUMN covers_change INTEGER;
    """,
    # 7: the status state machine (ca/status.py) enforced by the store too. A non-attendance hold
    # names the hold it placed (its revocations row), so only that same hold is ever lifted for
    # attendance; rows left behind by holds that were revoked or released since are dropped. The
    # triggers refuse, whatever SQL asks, to take a certificate out of revoked, to close a final
    # revocation, or to bring a decommissioned device back.
    """
    ALTER TABLE attendance_holds ADD COLUMN revocation_id INTEGER REFERENCES revocations(id);
    DELETE FROM attendance_holds WHERE serial NOT IN (SELECT serial FROM certificates WHERE status = 'hold');
    UPDATE attendance_holds SET revocation_id = (
        SELECT r.id FROM revocations r
        WHERE r.serial = attendance_holds.serial AND r.released_at IS NULL AND r.reason = 6);
    DELETE FROM attendance_holds WHERE revocation_id IS NULL;
    CREATE TRIGGER revoked_is_final BEFORE UPDATE OF status ON certificates
    WHEN OLD.status = 'revoked' AND NEW.status <> 'revoked'
    BEGIN SELECT RAISE(ABORT, 'a revoked certificate stays revoked'); END;
    CREATE TRIGGER revocation_is_final BEFORE UPDATE OF released_at ON revocations
    WHEN OLD.reason <> 6 AND OLD.released_at IS NULL AND NEW.released_at IS NOT NULL
    BEGIN SELECT RAISE(ABORT, 'only a certificateHold can be lifted'); END;
    CREATE TRIGGER decommissioned_is_final BEFORE UPDATE OF status ON devices
    WHEN OLD.status = 'decommissioned' AND NEW.status <> 'decommissioned'
    BEGIN SELECT RAISE(ABORT, 'a decommissioned device stays decommissioned'); END;
    """,
    # 8: what a device proved apart from what it merely reported. `last_seen` was set by
    # unauthenticated presence messages: it becomes the reported time. Proven contact starts from
    # each device's newest certificate. `used_at`: when a certificate last proved its device
    # (renewal, signed posture, mutual TLS), which is how an older certificate is known superseded.
    """
    ALTER TABLE devices RENAME COLUMN last_seen TO reported_online_at;
    ALTER TABLE devices ADD COLUMN reported_online INTEGER;
    ALTER TABLE devices ADD COLUMN reported_firmware TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN reported_posture_at TEXT;
    ALTER TABLE devices ADD COLUMN last_proven_contact TEXT;
    ALTER TABLE devices ADD COLUMN posture_signed_at TEXT;
    ALTER TABLE devices ADD COLUMN clone_suspected_at TEXT;
    UPDATE devices SET last_proven_contact = (
        SELECT MAX(c.created_at) FROM certificates c WHERE c.device_id = devices.id);
    ALTER TABLE certificates ADD COLUMN used_at TEXT;
    """,
    # 9: gateways as registration authorities of their own. An operator registers one (a one-time
    # token, kept as a digest); it enrolls for its RA certificate with the token; every RA
    # certificate is linked to its gateway, so revoking the gateway refuses all of them at once.
    # The RA certificate `iomtca init` made before this version belongs to no gateway: the RA API
    # refuses it, and the gateway is set up anew with `iomtca gateway add` / `gateway init`.
    """
    CREATE TABLE gateways (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('registered', 'active', 'revoked')),
        token_digest BLOB,
        token_expires_at TEXT,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        enrolled_at TEXT,
        revoked_at TEXT
    );
    CREATE TABLE gateway_certificates (
        serial TEXT PRIMARY KEY REFERENCES certificates(serial),
        gateway TEXT NOT NULL REFERENCES gateways(name)
    );
    CREATE INDEX gateway_certificates_gateway ON gateway_certificates(gateway);
    CREATE TRIGGER gateway_revocation_is_final BEFORE UPDATE OF status ON gateways
    WHEN OLD.status = 'revoked' AND NEW.status <> 'revoked'
    BEGIN SELECT RAISE(ABORT, 'a revoked gateway stays revoked'); END;
    """,
    # 10: failed anonymous logins counted per (device, source) and per source in fixed windows,
    # shared by every worker and kept across restarts (ca/failures.py); audited per source and window
    """
    CREATE TABLE auth_failures (
        scope TEXT NOT NULL CHECK (scope IN ('device-source', 'source')),
        key TEXT NOT NULL,
        source TEXT NOT NULL,
        window_start TEXT NOT NULL,
        count INTEGER NOT NULL,
        audited INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, key, window_start)
    );
    CREATE INDEX auth_failures_audit ON auth_failures(scope, audited, window_start);
    CREATE INDEX auth_failures_source ON auth_failures(scope, source, window_start);
    """,
    # 11: IDevID onboarding finds the device by the serial number its manufacturer certificate names
    """
    CREATE INDEX devices_serial_number ON devices(serial_number) WHERE serial_number <> '';
    """,
    # 12: an approval binds one key (ca/approvals.py): one row per device and key (the SHA-256 of
    # its DER SubjectPublicKeyInfo, lowercase hex) with its type, source and times. The per-device
    # rows of `approvals` are dropped, not carried over: a waiting one names no key (the device's
    # next retry records it again, with its key), and an approved-but-unused one would let any
    # key through, which is what this migration ends (the engineer approves again, by key).
    """
    CREATE TABLE approval_requests (
        device_id TEXT NOT NULL REFERENCES devices(id),
        fingerprint TEXT NOT NULL CHECK (length(fingerprint) = 64 AND fingerprint NOT GLOB '*[^0-9a-f]*'),
        key_type TEXT NOT NULL,
        source TEXT,
        requested_at TEXT NOT NULL,
        last_seen_at TEXT NOT NULL,
        approved_at TEXT,
        approved_by TEXT,
        PRIMARY KEY (device_id, fingerprint),
        CHECK ((approved_at IS NULL) = (approved_by IS NULL))
    );
    DROP TABLE approvals;
    """,
    # 13: operator accounts of the console and the admin API (ca/operators.py): a role each, the
    # password as a self-describing scrypt string, sessions and API tokens kept only as SHA-256
    # digests of their secrets (the secrets themselves are never stored)
    """
    CREATE TABLE operators (
        name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64 AND name NOT GLOB '*[^a-z0-9._-]*'),
        role TEXT NOT NULL CHECK (role IN ('auditor', 'engineer', 'security', 'admin')),
        password_hash TEXT NOT NULL CHECK (password_hash GLOB 'scrypt$*'),
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        password_changed_at TEXT,
        disabled_at TEXT
    );
    CREATE TABLE operator_sessions (
        digest BLOB PRIMARY KEY CHECK (length(digest) = 32),
        operator TEXT NOT NULL REFERENCES operators(name),
        source TEXT,
        created_at TEXT NOT NULL,
        last_seen_at TEXT NOT NULL
    );
    CREATE INDEX operator_sessions_operator ON operator_sessions(operator);
    CREATE INDEX operator_sessions_last_seen ON operator_sessions(last_seen_at);
    CREATE TABLE operator_tokens (
        id INTEGER PRIMARY KEY,
        digest BLOB NOT NULL UNIQUE CHECK (length(digest) = 32),
        operator TEXT NOT NULL REFERENCES operators(name),
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    CREATE INDEX operator_tokens_operator ON operator_tokens(operator);
    CREATE INDEX operator_tokens_expires ON operator_tokens(expires_at);
    """,
    # 14: the console's reads of one device's entries, and of one kind of entry (the changes feed,
    # the overview, an evidence export's signature), without reading the whole log
    """
    CREATE INDEX audit_log_device ON audit_log(device_id, id) WHERE device_id IS NOT NULL;
    CREATE INDEX audit_log_action ON audit_log(action, id);
    """,
    # 15: an API token's label (what integration holds it), so that an admin who lists an
    # operator's tokens can tell them apart and revoke one by id; ids AUTOINCREMENT, never reused
    # (a revoked token's id named again, in the audit or a late revocation, must not be a newer
    # token); the audit log by actor (the console's filter, read by index as device and action are)
    """
    CREATE TABLE operator_tokens_15 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        digest BLOB NOT NULL UNIQUE CHECK (length(digest) = 32),
        operator TEXT NOT NULL REFERENCES operators(name),
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        label TEXT CHECK (label IS NULL OR length(label) <= 64)
    );
    INSERT INTO operator_tokens_15 (id, digest, operator, created_at, created_by, expires_at)
        SELECT id, digest, operator, created_at, created_by, expires_at FROM operator_tokens;
    DROP TABLE operator_tokens;
    ALTER TABLE operator_tokens_15 RENAME TO operator_tokens;
    CREATE INDEX operator_tokens_operator ON operator_tokens(operator);
    CREATE INDEX operator_tokens_expires ON operator_tokens(expires_at);
    CREATE INDEX audit_log_actor ON audit_log(actor, id);
    """,
    # 16: current certificates by expiry (the console's overview and expiring filters read the
    # unexpired ones only, not every certificate ever issued)
    """
    CREATE INDEX certificates_not_after ON certificates(not_after);
    """,
]


def _statements(script: str) -> list[str]:
    """The statements of a migration: split at ';', rejoined until SQLite calls a piece complete
    (a trigger's body holds ';' of its own)."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending)
            pending = ""
    if pending.strip(" \n;"):
        raise sqlite3.DatabaseError(f"incomplete statement in a migration: {pending[:60]!r}")
    return statements


def migrate(conn: sqlite3.Connection) -> int:
    """Run the migrations this database has not seen yet; return the schema version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"database schema version {version} is newer than this iomt-ca ({len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)
