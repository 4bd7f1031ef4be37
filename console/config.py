"""The [console] section of config.toml: the console's listener and its session lifetimes."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import timedelta

from ca.config import CAPaths
from ca.errors import BadRequestError, ConfigError
from ca.timefmt import parse_duration
from enroll.config import parse_listen

_KEYS = {"listen", "session_idle", "session_max"}


@dataclass(frozen=True)
class ConsoleConfig:
    # its own HTTPS listener, with the server certificate; `iomtca serve --console-listen` overrides
    listen: str = "127.0.0.1:8444"
    session_idle: timedelta = timedelta(minutes=15)   # a session unused this long ends
    session_max: timedelta = timedelta(hours=8)       # and any session after this long


def load_console_config(paths: CAPaths) -> ConsoleConfig:
    try:
        raw = tomllib.loads(paths.config.read_text()).get("console", {})
    except (FileNotFoundError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{paths.config}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("[console] must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"unknown setting(s) in [console]: {', '.join(sorted(unknown))}")
    d = ConsoleConfig()
    values = {}
    for name in ("session_idle", "session_max"):
        if name in raw:
            try:
                values[name] = parse_duration(str(raw[name]))
            except BadRequestError as exc:
                raise ConfigError(f"[console] {name}: {exc}") from None
            if values[name] < timedelta(minutes=1):
                raise ConfigError(f"[console] {name} must be at least 1m")
    cfg = ConsoleConfig(listen=str(raw.get("listen", d.listen)), **values)
    parse_listen(cfg.listen)
    if cfg.session_idle > cfg.session_max:
        raise ConfigError("[console] session_idle cannot be longer than session_max")
    return cfg
