"""Typed keys for what the aiohttp applications share (aiohttp `web.AppKey`)."""
from __future__ import annotations

from concurrent.futures import Executor

from aiohttp import web

from ca.authority import Authority

from .config import EnrollConfig
from .publication import Publisher

AUTHORITY = web.AppKey("authority", Authority)
CONFIG = web.AppKey("config", EnrollConfig)
PUBLISHER = web.AppKey("publisher", Publisher)
KEYGEN = web.AppKey("keygen", Executor)
# the name of the gateway whose RA certificate opened this request (enroll/ra.py `_require_ra`)
RA_GATEWAY = web.RequestKey("ra_gateway", str)
