"""Typed keys of the console's application and of its requests."""
from __future__ import annotations

from aiohttp import web

from ca.authority import Authority
from enroll.config import EnrollConfig

from .config import ConsoleConfig

AUTHORITY = web.AppKey("authority", Authority)
CONSOLE_CONFIG = web.AppKey("console_config", ConsoleConfig)
ENROLL_CONFIG = web.AppKey("enroll_config", EnrollConfig)
TEMPLATES = web.AppKey("templates", object)
OPERATOR = web.RequestKey("operator", object)   # the authenticated ca.operators.Operator
SESSION = web.RequestKey("session", str)       # its session secret, for a cookie-authenticated request
