"""The [gateway] section of config.toml."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ca.config import CAPaths
from ca.errors import BadRequestError, ConfigError
from ca.timefmt import parse_duration

from .mqtt import parse_broker
from .topics import DEFAULT_ROOT

_DURATIONS = {"answer_ttl", "idempotency_window", "retry_every", "sweep_every"}
_KEYS = _DURATIONS | {"broker", "ca_url", "topic_root", "database", "share_group", "client_id",
                      "publish_pki", "renew_at", "renew_at_high"}


@dataclass(frozen=True)
class GatewayConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    ca_url: str = "https://127.0.0.1:8443"
    topic_root: str = DEFAULT_ROOT
    database: Path = Path("gateway.db")
    # MQTT 5 shared-subscription group: gateways in one group split the requests. Empty: plain
    # subscriptions, which mosquitto 2.0 keeps across a broker restart (it does not keep $share ones).
    share_group: str = ""
    client_id: str = "iomtca-gateway-1"
    # Unacknowledged answers are kept (and re-published on presence) this long.
    answer_ttl: timedelta = timedelta(days=30)
    # A request id answered within this window gets the same answer again (MQTT contract).
    idempotency_window: timedelta = timedelta(hours=24)
    retry_every: timedelta = timedelta(seconds=2)
    sweep_every: timedelta = timedelta(seconds=30)
    # Publish the CRL, OCSP responses and events (retained). Run it on one gateway of a group.
    publish_pki: bool = True
    # Tell devices to renew at this fraction of their certificate's lifetime (earlier when high).
    renew_at: float = 2 / 3
    renew_at_high: float = 1 / 2


def load_gateway_config(paths: CAPaths, **overrides) -> GatewayConfig:
    try:
        raw = tomllib.loads(paths.config.read_text()).get("gateway", {})
    except (FileNotFoundError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{paths.config}: {exc}") from exc
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"unknown setting(s) in [gateway]: {', '.join(sorted(unknown))}")
    values = dict(raw)
    try:
        for key in _DURATIONS & set(values):
            values[key] = parse_duration(values[key])
    except BadRequestError as exc:
        raise ConfigError(f"[gateway]: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["database"] = paths.home / values.get("database", GatewayConfig.database)
    cfg = GatewayConfig(**values)
    try:
        parse_broker(cfg.broker)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not 0 < cfg.renew_at_high <= cfg.renew_at < 1:
        raise ConfigError("[gateway] needs 0 < renew_at_high <= renew_at < 1")
    return cfg
