"""Identifier syntax both the CA and the gateway check (the MQTT contract's device id)."""
from __future__ import annotations

import re

from .errors import BadRequestError

# The MQTT contract's device id syntax; also a safe SPIFFE path segment and MQTT topic level.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_id(value: str, what: str = "device id") -> str:
    """`value` if it has the device-id syntax (gateway names too), else a BadRequestError naming `what`."""
    if not isinstance(value, str) or not DEVICE_ID_RE.match(value):
        shown = repr(value[:80] + ("..." if len(value) > 80 else "")) if isinstance(value, str) else type(value).__name__
        raise BadRequestError(f"invalid {what} {shown}: use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return value
