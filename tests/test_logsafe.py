"""Log hygiene (common/logsafe.py): interpolated values cannot forge lines, and aiohttp's refusals
of malformed HTTP are one INFO line, not an ERROR with a traceback."""
from __future__ import annotations

import io
import logging

from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from common import logsafe


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handler.addFilter(logsafe.SafeRecords())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def test_control_characters_in_values_are_escaped():
    logger, out = _logger("test.logsafe.values")
    logger.info("refused device=%s reason=%s", "nobody\nINJECTED", "bell\x07 and \x1b[31mred\u2028")
    text = out.getvalue()
    assert text.count("\n") == 1, text
    assert "nobody\\x0aINJECTED" in text and "\\x07" in text and "\\x1b[31m" in text and "\\u2028" in text


def test_our_own_tracebacks_keep_their_lines():
    logger, out = _logger("test.logsafe.ours")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("internal error on %s", "POST /x")
    text = out.getvalue()
    assert text.startswith("ERROR ") and "Traceback" in text and "RuntimeError: boom" in text


def test_aiohttp_parser_refusals_become_one_info_line():
    logger, out = _logger("aiohttp.server")
    for exc in (BadHttpMessage("Invalid header token: b'Ho\\x06t'"), LineTooLong("a" * 9000, "8190")):
        try:
            raise exc
        except BadHttpMessage:
            logger.exception("Error handling request from %s", "127.0.0.1")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("INFO aiohttp.server malformed HTTP request from 127.0.0.1: ") for line in lines), lines
    assert "Traceback" not in out.getvalue() and len(lines[1]) < 500


def test_other_aiohttp_errors_are_left_alone():
    logger, out = _logger("aiohttp.server")
    try:
        raise OSError("disk")
    except OSError:
        logger.exception("Error handling request from %s", "127.0.0.1")
    assert out.getvalue().startswith("ERROR ") and "Traceback" in out.getvalue()
