"""Gateways as registration authorities: registered by an operator, enrolled with a one-time
token, checked on every RA call, revoked for good.

    iomtca gateway add NAME      -> registered, a one-time token (kept here only as a digest)
    POST /iomt/v1/gateways/NAME/enroll {token, csr}
                                 -> active, its first RA certificate (the token is spent)
    POST /ra/v1/renew            -> a new RA certificate linked to the same gateway
    iomtca gateway revoke NAME   -> revoked (final); every RA certificate of it revoked

Every RA certificate is linked to its gateway (`gateway_certificates`) in the transaction that
issues it, so the RA API can refuse a revoked gateway at once, whatever certificate it shows,
and revoking a gateway finds all its certificates. The RA key is made on the gateway host: the
CA sees only its CSR. Issuance goes through `Authority.issue_service`, the path of every
infrastructure certificate.
"""
from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography import x509

from common.ids import check_id

from . import failures, policy, status
from .errors import (CAError, ConflictError, NotAcceptedError, NotFoundError, PolicyViolationError, RateLimitedError,
                     RevokedError, TokenExpiredError, TokenUsedError, UnauthorizedError)
from .issuance import proven_key, service_names
from .model import (AuditEvent, CertStatus, Gateway, GatewayStatus, Issued, RevocationReason,
                    serial_hex)
from .registry import TOKEN_BYTES, token_digest

if TYPE_CHECKING:
    from .authority import Authority

log = logging.getLogger(__name__)

PROFILE = "gateway"


@dataclass(frozen=True)
class GatewayToken:
    """A fresh gateway token: the secret exists only in this object (and on the operator's screen)."""
    name: str
    secret: str
    expires_at: datetime


def check_name(name: str) -> str:
    """A gateway name has the syntax of a device id (it becomes a SPIFFE path segment and a CN)."""
    return check_id(name, "gateway name")


def identity(name: str, trust_domain: str) -> tuple[x509.Name, list[x509.GeneralName]]:
    """The RA certificate's subject (CN = the gateway's name) and SAN spiffe://TD/ra/gateway/NAME."""
    return service_names(name, trust_domain, f"ra/gateway/{name}")


async def register(authority: "Authority", name: str, *, actor: str) -> GatewayToken:
    check_name(name)
    now = authority.now()
    secret = secrets.token_urlsafe(TOKEN_BYTES)
    expires = now + authority.config.token_ttl
    async with authority.store.write() as tx:
        if await tx.get_gateway(name) is not None:
            raise ConflictError(f"gateway {name} is already registered (a revoked name is not reused)")
        await tx.insert_gateway(Gateway(name=name, status=GatewayStatus.REGISTERED, created_at=now,
                                        created_by=actor, token_digest=token_digest(secret), token_expires_at=expires))
        await tx.append_audit(AuditEvent("gateway_registered", actor,
                                         detail={"gateway": name, "token_expires_at": expires.isoformat()}), now)
    log.info("registered gateway %s by %s", name, actor)
    return GatewayToken(name, secret, expires)


async def enroll(authority: "Authority", name: str, secret: str, csr: x509.CertificateSigningRequest,
                 source: str | None = None) -> Issued:
    """The gateway's first RA certificate, for the key of `csr`, against its one-time token.
    `source`: the caller's address; failed guesses are counted per name and source and per
    source (ca/failures.py), not audited one by one."""
    check_name(name)
    now = authority.now()
    who = f"gateway:{name}"
    try:
        key = proven_key(csr)
        policy.key_allowed(key, authority.config.profile(PROFILE))
        async with authority.store.write() as tx:
            await failures.check(tx, failures.keys(who, source), now, authority.failure_limits)
            gateway = await tx.get_gateway(name)
            _check_token(gateway, name, secret, now)
            subject, sans = identity(name, authority.config.trust_domain)
            issued = await authority.issue_service(key, PROFILE, subject, sans, actor=who, tx=tx)
            await tx.link_gateway_certificate(issued.serial, name)
            if not await tx.gateway_enrolled(name, now):
                raise UnauthorizedError(f"gateway {name} enrolled meanwhile; its token is spent")
            await tx.append_audit(AuditEvent("gateway_enrolled", who, serial=issued.serial,
                                             detail={"gateway": name}), now)
    except (NotAcceptedError, RateLimitedError) as exc:   # anonymous: counted, audited per source and window
        await failures.refused(authority.store, failures.keys(who, source), now, exc, "gateway enrollment")
        raise
    except CAError as exc:
        async with authority.store.write() as tx:
            await tx.append_audit(AuditEvent("gateway_enroll_refused", who,
                                             detail={"gateway": name, "code": exc.code, "reason": exc.message}), now)
        log.warning("gateway enrollment refused gateway=%s code=%s reason=%s", name, exc.code, exc)
        raise
    log.info("gateway %s enrolled serial=%s not_after=%s", name, serial_hex(issued.serial),
             issued.not_after.isoformat())
    return issued


