"""The device registry: onboarding devices and their one-time enrollment tokens.

Tokens are 192 random bits shown once and stored as a SHA-256 digest. A slow
password hash is not needed (the secret is not human-chosen) and would cap
enrollment throughput; digests are compared in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import replace
from datetime import datetime, timedelta

from .errors import BadRequestError, ConflictError, PolicyViolationError, TokenExpiredError, TokenUsedError, UnauthorizedError, UnknownDeviceError
from .model import AuditEvent, Criticality, Device, DeviceStatus, Token, check_device_id
from .store import Store, TokenRow, Tx
from .timefmt import Clock, utc_now
from .udi import parse_udi

TOKEN_BYTES = 24


def token_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
TEXT_LIMITS = {"model": 200, "owner": 200, "location": 200, "firmware": 64, "manufacturer": 200,
               "serial_number": 200, "asset_tag": 200}


def check_text_fields(values: dict[str, str]) -> None:
    """A registry text field holds no control character (C0, DEL, C1: line breaks, escapes) and is
    bounded (an asset list or a form cannot store a megabyte in one): the same rule at registration
    and at every edit, and the one console/openapi.json states."""
    for name, limit in TEXT_LIMITS.items():
        value = values.get(name)
        if value is not None and (len(value) > limit or _CONTROL.search(value)):
            raise BadRequestError(f"{name} must be text of at most {limit} characters without control characters")


def new_device(
    device_id: str, *, model: str, owner: str, location: str = "", criticality: str = "medium",
    firmware: str = "", manufacturer: str = "", serial_number: str = "", udi: str = "", asset_tag: str = "",
) -> Device:
    """Validate operator input into a Device (BadRequestError names the bad field)."""
    check_device_id(device_id)
    check_text_fields({"model": model.strip(), "owner": owner.strip(), "location": location.strip(),
                       "firmware": firmware.strip(), "manufacturer": manufacturer.strip(),
                       "serial_number": serial_number.strip(), "asset_tag": asset_tag.strip()})
    if not model.strip():
        raise BadRequestError("model is required")
    if not owner.strip():
        raise BadRequestError("owner is required")
    try:
        crit = Criticality(criticality.strip().lower() or "medium")
    except ValueError:
        raise BadRequestError(f"criticality {criticality!r} is not one of low, medium, high") from None
    udi_di, udi_pi = parse_udi(udi)
    return Device(
        id=device_id, model=model.strip(), owner=owner.strip(), location=location.strip(), criticality=crit,
        firmware=firmware.strip(), manufacturer=manufacturer.strip(), serial_number=serial_number.strip(),
        udi_di=udi_di, udi_pi=udi_pi, asset_tag=asset_tag.strip())


EDITABLE = ("model", "owner", "location", "criticality", "firmware", "manufacturer", "serial_number", "udi",
            "asset_tag")


def edited_fields(device: Device, changes: dict[str, str]) -> dict[str, str]:
    """The registry columns an operator's edit changes, validated as at registration ("udi" is
    parsed into its DI and PI); fields whose value stays the same are left out."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise BadRequestError(f"cannot edit {', '.join(sorted(unknown))}; editable: {', '.join(EDITABLE)}")
    values = {k: v.strip() for k, v in changes.items() if v is not None}
    for required in ("model", "owner"):
        if required in values and not values[required]:
            raise BadRequestError(f"{required} cannot be empty")
    check_text_fields(values)
    if "criticality" in values:
        try:
            values["criticality"] = Criticality(values["criticality"].lower()).value
        except ValueError:
            raise BadRequestError(f"criticality {values['criticality']!r} is not one of low, medium, high") from None
    if "udi" in values:
        values["udi_di"], values["udi_pi"] = parse_udi(values.pop("udi"))
    current = {name: getattr(device, name) for name in values}
    current = {k: (v.value if isinstance(v, Criticality) else v) for k, v in current.items()}
    return {k: v for k, v in values.items() if current[k] != v}


async def find_token(tx: Tx, device_id: str, secret: str, now: datetime) -> TokenRow:
    """The device's live token matching `secret`, or the reason it does not count."""
    offered = token_digest(secret)
    match = None
    for row in await tx.live_tokens(device_id):
        # compare every row so timing does not reveal which one matched
        if hmac.compare_digest(row.digest, offered):
            match = row
    if match is None:
        raise UnauthorizedError(f"enrollment token for device {device_id} does not match")
    if match.used_at is not None:
        raise TokenUsedError(f"enrollment token for device {device_id} was already used")
    if match.expires_at <= now:
        raise TokenExpiredError(f"enrollment token for device {device_id} expired; ask for a new one (iomtca device token)")
    return match


class Registry:
    def __init__(self, store: Store, *, token_ttl: timedelta, clock: Clock = utc_now) -> None:
        self._store = store
        self._ttl = token_ttl
        self._clock = clock

    async def _issue_token(self, tx: Tx, device_id: str, now: datetime, actor: str) -> Token:
        # Only one live token per device: a fresh one burns the ones before it.
        await tx.burn_tokens(device_id, now)
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        token = Token(device_id=device_id, secret=secret, expires_at=now + self._ttl)
        await tx.insert_token(device_id, token_digest(secret), now, token.expires_at)
        await tx.append_audit(AuditEvent("token_created", actor, device_id=device_id,
                                         detail={"expires_at": token.expires_at.isoformat()}), now)
        return token

    async def add(self, device: Device, *, actor: str) -> Token:
        return (await self.add_many([device], actor=actor))[0]

    async def add_many(self, devices: list[Device], *, actor: str) -> list[Token]:
        """Register all devices and make their tokens in one transaction: all or nothing."""
        now = self._clock()
        tokens = []
        async with self._store.write() as tx:
            for device in devices:
                if await tx.get_device(device.id) is not None:
                    raise ConflictError(f"device {device.id} is already registered")
                await tx.insert_device(replace(device, created_at=now, status=DeviceStatus.ACTIVE))
                await tx.append_audit(AuditEvent("device_registered", actor, device_id=device.id,
                                                 detail={"model": device.model, "owner": device.owner}), now)
                tokens.append(await self._issue_token(tx, device.id, now, actor))
        return tokens

    async def new_token(self, device_id: str, *, actor: str) -> Token:
        now = self._clock()
        async with self._store.write() as tx:
            device = await tx.get_device(device_id)
            if device is None:
                raise UnknownDeviceError(f"device {device_id} is not registered")
            if device.status is not DeviceStatus.ACTIVE:
                raise PolicyViolationError(f"device {device_id} is {device.status.value}; no token issued")
            # the keys still waiting for approval came with the token this one replaces (perhaps a
            # stolen one): they go with it; an approved key stays approved (its holder still needs
            # the new token to use it)
            dropped = [r.fingerprint for r in await tx.pending_approvals(device_id) if not r.approved]
            for fingerprint in dropped:
                await tx.clear_approval(device_id, fingerprint)
            token = await self._issue_token(tx, device_id, now, actor)
            if dropped:
                await tx.append_audit(AuditEvent("enroll_approval_rejected", actor, device_id=device_id, detail={
                    "fingerprints": dropped, "why": "new token"}), now)
            return token

    async def get(self, device_id: str) -> Device:
        async with self._store.read() as tx:
            device = await tx.get_device(device_id)
        if device is None:
            raise UnknownDeviceError(f"device {device_id} is not registered")
        return device

    async def list(self) -> list[Device]:
        async with self._store.read() as tx:
            return await tx.list_devices()
