"""FDA/EU MDR Unique Device Identifier (UDI) parsing into device identifier (DI)
and production identifier (PI).

Accepted forms, as printed under the barcode on device labels:
- GS1 human-readable: "(01)00844588003288(17)141120(10)7654321D(21)10987654d321";
  the DI is the GTIN-14 of AI (01) (check digit verified), the PI is the rest.
- HIBCC: "+H123PROD1231/$$3141120..." ; the DI is the primary data before "/",
  the PI the secondary data after it.
"""
from __future__ import annotations

import re

from .errors import BadRequestError

# GS1 application identifiers that may appear in a UDI production identifier.
_GS1_PI_AIS = {"10": 20, "11": 6, "17": 6, "21": 20, "7240": 20}
_GS1_RE = re.compile(r"\((\d{2,4})\)([^()]+)")


def gtin_check_digit(body: str) -> int:
    """GS1 mod-10 check digit of the digits before it."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return (10 - total % 10) % 10


def parse_udi(text: str) -> tuple[str, str]:
    """Split a UDI into (di, pi); raise BadRequestError naming what is wrong."""
    udi = text.strip()
    if not udi:
        return "", ""
    if udi.startswith("("):
        return _parse_gs1(udi)
    if udi.startswith("+"):
        di, _, pi = udi[1:].partition("/")
        if not re.fullmatch(r"[A-Z][A-Z0-9]{3}[A-Z0-9]{1,18}[0-9]", di):
            raise BadRequestError(f"invalid HIBCC UDI {text!r}: bad primary data {di!r}")
        return "+" + di, pi
    raise BadRequestError(
        f"unrecognised UDI {text!r}: expected GS1 '(01)<GTIN-14>(17)...' or HIBCC '+...'"
    )


def _parse_gs1(udi: str) -> tuple[str, str]:
    pairs = _GS1_RE.findall(udi)
    if "".join(f"({ai}){value}" for ai, value in pairs) != udi:
        raise BadRequestError(f"invalid GS1 UDI {udi!r}: expected '(AI)value' groups")
    (first_ai, gtin), rest = pairs[0], pairs[1:]
    if first_ai != "01":
        raise BadRequestError(f"invalid GS1 UDI {udi!r}: must start with the (01) device identifier")
    if not re.fullmatch(r"\d{14}", gtin) or gtin_check_digit(gtin[:-1]) != int(gtin[-1]):
        raise BadRequestError(f"invalid GS1 UDI {udi!r}: (01) must be a GTIN-14 with a valid check digit")
    for ai, value in rest:
        limit = _GS1_PI_AIS.get(ai)
        if limit is None:
            raise BadRequestError(f"invalid GS1 UDI {udi!r}: AI ({ai}) is not a production identifier")
        if len(value) > limit or (limit == 6 and not re.fullmatch(r"\d{6}", value)):
            raise BadRequestError(f"invalid GS1 UDI {udi!r}: bad value for AI ({ai})")
    return gtin, "".join(f"({ai}){value}" for ai, value in rest)