def _check_token(gateway: Gateway | None, name: str, secret: str, now: datetime) -> None:
    # one answer for an unknown name and a wrong token, whatever the gateway's state: a stranger
    # learns nothing of which names exist or have enrolled; the token's holder hears the rest
    offered = token_digest(secret)
    stored = gateway.token_digest if gateway is not None and gateway.token_digest else b"\0" * len(offered)
    if not hmac.compare_digest(stored, offered) or gateway is None:
        raise NotAcceptedError(f"gateway enrollment token for {name} does not match"
                               if gateway is not None else f"no gateway {name} is registered", NotAcceptedError.GATEWAY)
    if gateway.status is GatewayStatus.REVOKED:
        raise RevokedError(f"gateway {name} is revoked")
    if gateway.status is GatewayStatus.ACTIVE:
        raise TokenUsedError(f"gateway {name} has already enrolled; its token is spent (renewal goes over "
                             "the RA API; a new gateway needs a new name)")
    if gateway.token_expires_at is not None and gateway.token_expires_at <= now:
        raise TokenExpiredError(f"gateway enrollment token for {name} expired; revoke it and add a new gateway")


async def active_gateway(authority: "Authority", serial: int) -> Gateway:
    """The active gateway an RA certificate belongs to, or the reason the RA API refuses it."""
    async with authority.store.read() as tx:
        gateway = await tx.gateway_of_certificate(serial)
    if gateway is None:
        raise UnauthorizedError(f"certificate {serial_hex(serial)} belongs to no registered gateway "
                                "(set the gateway up with `iomtca gateway add` and `gateway init`)")
    if gateway.status is not GatewayStatus.ACTIVE:
        raise RevokedError(f"gateway {gateway.name} is {gateway.status.value}")
    return gateway


async def renew(authority: "Authority", presented_serial: int, key, subject: x509.Name,
                sans: list[x509.GeneralName], *, actor: str) -> Issued:
    """A new RA certificate for the gateway of the one presented, linked to it in the same transaction."""
    async with authority.store.write() as tx:
        gateway = await tx.gateway_of_certificate(presented_serial)
        if gateway is None or gateway.status is not GatewayStatus.ACTIVE:
            state = "unregistered" if gateway is None else gateway.status.value
            raise RevokedError(f"the gateway of RA certificate {serial_hex(presented_serial)} is {state}")
        issued = await authority.issue_service(key, PROFILE, subject, sans, actor=actor, tx=tx)
        await tx.link_gateway_certificate(issued.serial, gateway.name)
    return issued


async def revoke(authority: "Authority", name: str, *, actor: str,
                 reason: RevocationReason = RevocationReason.cessationOfOperation) -> list[int]:
    """Revoke the gateway (final) and every one of its RA certificates still good or on hold."""
    if reason in (RevocationReason.certificateHold, RevocationReason.removeFromCRL):
        raise PolicyViolationError("a gateway is revoked for good: certificateHold does not apply")
    now = authority.now()
    revoked = []
    async with authority.store.write() as tx:
        gateway = await tx.get_gateway(name)
        if gateway is None:
            raise NotFoundError(f"no gateway {name} is registered")
        if gateway.status is GatewayStatus.REVOKED:
            raise PolicyViolationError(f"gateway {name} is already revoked")
        await tx.revoke_gateway(name, now)
        for record in await tx.gateway_certificates(name):
            if record.status is not CertStatus.REVOKED and record.not_after > now:
                await status.revoke(tx, record, reason, now)
                revoked.append(record.serial)
        await tx.append_audit(AuditEvent("gateway_revoked", actor, detail={
            "gateway": name, "reason": reason.name, "serials": [serial_hex(s) for s in revoked]}), now)
    log.info("revoked gateway %s and %d RA certificate(s)", name, len(revoked))
    return revoked


async def list_gateways(authority: "Authority") -> list[Gateway]:
    async with authority.store.read() as tx:
        return await tx.list_gateways()
