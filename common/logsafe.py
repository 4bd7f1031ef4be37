"""Log hygiene for every process: one line per message, no control characters, and malformed HTTP
from strangers as a one-line notice instead of an ERROR with a traceback.

- Whatever a message interpolates (a device id, a topic, a reason a parser gave) is escaped: a
  control character becomes `\\xNN`, so `"nobody\\nINJECTED"` cannot forge a second log line.
  Tracebacks of our own errors keep their lines.
- aiohttp logs a request its HTTP parser refuses (a bad header, a line over 8 KiB, broken
  chunking) as "Error handling request" at ERROR with a traceback: the client gets its 400 either
  way, and a scanner would fill the log. Those become one INFO line naming the source and the
  parser's reason. Any other error aiohttp logs is left as it is.
"""
from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def _http_parser_error(exc: BaseException | None) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError
    return isinstance(exc, HttpProcessingError)


class SafeRecords(logging.Filter):
    """Escapes each record's message; turns aiohttp's parser refusals into one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and _http_parser_error(exc):
            reason = " ".join(str(getattr(exc, "message", "") or exc).split())
            record.msg, record.args = "malformed HTTP %s: %s", (record.getMessage().replace(
                "Error handling request", "request").strip(), reason[:300])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        try:
            message = record.getMessage()
        except Exception:   # a broken format string: the logging module reports it itself
            return True
        record.msg, record.args = escape(message), None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (the root logger): records of all loggers pass
    through those handlers, and a handler filter sees each of them."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, SafeRecords) for f in handler.filters):
            handler.addFilter(SafeRecords())


class JsonFormatter(logging.Formatter):
    """`--log-format json`: one JSON object per line (time in RFC 3339 UTC, level, logger, the
    process's role, message, and a traceback as one string), for a SIEM or a log shipper. The
    message is the escaped one SafeRecords made; JSON escapes the rest."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import datetime, timezone
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self._role:
            entry["process"] = self._role
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


FORMATS = ("text", "json")


def configure(level: int, log_format: str = "text", role: str = "") -> None:
    """The root logger for a process: text (`time LEVEL [role] logger message`) or JSON lines, on
    stderr, through SafeRecords."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        prefix = f"{role} " if role else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    install(root)
