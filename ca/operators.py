"""Operator accounts of the web console and the admin API: roles and what each may do, passwords
(scrypt), logins throttled through ca/failures.py, sessions and API tokens, all audited.

- Roles are ordered: each may do everything the ones before it may (`ROLES`, `ACTIONS`). The
  console and the admin API check `require(operator, action)` before they call `Authority`; the
  methods here take the acting operator as an audit `actor` string and check no role themselves.
- Passwords: scrypt (n=2**15, r=8, p=1, 16-byte salt, 32-byte key) of the NFC-normalised UTF-8
  password, stored as `scrypt$N$r$p$<salt b64>$<key b64>`, so the parameters can change later
  (a stored hash is verified with its own). Verified in a worker thread (about 70 ms and 32 MiB:
  not on the event loop) and compared in constant time. An unknown name, a wrong password and a
  disabled account are one answer, NotAcceptedError("operator name or password not accepted"),
  and an unknown name still costs one scrypt (against a random hash of the current parameters).
- Throttling: failed logins are counted by ca/failures.py under `operator:NAME SOURCE` (per
  account and source) and `SOURCE` (per source: the same counter as device-token and gateway-token
  logins, so a source guessing both is limited once), with the limits the authority holds
  (`Authority.failure_limits`, read on every attempt through the `limits` callable). The check
  and the count run in their own short transactions, not around the scrypt: a burst of parallel
  guesses may pass the limit by as many as run at once (bounded by the worker threads).
  API-token guesses are counted under `operator-token SOURCE` and `SOURCE`.
- Sessions and API tokens: random secrets (32 bytes) of which only the SHA-256 digest is stored.
  A session ends after `session_idle` without use, after `session_max` in all, when closed, and
  when its operator is disabled or changes password; its last-seen time is written only when it
  is more than TOUCH_AFTER old (not a write per request). An API token (`iomtop_...`) lasts its
  lifetime (at most MAX_TOKEN_LIFETIME) or until its operator is disabled.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import string
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Callable, NamedTuple

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import failures
from .credentials import OperatorAuth, actor as actor_of
from .errors import (BadRequestError, ConflictError, ForbiddenError, NotAcceptedError, NotFoundError,
                     PolicyViolationError, RateLimitedError, UnauthorizedError)
from .model import AuditEvent
from .timefmt import Clock, utc_now

if TYPE_CHECKING:
    from .store import Store, Tx

log = logging.getLogger(__name__)

ROLES = ("auditor", "engineer", "security", "admin")   # each role can do everything the ones before it can
ACTIONS: dict[str, str] = {   # action -> the least role allowed
    "read": "auditor",
    "export": "auditor",
    "device.write": "engineer",   # register, import, edit, decommission, issue tokens
    "cert.revoke": "security",
    "cert.hold": "security",
    "cert.release": "security",
    "approval.decide": "security",
    "operator.manage": "admin",
}

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
MIN_PASSWORD, MAX_PASSWORD = 12, 1024
GENERATED_LENGTH, GENERATED_ALPHABET = 20, string.ascii_letters + string.digits
SECRET_BYTES = 32   # sessions and API tokens
TOKEN_PREFIX = "iomtop_"
TOKEN_KEY = "operator-token"   # the failures.keys name of API-token guesses
DEFAULT_TOKEN_LIFETIME = timedelta(days=90)
MAX_TOKEN_LIFETIME = timedelta(days=365)
TOUCH_AFTER = timedelta(seconds=60)
LABEL_MAX = 64   # an API token's label
SESSION_GONE = "session expired or unknown; log in again"


# -- roles ------------------------------------------------------------------------------------

def allowed(role: str, action: str) -> bool:
    """Whether `role` may do `action`. An unknown action or role is our bug: ValueError."""
    try:
        least = ACTIONS[action]
    except KeyError:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}") from None
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    return ROLES.index(role) >= ROLES.index(least)


def require(operator: "Operator", action: str) -> None:
    """ForbiddenError (403) naming the role `action` needs, unless `operator` may do it."""
    if operator.disabled:
        raise ForbiddenError(f"operator {operator.name} is disabled")
    if not allowed(operator.role, action):
        raise ForbiddenError(f"{action} needs the {ACTIONS[action]} role or higher; "
                             f"operator {operator.name} is {operator.role}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
        raise BadRequestError(f"invalid operator name {shown}: use 1-64 lowercase letters, digits, '.', '_' or "
                              "'-', starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise BadRequestError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


MAX_TOKEN_ID = 2 ** 63 - 1   # SQLite's largest integer: a larger id would overflow, not just miss


def parse_token_id(text: str) -> int:
    """An API token's id as lists show it: a positive decimal integer (ASCII digits only:
    "³".isdigit() is True and int("³") fails), at most SQLite's largest integer."""
    if not (isinstance(text, str) and text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_TOKEN_ID:
        raise BadRequestError(f"not an API token id: {str(text)[:40]!r} (a positive whole number, as token lists show)")
    return int(text)


def check_label(label: str | None) -> str | None:
    if label is None or label == "":
        return None
    if not isinstance(label, str) or len(label) > LABEL_MAX or not label.isprintable():
        raise BadRequestError(f"an API token's label is up to {LABEL_MAX} printable characters")
    return label


# -- passwords --------------------------------------------------------------------------------

def check_password(password: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise BadRequestError(f"password too short: use at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise BadRequestError(f"password too long: use at most {MAX_PASSWORD} characters")
    if not password.isprintable():
        raise BadRequestError("a password cannot hold control characters (newlines, tabs)")


def generate_password() -> str:
    """A password made for an operator and shown once (the CLI's --generate, the console, the API):
    GENERATED_LENGTH letters and digits, about 119 bits."""
    return "".join(secrets.choice(GENERATED_ALPHABET) for _ in range(GENERATED_LENGTH))


def _kdf(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    """The one scrypt call (tests count them)."""
    return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(password)


def _encode(password: str) -> bytes:
    return unicodedata.normalize("NFC", password).encode("utf-8", "surrogatepass")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _format(n: int, r: int, p: int, salt: bytes, key: bytes) -> str:
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def hash_password(password: str) -> str:
    """The self-describing scrypt string of `password` (BadRequestError if it is not acceptable)."""
    check_password(password)
    salt = os.urandom(SALT_BYTES)
    return _format(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt,
                   _kdf(_encode(password), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES))


def dummy_hash() -> str:
    """A hash of no password, with the current parameters: what an unknown name is verified against."""
    return _format(SCRYPT_N, SCRYPT_R, SCRYPT_P, os.urandom(SALT_BYTES), os.urandom(KEY_BYTES))


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, key = stored.split("$")
    n, r, p = int(n), int(r), int(p)
    salt, key = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
    if (scheme != "scrypt" or not 2 ** 10 <= n <= 2 ** 20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16
            or len(salt) < 8 or not 16 <= len(key) <= 64):
        raise ValueError("parameters out of range")
    return n, r, p, salt, key


def current_parameters(stored: str) -> bool:
    """Whether `stored` was made with today's scrypt parameters (a login rehashes one that was not)."""
    try:
        n, r, p, salt, key = _parse(stored)
    except (ValueError, TypeError, AttributeError):
        return True   # unreadable: verify_password refused it already
    return (n, r, p, len(salt), len(key)) == (SCRYPT_N, SCRYPT_R, SCRYPT_P, SALT_BYTES, KEY_BYTES)


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` was made from: one scrypt with the stored string's
    own parameters, compared in constant time (an unreadable string: a dummy scrypt, False)."""
    try:
        n, r, p, salt, key = _parse(stored)
        readable = True
    except (ValueError, TypeError, AttributeError):
        log.error("unreadable operator password hash in the store")
        n, r, p, salt, key = _parse(dummy_hash())
        readable = False
    candidate = password if isinstance(password, str) and len(password) <= MAX_PASSWORD else ""
    derived = _kdf(_encode(candidate), salt, n, r, p, len(key))
    return hmac.compare_digest(derived, key) and readable and candidate == password


def digest(secret: str) -> bytes:
    """What the store keeps of a session or API-token secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


# -- accounts ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Operator:
    """An operator account as the console sees it (never its password hash)."""

    name: str
    role: str
    disabled: bool
    created_at: datetime
    password_changed_at: datetime | None

    def auth(self) -> OperatorAuth:
        """The credential for `Authority` calls (e.g. `enroll`) made by this operator."""
        return OperatorAuth(self.name, self.role)

    @property
    def actor(self) -> str:
        """`operator:NAME:ROLE`, what the audit rows of this operator's actions name."""
        return actor_of(self.auth())


@dataclass(frozen=True)
class SessionRow:
    operator: Operator
    created_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True)
class ApiToken:
    """An API token as an admin lists it: its id and label, never its secret or digest."""

    id: int
    operator: str
    label: str | None
    created_at: datetime
    created_by: str
    expires_at: datetime


class NewApiToken(NamedTuple):
    """A token just made: its secret (shown once, then kept only as a digest), expiry and id."""

    secret: str
    expires_at: datetime
    id: int


@dataclass(frozen=True)
class ApiTokenRow:
    operator: Operator
    expires_at: datetime


class Operators:
    """Operator accounts, logins, sessions and API tokens (attached as `Authority.operators`).

    `limits`: called on every login for the failure limits (the authority passes a function that
    reads its `failure_limits`, which the server sets from `[enroll]`)."""

    def __init__(self, store: "Store", clock: Clock = utc_now, *, session_idle: timedelta = timedelta(minutes=15),
                 session_max: timedelta = timedelta(hours=8),
                 limits: Callable[[], failures.Limits] = failures.Limits) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits
        self.session_idle = session_idle
        self.session_max = session_max

    # -- accounts, by an admin (or the CLI) ------------------------------------------------------

    async def add(self, name: str, role: str, password: str, *, actor: str) -> Operator:
        check_name(name)
        check_role(role)
        check_password(password)
        hashed = await asyncio.to_thread(hash_password, password)
        now = self._clock()
        async with self._store.write() as tx:
            if await tx.get_operator(name) is not None:
                raise ConflictError(f"operator {name} already exists (a disabled name is not reused)")
            await tx.insert_operator(name, role, hashed, now, actor)
            await tx.append_audit(AuditEvent("operator_added", actor, detail={"operator": name, "role": role}), now)
            operator = await tx.get_operator(name)
        log.info("operator added operator=%s role=%s by=%s", name, role, actor)
        return operator

    async def list(self) -> list[Operator]:
        async with self._store.read() as tx:
            return await tx.list_operators()

    async def get(self, name: str) -> Operator:
        async with self._store.read() as tx:
            return await _existing(tx, name)

    async def disable(self, name: str, *, actor: str) -> Operator:
        """Disable the account and end its sessions and API tokens (one audit row; none if it
        already was disabled)."""
        now = self._clock()
        async with self._store.write() as tx:
            current = await _existing(tx, name)
            if not current.disabled:
                await _keep_an_admin(tx, current, "disable")
            changed = await tx.disable_operator(name, now)
            sessions = await tx.delete_operator_sessions(name)
            tokens = await tx.delete_operator_tokens(name)
            if changed:
                await tx.append_audit(AuditEvent("operator_disabled", actor, detail={
                    "operator": name, "sessions_ended": sessions, "tokens_ended": tokens}), now)
            operator = await tx.get_operator(name)
        log.info("operator disabled operator=%s by=%s", name, actor)
        return operator

    async def enable(self, name: str, *, actor: str) -> Operator:
        """Enable a disabled account again (with its old password; sessions and tokens ended with
        the disabling stay ended). One audit row; none if it was not disabled."""
        now = self._clock()
        async with self._store.write() as tx:
            await _existing(tx, name)
            if await tx.enable_operator(name):
                await tx.append_audit(AuditEvent("operator_enabled", actor, detail={"operator": name}), now)
            operator = await tx.get_operator(name)
        log.info("operator enabled operator=%s by=%s", name, actor)
        return operator

    async def set_role(self, name: str, role: str, *, actor: str) -> Operator:
        """Give the account another role, from its next request on (sessions and tokens read the
        role as it is now). The last enabled admin cannot be given a lesser role."""
        check_role(role)
        now = self._clock()
        async with self._store.write() as tx:
            current = await _existing(tx, name)
            if role != "admin" and not current.disabled:
                await _keep_an_admin(tx, current, f"make {role}")
            if await tx.set_operator_role(name, role):
                await tx.append_audit(AuditEvent("operator_role_changed", actor, detail={
                    "operator": name, "from": current.role, "to": role}), now)
            operator = await tx.get_operator(name)
        log.info("operator role operator=%s role=%s by=%s", name, role, actor)
        return operator

    async def set_password(self, name: str, password: str, *, actor: str) -> None:
        """A new password; the account's sessions end (its API tokens stay)."""
        check_password(password)
        hashed = await asyncio.to_thread(hash_password, password)
        now = self._clock()
        async with self._store.write() as tx:
            await _existing(tx, name)
            await tx.set_operator_password(name, hashed, now)
            ended = await tx.delete_operator_sessions(name)
            await tx.append_audit(AuditEvent("operator_password_changed", actor, detail={
                "operator": name, "sessions_ended": ended}), now)
        log.info("operator password changed operator=%s by=%s", name, actor)

    async def change_own_password(self, operator: "Operator", current: str, new: str, *, source: str) -> None:
        """An operator's own new password, proven by the current one. A wrong one is throttled and
        counted as a failed login of the account from `source`. Its sessions end, this one too."""
        check_password(new)
        now = self._clock()
        k = failures.keys(f"operator:{operator.name}", source)
        try:
            async with self._store.read() as tx:
                await failures.check(tx, k, now, self._limits())
                stored = await tx.operator_password_hash(operator.name)
            if not await asyncio.to_thread(verify_password, current, stored or dummy_hash()):
                raise NotAcceptedError(f"wrong current password for operator {operator.name}",
                                       NotAcceptedError.OPERATOR)
        except (NotAcceptedError, RateLimitedError) as exc:
            await failures.refused(self._store, k, now, exc, "operator password change")
            raise
        await self.set_password(operator.name, new, actor=operator.actor)

    async def new_api_token(self, name: str, *, lifetime: timedelta, actor: str,
                            label: str | None = None) -> NewApiToken:
        """A new API token: the secret is shown once and kept as a digest."""
        if not timedelta(0) < lifetime <= MAX_TOKEN_LIFETIME:
            raise BadRequestError(f"an API token lasts more than 0 s and at most {MAX_TOKEN_LIFETIME.days} days")
        label = check_label(label)
        now = self._clock()
        expires = (now + lifetime).replace(microsecond=0)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(SECRET_BYTES)
        async with self._store.write() as tx:
            operator = await _existing(tx, name)
            if operator.disabled:
                raise PolicyViolationError(f"operator {name} is disabled; no token issued")
            await tx.prune_operator_tokens(now)
            token_id = await tx.insert_operator_token(digest(secret), name, now, expires, actor, label)
            await tx.append_audit(AuditEvent("operator_token_created", actor, detail={
                "operator": name, "token_id": token_id, "label": label, "expires_at": expires.isoformat()}), now)
        log.info("operator API token created operator=%s expires=%s by=%s", name, expires.isoformat(), actor)
        return NewApiToken(secret, expires, token_id)

    async def api_tokens(self, name: str) -> list[ApiToken]:
        """The account's API tokens (expired ones too, until they are pruned), oldest first."""
        async with self._store.read() as tx:
            await _existing(tx, name)
            return await tx.list_operator_tokens(name)

    async def revoke_api_token(self, name: str, token_id: int, *, actor: str) -> None:
        """End one API token at once (NotFoundError if the account holds no token of that id)."""
        now = self._clock()
        async with self._store.write() as tx:
            await _existing(tx, name)
            if not await tx.delete_operator_token(name, token_id):
                raise NotFoundError(f"operator {name} has no API token {token_id}")
            await tx.append_audit(AuditEvent("operator_token_revoked", actor, detail={
                "operator": name, "token_id": token_id}), now)
        log.info("operator API token revoked operator=%s token=%s by=%s", name, token_id, actor)

    # -- logins, sessions, tokens ------------------------------------------------------------

    async def login(self, name: str, password: str, *, source: str) -> Operator:
        """The operator `name` and `password` log in as, from `source` (the client address)."""
        now = self._clock()
        valid = isinstance(name, str) and NAME_RE.match(name) is not None
        k = failures.keys(f"operator:{name if valid else '?'}", source)
        try:
            async with self._store.read() as tx:
                await failures.check(tx, k, now, self._limits())
                operator = await tx.get_operator(name) if valid else None
                stored = await tx.operator_password_hash(name) if operator is not None else None
            matches = await asyncio.to_thread(verify_password, password, stored or dummy_hash())
            if operator is None:
                raise NotAcceptedError(f"no operator {name!r}", NotAcceptedError.OPERATOR)
            if not matches:
                raise NotAcceptedError(f"wrong password for operator {name}", NotAcceptedError.OPERATOR)
            if operator.disabled:
                raise NotAcceptedError(f"operator {name} is disabled", NotAcceptedError.OPERATOR)
        except (NotAcceptedError, RateLimitedError) as exc:   # counted, audited per source and window
            await failures.refused(self._store, k, now, exc, "operator login")
            raise
        rehashed = None if current_parameters(stored) else await asyncio.to_thread(hash_password, password)
        async with self._store.write() as tx:
            if rehashed is not None:   # made with older scrypt parameters: stored anew with today's
                await tx.replace_operator_password_hash(name, stored, rehashed)
            await tx.append_audit(AuditEvent("operator_login", operator.actor, detail={"source": source}), now)
        log.info("operator login operator=%s source=%s", name, source)
        return operator

    async def open_session(self, operator: Operator, *, source: str) -> str:
        """A new session of `operator` (just logged in): its secret, the cookie value."""
        now = self._clock()
        secret = secrets.token_urlsafe(SECRET_BYTES)
        async with self._store.write() as tx:
            current = await tx.get_operator(operator.name)
            if current is None or current.disabled:
                raise UnauthorizedError(SESSION_GONE)
            await tx.prune_operator_sessions(now - self.session_idle, now - self.session_max)
            await tx.insert_operator_session(digest(secret), operator.name, source, now)
        return secret

    def _live(self, row: SessionRow, now: datetime) -> bool:
        return (not row.operator.disabled and now - row.last_seen_at < self.session_idle
                and now - row.created_at < self.session_max)

    async def session(self, secret: str) -> Operator:
        """The operator of a live session (UnauthorizedError otherwise); marks it used."""
        now = self._clock()
        key = digest(secret) if isinstance(secret, str) else b""
        async with self._store.read() as tx:
            row = await tx.operator_session(key)
        if row is None or not self._live(row, now):
            raise UnauthorizedError(SESSION_GONE)
        if now - row.last_seen_at >= TOUCH_AFTER:
            async with self._store.write() as tx:
                if not await tx.touch_operator_session(key, now):   # closed meanwhile, by another process
                    raise UnauthorizedError(SESSION_GONE)
        return row.operator

    async def close_session(self, secret: str) -> None:
        """Log out: the session ends (audited if it was still live); an unknown secret is no error."""
        now = self._clock()
        key = digest(secret) if isinstance(secret, str) else b""
        async with self._store.write() as tx:
            row = await tx.operator_session(key)
            if row is None or not await tx.delete_operator_session(key):
                return
            if self._live(row, now):
                await tx.append_audit(AuditEvent("operator_logout", row.operator.actor), now)

    async def bearer(self, secret: str, *, source: str) -> Operator:
        """The operator of an API token (`Authorization: Bearer`). An unknown, expired or disabled
        operator's token is one answer, counted per source as a failed login; once a source is
        over the limit its failures are answered 429. A valid token always passes: it has 256 bits
        and cannot be guessed, so a client that sent bad ones (or a neighbour behind the same NAT)
        does not lock out an integration that holds a good one."""
        now = self._clock()
        k = failures.keys(TOKEN_KEY, source)
        try:
            async with self._store.read() as tx:
                known = isinstance(secret, str) and secret.startswith(TOKEN_PREFIX)
                row = await tx.operator_token(digest(secret)) if known else None
                if row is None or row.expires_at <= now or row.operator.disabled:
                    await failures.check(tx, k, now, self._limits())
            if row is None:
                raise NotAcceptedError("unknown API token", NotAcceptedError.OPERATOR_TOKEN)
            if row.expires_at <= now:
                raise NotAcceptedError(f"API token of operator {row.operator.name} expired",
                                       NotAcceptedError.OPERATOR_TOKEN)
            if row.operator.disabled:
                raise NotAcceptedError(f"operator {row.operator.name} is disabled", NotAcceptedError.OPERATOR_TOKEN)
        except (NotAcceptedError, RateLimitedError) as exc:
            await failures.refused(self._store, k, now, exc, "operator API token")
            raise
        return row.operator


async def _keep_an_admin(tx: "Tx", operator: Operator, what: str) -> None:
    """ConflictError if `operator` is the last enabled admin: nobody could manage accounts after."""
    if operator.role == "admin" and await tx.enabled_admins() == [operator.name]:
        raise ConflictError(f"cannot {what} operator {operator.name}: it is the last enabled admin; "
                            "add or enable another admin first")


async def _existing(tx: "Tx", name: str) -> Operator:
    operator = await tx.get_operator(name) if isinstance(name, str) and NAME_RE.match(name) else None
    if operator is None:
        raise NotFoundError(f"no operator {name!r}")
    return operator
