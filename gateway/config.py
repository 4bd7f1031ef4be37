"""The [gateway] table of GWDIR/gateway.toml (written by `iomtca gateway init`), with flag overrides."""
from __future__ import annotations

import os
import ssl
import stat
import tomllib
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from common.errors import BadRequestError, ConfigError
from common.ids import DEVICE_ID_RE
from common.timefmt import parse_duration

from .home import GatewayHome
from .mqtt import BrokerAuth, parse_broker
from .topics import DEFAULT_ROOT

_DURATIONS = {"answer_ttl", "idempotency_window", "retry_every", "sweep_every"}
_BROKER_FILES = ("broker_ca", "broker_cert", "broker_key", "broker_password_file")
_KEYS = _DURATIONS | {"name", "broker", "ca_url", "topic_root", "database", "share_group", "client_id",
                      "publish_pki", "renew_at", "renew_at_high", "broker_username", *_BROKER_FILES,
                      "broker_control"}
# The broker secrets come from the environment (or a 0600 file), never from flags or config.toml.
PASSWORD_ENV = "IOMTCA_BROKER_PASSWORD"
KEY_PASSPHRASE_ENV = "IOMTCA_BROKER_KEY_PASSPHRASE"


@dataclass(frozen=True)
class GatewayConfig:
    name: str = ""   # as registered at the CA (`iomtca gateway add NAME`); the RA certificate's CN
    broker: str = "mqtt://127.0.0.1:1883"
    ca_url: str = "https://127.0.0.1:8443"
    topic_root: str = DEFAULT_ROOT
    database: Path = Path("gateway.db")
    # MQTT 5 shared-subscription group: gateways in one group split the requests. Empty: plain
    # subscriptions, which mosquitto 2.0 keeps across a broker restart (it does not keep $share ones).
    share_group: str = ""
    client_id: str = ""   # default: iomtca-gateway-<name>
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
    # The broker connection (mqtts:// for the files); relative paths are under GWDIR.
    broker_ca: Path | None = None
    broker_cert: Path | None = None
    broker_key: Path | None = None
    broker_username: str = ""
    broker_password_file: Path | None = None
    # Revocation at the broker: "dynsec" tells mosquitto's dynamic-security plugin to disconnect and
    # refuse a device whose certificates are revoked or held (gateway/broker_control.py). "": off.
    broker_control: str = ""
    # Built from the settings above and the environment by load_gateway_config; its repr hides secrets.
    broker_auth: BrokerAuth = field(default_factory=BrokerAuth, compare=False)


