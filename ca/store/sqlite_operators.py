"""The `operators`, `operator_sessions` and `operator_tokens` queries of SQLiteTx (ca/operators.py
says what they hold): apart from sqlite.py, as the failure counters are, because they are their
own concern. Sessions and tokens are looked up by the SHA-256 digest of their secret only."""
from __future__ import annotations

from datetime import datetime

from ..operators import ApiToken, ApiTokenRow, Operator, SessionRow
from ..timefmt import from_rfc3339, to_rfc3339

_COLUMNS = "o.name, o.role, o.disabled_at, o.created_at, o.password_changed_at"


def _operator(row) -> Operator:
    return Operator(name=row[0], role=row[1], disabled=row[2] is not None, created_at=from_rfc3339(row[3]),
                    password_changed_at=None if row[4] is None else from_rfc3339(row[4]))


class OperatorQueries:
    """Mixed into SQLiteTx: `_one`, `_all` and `_c` are its."""

    # accounts
    async def insert_operator(self, name: str, role: str, password_hash: str, at: datetime, by: str) -> None:
        await self._c.execute("INSERT INTO operators (name, role, password_hash, created_at, created_by) "
                              "VALUES (?, ?, ?, ?, ?)", (name, role, password_hash, to_rfc3339(at), by))

    async def get_operator(self, name: str) -> Operator | None:
        row = await self._one(f"SELECT {_COLUMNS} FROM operators o WHERE o.name = ?", (name,))
        return None if row is None else _operator(row)

    async def list_operators(self) -> list[Operator]:
        return [_operator(r) for r in await self._all(f"SELECT {_COLUMNS} FROM operators o ORDER BY o.name")]

    async def operator_password_hash(self, name: str) -> str | None:
        row = await self._one("SELECT password_hash FROM operators WHERE name = ?", (name,))
        return None if row is None else row[0]

    async def set_operator_password(self, name: str, password_hash: str, at: datetime) -> bool:
        cursor = await self._c.execute("UPDATE operators SET password_hash = ?, password_changed_at = ? WHERE name = ?",
                                       (password_hash, to_rfc3339(at), name))
        return cursor.rowcount == 1

    async def replace_operator_password_hash(self, name: str, old: str, new: str) -> bool:
        """The same password hashed anew (a rehash on login), unless it changed meanwhile."""
        cursor = await self._c.execute("UPDATE operators SET password_hash = ? WHERE name = ? AND password_hash = ?",
                                       (new, name, old))
        return cursor.rowcount == 1

    async def set_operator_role(self, name: str, role: str) -> bool:
        cursor = await self._c.execute("UPDATE operators SET role = ? WHERE name = ? AND role != ?", (role, name, role))
        return cursor.rowcount == 1

    async def enable_operator(self, name: str) -> bool:
        cursor = await self._c.execute("UPDATE operators SET disabled_at = NULL WHERE name = ? AND disabled_at IS NOT NULL",
                                       (name,))
        return cursor.rowcount == 1

    async def enabled_admins(self) -> list[str]:
        return [r[0] for r in await self._all(
            "SELECT name FROM operators WHERE role = 'admin' AND disabled_at IS NULL ORDER BY name")]

    async def disable_operator(self, name: str, at: datetime) -> bool:
        cursor = await self._c.execute("UPDATE operators SET disabled_at = ? WHERE name = ? AND disabled_at IS NULL",
                                       (to_rfc3339(at), name))
        return cursor.rowcount == 1

    # sessions
    async def insert_operator_session(self, digest: bytes, name: str, source: str | None, at: datetime) -> None:
        await self._c.execute("INSERT INTO operator_sessions (digest, operator, source, created_at, last_seen_at) "
                              "VALUES (?, ?, ?, ?, ?)", (digest, name, source, to_rfc3339(at), to_rfc3339(at)))

    async def operator_session(self, digest: bytes) -> SessionRow | None:
        row = await self._one(f"SELECT {_COLUMNS}, s.created_at, s.last_seen_at FROM operator_sessions s "
                              "JOIN operators o ON o.name = s.operator WHERE s.digest = ?", (digest,))
        return None if row is None else SessionRow(_operator(row), from_rfc3339(row[5]), from_rfc3339(row[6]))

    async def touch_operator_session(self, digest: bytes, at: datetime) -> bool:
        cursor = await self._c.execute("UPDATE operator_sessions SET last_seen_at = ? WHERE digest = ?",
                                       (to_rfc3339(at), digest))
        return cursor.rowcount == 1

    async def delete_operator_session(self, digest: bytes) -> bool:
        cursor = await self._c.execute("DELETE FROM operator_sessions WHERE digest = ?", (digest,))
        return cursor.rowcount == 1

    async def delete_operator_sessions(self, name: str) -> int:
        cursor = await self._c.execute("DELETE FROM operator_sessions WHERE operator = ?", (name,))
        return cursor.rowcount

    async def prune_operator_sessions(self, idle_before: datetime, created_before: datetime) -> int:
        cursor = await self._c.execute("DELETE FROM operator_sessions WHERE last_seen_at <= ? OR created_at <= ?",
                                       (to_rfc3339(idle_before), to_rfc3339(created_before)))
        return cursor.rowcount

    # API tokens
    async def insert_operator_token(self, digest: bytes, name: str, at: datetime, expires_at: datetime,
                                    by: str, label: str | None = None) -> int:
        cursor = await self._c.execute(
            "INSERT INTO operator_tokens (digest, operator, created_at, created_by, expires_at, label) "
            "VALUES (?, ?, ?, ?, ?, ?)", (digest, name, to_rfc3339(at), by, to_rfc3339(expires_at), label))
        return cursor.lastrowid

    async def list_operator_tokens(self, name: str) -> list[ApiToken]:
        return [ApiToken(id=r[0], operator=name, label=r[1], created_at=from_rfc3339(r[2]), created_by=r[3],
                         expires_at=from_rfc3339(r[4]))
                for r in await self._all("SELECT id, label, created_at, created_by, expires_at FROM operator_tokens "
                                         "WHERE operator = ? ORDER BY id", (name,))]

    async def delete_operator_token(self, name: str, token_id: int) -> bool:
        cursor = await self._c.execute("DELETE FROM operator_tokens WHERE operator = ? AND id = ?", (name, token_id))
        return cursor.rowcount == 1

    async def operator_token(self, digest: bytes) -> ApiTokenRow | None:
        row = await self._one(f"SELECT {_COLUMNS}, t.expires_at FROM operator_tokens t "
                              "JOIN operators o ON o.name = t.operator WHERE t.digest = ?", (digest,))
        return None if row is None else ApiTokenRow(_operator(row), from_rfc3339(row[5]))

    async def delete_operator_tokens(self, name: str) -> int:
        cursor = await self._c.execute("DELETE FROM operator_tokens WHERE operator = ?", (name,))
        return cursor.rowcount

    async def prune_operator_tokens(self, expired_before: datetime) -> int:
        cursor = await self._c.execute("DELETE FROM operator_tokens WHERE expires_at <= ?",
                                       (to_rfc3339(expired_before),))
        return cursor.rowcount
