"""A minimal DER encoder for what we emit in bulk (CRL entries, TBSCertList).

cryptography's CRL builder copies its entry list on every add, which makes a
100k-entry CRL quadratic; encoding entries ourselves keeps CRL generation
linear. Only the handful of ASN.1 types a CRL needs are here.
"""
from __future__ import annotations

import functools
from datetime import datetime, timezone


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + length(len(content)) + content


def sequence(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def integer(value: int) -> bytes:
    """Two's complement, minimal length (X.690 8.3)."""
    size = (value + (value < 0)).bit_length() // 8 + 1
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


def enumerated(value: int) -> bytes:
    return b"\x0a" + integer(value)[1:]


def octet_string(data: bytes) -> bytes:
    return tlv(0x04, data)


def boolean(value: bool) -> bytes:
    return b"\x01\x01" + (b"\xff" if value else b"\x00")


def null() -> bytes:
    return b"\x05\x00"


def bit_string(data: bytes) -> bytes:
    return tlv(0x03, b"\x00" + data)


def explicit(tag_number: int, content: bytes) -> bytes:
    return tlv(0xA0 | tag_number, content)


@functools.lru_cache(maxsize=512)
def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"invalid object identifier {dotted}")
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def time(when: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050."""
    if when.tzinfo is not timezone.utc:
        when = when.astimezone(timezone.utc)
    # formatted by hand: strftime is the slowest part of encoding a 100k-entry CRL
    body = f"{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}{when.second:02d}Z"
    if 1950 <= when.year < 2050:
        return b"\x17\x0d" + f"{when.year % 100:02d}{body}".encode()
    return b"\x18\x0f" + f"{when.year:04d}{body}".encode()


def extension(dotted: str, value: bytes, critical: bool = False) -> bytes:
    return sequence(oid(dotted), boolean(True) if critical else b"", octet_string(value))
