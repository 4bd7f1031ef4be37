"""The core's typed errors: defined in `common/errors.py` (the gateway maps the same codes)."""
from common.errors import (  # noqa: F401 (re-exported)
    CAError,
    BadRequestError,
    ProofOfPossessionError,
    UnauthorizedError,
    NotAcceptedError,
    TokenExpiredError,
    TokenUsedError,
    SupersededError,
    ForbiddenError,
    UnknownDeviceError,
    RevokedError,
    PostureError,
    PolicyViolationError,
    KeyPolicyError,
    RateLimitedError,
    UnavailableError,
    PendingApprovalError,
    ConflictError,
    NotFoundError,
    ConfigError,
)

__all__ = ["CAError", "BadRequestError", "ProofOfPossessionError", "UnauthorizedError", "NotAcceptedError", "TokenExpiredError", "TokenUsedError", "SupersededError", "ForbiddenError", "UnknownDeviceError", "RevokedError", "PostureError", "PolicyViolationError", "KeyPolicyError", "RateLimitedError", "UnavailableError", "PendingApprovalError", "ConflictError", "NotFoundError", "ConfigError"]