def load_gateway_config(paths: GatewayHome, *, environ: Mapping[str, str] | None = None,
                        **overrides) -> GatewayConfig:
    try:
        document = tomllib.loads(paths.config.read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{paths.config}: {exc}") from exc
    extra = set(document) - {"gateway"}
    if extra:
        raise ConfigError(f"{paths.config}: unknown table(s) {', '.join(sorted(extra))}; only [gateway] belongs here")
    raw = document.get("gateway", {})
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
    for key in _BROKER_FILES:
        if values.get(key) not in (None, ""):
            values[key] = paths.home / Path(values[key]).expanduser()
        else:
            values.pop(key, None)
    name = values.get("name")
    if not isinstance(name, str) or not DEVICE_ID_RE.match(name):
        raise ConfigError(f"{paths.config}: [gateway] name must be the name registered at the CA "
                          f"(iomtca gateway add NAME), not {name!r}")
    values.setdefault("client_id", f"iomtca-gateway-{name}")
    cfg = GatewayConfig(**values)
    try:
        _, _, tls = parse_broker(cfg.broker)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cfg = dataclasses.replace(cfg, broker_auth=_broker_auth(cfg, tls, os.environ if environ is None else environ))
    if not 0 < cfg.renew_at_high <= cfg.renew_at < 1:
        raise ConfigError("[gateway] needs 0 < renew_at_high <= renew_at < 1")
    _check_broker_control(cfg)
    return cfg


def _check_broker_control(cfg: GatewayConfig) -> None:
    """broker_control does what it says or is refused: a known mode, on the gateway that follows the
    CA's status changes (the PKI-publishing one: the others never hear of a revocation)."""
    if cfg.broker_control not in ("", "dynsec"):
        raise ConfigError(f"[gateway] broker_control must be \"dynsec\" or \"\" (off), not {cfg.broker_control!r}")
    if cfg.broker_control and not cfg.publish_pki:
        raise ConfigError("[gateway] broker_control needs publish_pki: only the PKI-publishing gateway follows "
                          "the CA's status changes (set broker_control on that one)")


def _broker_auth(cfg: GatewayConfig, tls: bool, environ: Mapping[str, str]) -> BrokerAuth:
    """Check the broker settings against each other and read the secrets: each does what it says or is refused."""
    files = [k for k in ("broker_ca", "broker_cert", "broker_key") if getattr(cfg, k) is not None]
    if files and not tls:
        raise ConfigError(f"[gateway] {', '.join(files)} need an mqtts:// broker URL, not {cfg.broker}")
    if (cfg.broker_cert is None) != (cfg.broker_key is None):
        raise ConfigError("[gateway] broker_cert and broker_key go together (the client certificate and its key)")
    passphrase = environ.get(KEY_PASSPHRASE_ENV) or None
    if passphrase is not None:
        if cfg.broker_key is None:
            raise ConfigError(f"{KEY_PASSPHRASE_ENV} is set but [gateway] broker_key is not")
        if not _is_encrypted_key(cfg.broker_key):
            raise ConfigError(f"{KEY_PASSPHRASE_ENV} is set but broker_key {cfg.broker_key} is not encrypted")
    elif cfg.broker_key is not None and _is_encrypted_key(cfg.broker_key):
        raise ConfigError(f"broker_key {cfg.broker_key} is encrypted: set {KEY_PASSPHRASE_ENV}")
    password = _broker_password(cfg, environ)
    auth = BrokerAuth(ca_file=cfg.broker_ca, cert_file=cfg.broker_cert, key_file=cfg.broker_key,
                      key_passphrase=passphrase, username=cfg.broker_username or None, password=password)
    if tls:
        try:
            auth.ssl_context()  # the files exist, parse, and the key matches the certificate
        except (OSError, ssl.SSLError, ValueError) as exc:
            names = ", ".join(f"{k}={getattr(cfg, k)}" for k in files) or "the system trust store"
            raise ConfigError(f"[gateway] broker TLS files unusable ({names}): {exc}") from None
    return auth


def _broker_password(cfg: GatewayConfig, environ: Mapping[str, str]) -> str | None:
    from_env = environ.get(PASSWORD_ENV) or None
    if from_env is not None and cfg.broker_password_file is not None:
        raise ConfigError(f"both {PASSWORD_ENV} and [gateway] broker_password_file are set: keep one")
    if not cfg.broker_username:
        if from_env is not None or cfg.broker_password_file is not None:
            source = PASSWORD_ENV if from_env is not None else "broker_password_file"
            raise ConfigError(f"{source} is set but [gateway] broker_username is not")
        return None
    if from_env is not None:
        return from_env
    if cfg.broker_password_file is None:
        raise ConfigError(f"[gateway] broker_username {cfg.broker_username!r} needs a password: set "
                          f"{PASSWORD_ENV} or broker_password_file")
    path = cfg.broker_password_file
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"broker_password_file {path} is readable by group or others "
                              f"(mode {stat.S_IMODE(mode):o}): chmod 600 it")
        password = path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"broker_password_file: {exc}") from None
    if not password:
        raise ConfigError(f"broker_password_file {path} is empty")
    return password


def _is_encrypted_key(path: Path) -> bool:
    try:
        head = path.read_bytes()[:4096]
    except OSError as exc:
        raise ConfigError(f"broker_key: {exc}") from None
    return b"ENCRYPTED" in head  # PKCS#8 "BEGIN ENCRYPTED PRIVATE KEY" or legacy "Proc-Type: 4,ENCRYPTED"
