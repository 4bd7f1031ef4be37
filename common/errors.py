"""Typed errors of the CA core, each with a stable code from the MQTT contract.

Edges (HTTP, MQTT, CLI) map `code` to their own answer; nothing in the core
knows about status codes. `BadRequestError` means the peer sent garbage; any
other exception escaping the core is our bug.
"""
from __future__ import annotations


class CAError(Exception):
    """Base of every error the core raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class BadRequestError(CAError):
    """Malformed input: bad DER, PEM, base64, CSV row, field value."""

    code = "bad_request"


class ProofOfPossessionError(BadRequestError):
    """The CSR's signature does not verify with the key it carries."""


class UnauthorizedError(CAError):
    """Missing or wrong credential (token, certificate)."""

    code = "unauthorized"


class NotAcceptedError(UnauthorizedError):
    """A one-time-token login that failed before the token matched: an unregistered device id and a
    wrong token get this same answer, so a stranger cannot tell which ids exist. `why` is the real
    reason, for the server's own log and counters only."""

    GENERIC = "device id or enrollment token not accepted"
    GATEWAY = "gateway name or enrollment token not accepted"
    OPERATOR = "operator name or password not accepted"
    OPERATOR_TOKEN = "API token not accepted"

    def __init__(self, why: str, message: str = GENERIC) -> None:
        super().__init__(message)
        self.why = why


class TokenExpiredError(UnauthorizedError):
    pass


class TokenUsedError(UnauthorizedError):
    pass


class SupersededError(UnauthorizedError):
    """A request signed with a certificate older than one its device has used since: a clone, or a
    device restored from an old backup. Audited as `clone_suspected`."""

    def __init__(self, message: str, *, serial: int, newer: int, device_id: str) -> None:
        super().__init__(message)
        self.serial, self.newer, self.device_id = serial, newer, device_id


class ForbiddenError(CAError):
    """The caller is known (an operator account) but its role does not allow the action (HTTP 403)."""

    code = "forbidden"


class UnknownDeviceError(CAError):
    code = "unknown_device"


class RevokedError(CAError):
    """The device is decommissioned or the presented certificate is revoked."""

    code = "revoked"


class PostureError(CAError):
    code = "posture_noncompliant"


class PolicyViolationError(CAError):
    """The request is well formed but the policy refuses it (weak key, inactive device...)."""

    code = "policy_violation"


class KeyPolicyError(PolicyViolationError):
    pass


class RateLimitedError(CAError):
    code = "rate_limited"


class UnavailableError(CAError):
    code = "unavailable"


class PendingApprovalError(CAError):
    """The request is valid but waits for an engineer (`iomtca device approve`); retry later.

    EST answers 202 Accepted with Retry-After (RFC 7030 4.2.3); MQTT answers "queued".
    """

    code = "pending_approval"


class ConflictError(CAError):
    """The registry already holds what the request would create (duplicate device id)."""

    code = "policy_violation"


class NotFoundError(CAError):
    """An object named by an operator (certificate serial) does not exist."""

    code = "bad_request"


class ConfigError(CAError):
    """The CA directory or its config file is missing or invalid."""

    code = "internal"
