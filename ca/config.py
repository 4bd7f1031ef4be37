"""The CA directory layout and the [ca], [storage] and [audit] sections of config.toml."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from common.keyfiles import toml_str

from . import profiles as profiles_mod
from .errors import BadRequestError, ConfigError
from .model import check_trust_domain
from .signer import KEY_TYPES
from .timefmt import format_duration, parse_duration


@dataclass(frozen=True)
class CAPaths:
    """Where `iomtca init` puts things inside the CA directory."""

    home: Path

    config: Path = field(init=False)
    root_cert: Path = field(init=False)
    chain: Path = field(init=False)
    issuing_cert: Path = field(init=False)
    ocsp_cert: Path = field(init=False)
    server_cert: Path = field(init=False)
    private: Path = field(init=False)
    root_key: Path = field(init=False)
    issuing_key: Path = field(init=False)
    ocsp_signer: Path = field(init=False)
    server_key: Path = field(init=False)
    evidence_signer: Path = field(init=False)
    passphrase: Path = field(init=False)

    def __post_init__(self) -> None:
        h = self.home
        private = h / "private"
        values = dict(
            config=h / "config.toml", root_cert=h / "root.pem", chain=h / "chain.pem",
            issuing_cert=h / "issuing.pem", ocsp_cert=h / "ocsp.pem", server_cert=h / "server.pem",
            private=private, root_key=private / "root.key",
            issuing_key=private / "issuing.key", ocsp_signer=private / "ocsp-signer.pem",
            server_key=private / "server.key", passphrase=private / "passphrase",
            evidence_signer=private / "evidence-signer.pem",   # made on the first export (ca/evidence.py)
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class ModelPolicy:
    """Settings for a class of devices: [ca.models."<model>"] or [ca.criticality.<level>].

    A model's setting wins over its criticality's, which wins over the [ca] default.
    """

    lifetime: timedelta | None = None
    renewal_grace: timedelta | None = None
    # Absent (no presence, posture or request) longer than this: certificates put on hold.
    non_attendance: timedelta | None = None
    # Renewal is refused (posture_noncompliant) below this firmware version.
    min_firmware: str | None = None


@dataclass(frozen=True)
class AttendancePolicy:
    """[ca.attendance]: what happens to devices away longer than their non_attendance period."""

    # A life-sustaining device must not lose its identity silently: high is flagged, not held.
    hold_high_criticality: bool = False
    # A held device that comes back (and passes posture) gets its certificates released.
    release_on_return: bool = True
    check_every: timedelta = timedelta(minutes=1)


@dataclass(frozen=True)
class ApprovalPolicy:
    """[ca.approval]: which first enrollments wait for `iomtca device approve`."""

    criticality: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()

    def required(self, device) -> bool:
        return device.criticality.value in self.criticality or device.model in self.models


@dataclass(frozen=True)
class AuditConfig:
    """[audit]: where and how often the server records the audit chain's head outside the
    database (ca/audit_anchor.py), so entries cut off the end or a rewritten history show."""

    anchor_file: Path = Path("audit-anchors.jsonl")   # CADIR/audit-anchors.jsonl once parsed
    anchor_every: timedelta = timedelta(minutes=15)


@dataclass(frozen=True)
class CAConfig:
    trust_domain: str = "iomt.local"
    key_type: str = "ec-p256"
    base_url: str = "http://127.0.0.1:8080"
    crl_next_update: timedelta = timedelta(hours=24)
    ocsp_validity: timedelta = timedelta(hours=12)
    ocsp_signer_lifetime: timedelta = timedelta(days=7)
    token_ttl: timedelta = timedelta(days=7)
    # How long after expiry a certificate still authenticates its own renewal.
    renewal_grace: timedelta = timedelta(days=7)
    approval: ApprovalPolicy = ApprovalPolicy()
    attendance: AttendancePolicy = AttendancePolicy()
    criticality: dict[str, ModelPolicy] = field(default_factory=dict)
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    passphrase_file: Path | None = None
    database: Path = Path("iomtca.db")
    profiles: dict[str, profiles_mod.Profile] = field(default_factory=lambda: dict(profiles_mod.BUILTIN))
    models: dict[str, ModelPolicy] = field(default_factory=dict)
    audit: AuditConfig = AuditConfig()

    @property
    def crl_url(self) -> str:
        return self.base_url.rstrip("/") + "/crl"

    @property
    def ocsp_url(self) -> str:
        return self.base_url.rstrip("/") + "/ocsp"

    @property
    def ca_issuers_url(self) -> str:
        return self.base_url.rstrip("/") + "/ca.cer"

    def profile(self, name: str) -> profiles_mod.Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(f"unknown profile {name!r}") from None

    def _setting(self, device, name: str, default):
        for policy in (self.models.get(device.model), self.criticality.get(device.criticality.value)):
            value = getattr(policy, name, None) if policy else None
            if value is not None:
                return value
        return default

    def device_lifetime(self, device, profile: str = "device") -> timedelta:
        """Per model (then criticality) lifetime for the default device profile; other profiles keep theirs."""
        if profile != "device":
            return self.profile(profile).lifetime
        return self._setting(device, "lifetime", self.profile(profile).lifetime)

    def renewal_grace_for(self, device) -> timedelta:
        return self._setting(device, "renewal_grace", self.renewal_grace)

    def non_attendance_for(self, device) -> timedelta | None:
        return self._setting(device, "non_attendance", None)

    def min_firmware_for(self, device) -> str | None:
        return self._setting(device, "min_firmware", None)


_CA_KEYS = {"trust_domain", "key_type", "base_url", "crl_next_update", "ocsp_validity",
            "ocsp_signer_lifetime", "token_ttl", "renewal_grace", "server_names", "passphrase_file",
            "profiles", "models", "approval", "criticality", "attendance"}


def _duration(section: dict, key: str, default: timedelta | None, where: str,
              allow_zero: bool = False) -> timedelta | None:
    if key not in section:
        return default
    try:
        value = parse_duration(str(section[key]))
    except BadRequestError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from exc
    if value < timedelta(0) or (value == timedelta(0) and not allow_zero):
        raise ConfigError(f"{where}.{key} must be positive")
    return value


_CLASS_KEYS = {"lifetime", "renewal_grace", "non_attendance", "min_firmware"}


def _class_policy(section: dict, where: str) -> ModelPolicy:
    unknown = set(section) - _CLASS_KEYS
    if unknown:
        raise ConfigError(f"[{where}]: unknown setting(s) {', '.join(sorted(unknown))}")
    min_firmware = section.get("min_firmware")
    if min_firmware is not None and not isinstance(min_firmware, str):
        raise ConfigError(f"[{where}] min_firmware must be a string such as \"2.4.1\"")
    return ModelPolicy(
        lifetime=_duration(section, "lifetime", None, where),
        renewal_grace=_duration(section, "renewal_grace", None, where, allow_zero=True),
        non_attendance=_duration(section, "non_attendance", None, where),
        min_firmware=min_firmware)


def _profiles(section: dict, lifetimes: dict[str, timedelta] | None = None) -> dict[str, profiles_mod.Profile]:
    """Built-in profiles with lifetimes from config, plus new ones derived with `base = "..."`.

    `lifetimes`: built-in lifetimes set elsewhere in [ca] (`ocsp_signer_lifetime`), applied first.
    """
    result = dict(profiles_mod.BUILTIN)
    for name, lifetime in (lifetimes or {}).items():
        result[name] = replace(result[name], lifetime=lifetime)
    for name, body in section.items():
        base_name = body.get("base", name)
        if base_name not in result:
            raise ConfigError(f"[ca.profiles.{name}]: no base profile {base_name!r}; "
                              f"add base = one of {', '.join(profiles_mod.BUILTIN)}")
        if name not in result and "base" not in body:
            raise ConfigError(f"[ca.profiles.{name}]: a new profile needs base = \"device\" or another")
        unknown = set(body) - {"base", "lifetime"}
        if unknown:
            raise ConfigError(f"[ca.profiles.{name}]: unknown setting(s) {', '.join(sorted(unknown))}")
        base = result[base_name]
        result[name] = replace(base, name=name,
                               lifetime=_duration(body, "lifetime", base.lifetime, f"ca.profiles.{name}"))
    return result


def _ocsp_lifetime(ca: dict) -> dict[str, timedelta]:
    """`ocsp_signer_lifetime` is the `ocsp` profile's lifetime, said in [ca]: both may be set only
    when they agree."""
    signer = _duration(ca, "ocsp_signer_lifetime", None, "ca")
    if signer is None:
        return {}
    section = ca.get("profiles", {}).get("ocsp", {})
    profile = _duration(section, "lifetime", None, "ca.profiles.ocsp") if isinstance(section, dict) else None
    if profile is not None and profile != signer:
        raise ConfigError(
            f"[ca] ocsp_signer_lifetime = {format_duration(signer)!r} and [ca.profiles.ocsp] lifetime = "
            f"{format_duration(profile)!r} disagree: both set the OCSP responder's lifetime; keep one of them")
    return {"ocsp": signer}


_AUDIT_KEYS = {"anchor_file", "anchor_every"}


def _audit(section, home: Path, database: Path) -> AuditConfig:
    """[audit]: the anchor file (relative to the CA directory) and how often it is written."""
    if not isinstance(section, dict):
        raise ConfigError("[audit] must be a table")
    unknown = set(section) - _AUDIT_KEYS
    if unknown:
        raise ConfigError(f"[audit]: unknown setting(s) {', '.join(sorted(unknown))}")
    defaults = AuditConfig()
    name = section.get("anchor_file", str(defaults.anchor_file))
    if not isinstance(name, str) or not name.strip() or "\0" in name or name.endswith(("/", "\\")):
        raise ConfigError("[audit] anchor_file must name a file, e.g. \"audit-anchors.jsonl\" (in the CA "
                          "directory) or an absolute path on another disk")
    anchor_file = home / name
    if anchor_file.name in ("", ".", ".."):
        raise ConfigError(f"[audit] anchor_file {name!r} must name a file, not a directory")
    # the anchors exist to catch what is done to the database: never the database or its journals
    db = os.path.abspath(database)
    if os.path.abspath(anchor_file) in (db, db + "-wal", db + "-shm", db + "-journal",
                                        os.path.abspath(home / "config.toml")):
        raise ConfigError(f"[audit] anchor_file {name!r} is the database or the configuration; "
                          "it must be a file of its own, outside the database")
    every = _duration(section, "anchor_every", defaults.anchor_every, "audit")
    if every < timedelta(seconds=1):
        raise ConfigError("[audit] anchor_every must be at least 1s")
    return AuditConfig(anchor_file=anchor_file, anchor_every=every)


def load_config(paths: CAPaths) -> CAConfig:
    try:
        raw = tomllib.loads(paths.config.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{paths.home} is not a CA directory (no config.toml); run `iomtca init --dir {paths.home}`") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{paths.config}: {exc}") from exc
    return parse_config(raw, paths.home)


def parse_config(raw: dict, home: Path) -> CAConfig:
    if "gateway" in raw:
        # every setting does what it says or is refused: the gateway no longer reads this file
        raise ConfigError("config.toml has a [gateway] section: a gateway's settings live in its own "
                          "directory (GWDIR/gateway.toml, written by `iomtca gateway init`); remove it here")
    ca = raw.get("ca", {})
    unknown = set(ca) - _CA_KEYS
    if unknown:
        raise ConfigError(f"unknown setting(s) in [ca]: {', '.join(sorted(unknown))}")
    defaults = CAConfig()
    try:
        trust_domain = check_trust_domain(ca.get("trust_domain", defaults.trust_domain))
    except BadRequestError as exc:
        raise ConfigError(str(exc)) from exc
    key_type = ca.get("key_type", defaults.key_type)
    if key_type not in KEY_TYPES:
        raise ConfigError(f"[ca] key_type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    profiles = _profiles(ca.get("profiles", {}), _ocsp_lifetime(ca))
    models = {model: _class_policy(section, f"ca.models.{model}") for model, section in ca.get("models", {}).items()}
    by_criticality = {}
    for level, section in ca.get("criticality", {}).items():
        if level not in ("low", "medium", "high"):
            raise ConfigError(f"[ca.criticality.{level}]: criticality is one of low, medium, high")
        by_criticality[level] = _class_policy(section, f"ca.criticality.{level}")
    att = ca.get("attendance", {})
    unknown_att = set(att) - {"hold_high_criticality", "release_on_return", "check_every"}
    if unknown_att:
        raise ConfigError(f"[ca.attendance]: unknown setting(s) {', '.join(sorted(unknown_att))}")
    attendance = AttendancePolicy(
        hold_high_criticality=bool(att.get("hold_high_criticality", False)),
        release_on_return=bool(att.get("release_on_return", True)),
        check_every=_duration(att, "check_every", AttendancePolicy().check_every, "ca.attendance"))
    approval_section = ca.get("approval", {})
    criticality = frozenset(approval_section.get("criticality", []))
    if criticality - {"low", "medium", "high"}:
        raise ConfigError("[ca.approval] criticality takes a list of low, medium, high")
    approval = ApprovalPolicy(criticality, frozenset(approval_section.get("models", [])))
    passphrase_file = ca.get("passphrase_file")
    storage = raw.get("storage", {})
    database = home / storage.get("path", str(defaults.database))
    return CAConfig(
        trust_domain=trust_domain,
        key_type=key_type,
        base_url=ca.get("base_url", defaults.base_url),
        crl_next_update=_duration(ca, "crl_next_update", defaults.crl_next_update, "ca"),
        ocsp_validity=_duration(ca, "ocsp_validity", defaults.ocsp_validity, "ca"),
        ocsp_signer_lifetime=profiles["ocsp"].lifetime,
        token_ttl=_duration(ca, "token_ttl", defaults.token_ttl, "ca"),
        renewal_grace=_duration(ca, "renewal_grace", defaults.renewal_grace, "ca", allow_zero=True),
        approval=approval,
        attendance=attendance,
        criticality=by_criticality,
        server_names=tuple(ca.get("server_names", defaults.server_names)),
        passphrase_file=(home / passphrase_file) if passphrase_file else None,
        database=database,
        profiles=profiles,
        models=models,
        audit=_audit(raw.get("audit", {}), home, database),
    )


def render_config(cfg: CAConfig, *, passphrase_file: str | None) -> str:
    """The config.toml `iomtca init` writes: every setting spelled out with its meaning."""
    names = ", ".join(toml_str(n) for n in cfg.server_names)
    lines = [
        "# iomt-ca configuration, written by `iomtca init`. Durations: 90s, 30m, 72h, 7d, 1d12h.",
        "[ca]",
        f"trust_domain = {toml_str(cfg.trust_domain)}   # SPIFFE trust domain of device identities",
        f"key_type = {toml_str(cfg.key_type)}          # key type of the CA and service keys",
        "# Base URL of the plain-HTTP OCSP/CRL listener, written into every certificate's",
        "# CRL distribution point (/crl) and AIA (/ocsp, /ca.cer). Change it for a real deployment.",
        f"base_url = {toml_str(cfg.base_url)}",
        f"crl_next_update = {toml_str(format_duration(cfg.crl_next_update))}",
        f"ocsp_validity = {toml_str(format_duration(cfg.ocsp_validity))}        # nextUpdate of OCSP responses",
        f"ocsp_signer_lifetime = {toml_str(format_duration(cfg.ocsp_signer_lifetime))}  # rotated at 2/3 of it",
        f"token_ttl = {toml_str(format_duration(cfg.token_ttl))}            # enrollment token lifetime",
        f"renewal_grace = {toml_str(format_duration(cfg.renewal_grace))}        # an expired certificate may renew itself this long",
        f"server_names = [{names}]   # SANs of the enrollment server certificate",
    ]
    if passphrase_file:
        lines.append(f"passphrase_file = {toml_str(passphrase_file)}   # or set IOMTCA_PASSPHRASE")
    lines += [
        "",
        "[ca.profiles.device]",
        f"lifetime = {toml_str(format_duration(cfg.profile('device').lifetime))}",
        "",
        "# Service certificates renew themselves at 2/3 of their lifetime, and at start when longer",
        "# than the lifetime set here (`iomtca status` shows when). The OCSP responder's lifetime is",
        "# ocsp_signer_lifetime above (or [ca.profiles.ocsp] lifetime, not both).",
        "# [ca.profiles.server]      # the EST server's TLS certificate (server.pem)",
        f"# lifetime = {toml_str(format_duration(cfg.profile('server').lifetime))}",
        "# [ca.profiles.gateway]     # a gateway's RA client certificate (iomtca gateway add / gateway init)",
        f"# lifetime = {toml_str(format_duration(cfg.profile('gateway').lifetime))}",
        "",
        "# A further device profile, selected by an EST label (/.well-known/est/demo/...):",
        "# [ca.profiles.demo]",
        '# base = "device"',
        '# lifetime = "2m"',
        "",
        "# Per device model overrides, e.g.:",
        '# [ca.models."infusion-pump"]',
        '# lifetime = "48h"',
        '# renewal_grace = "90d"     # a standby pump may sit in storage',
        '# non_attendance = "90d"    # away longer: certificates put on hold',
        '# min_firmware = "12.1.0"   # below it, renewal is refused (posture_noncompliant)',
        "",
        "# Per criticality (a model's own setting wins):",
        "# [ca.criticality.high]",
        '# renewal_grace = "1d"',
        '# non_attendance = "1d"     # a bedside monitor should never be away for long',
        "",
        "# [ca.attendance]",
        "# hold_high_criticality = false   # high-criticality devices are flagged, not held",
        "# release_on_return = true        # a held device that returns with good posture is released",
        '# check_every = "1m"',
        "",
        "# First enrollments that wait for `iomtca device approve ID --fingerprint FP` (EST answers 202;",
        "# `iomtca device pending` lists each waiting key's fingerprint):",
        "[ca.approval]",
        "criticality = []           # e.g. [\"high\"]",
        "models = []",
        "",
        "[storage]",
        f"path = {toml_str(cfg.database.name)}",
        "",
        "# The server records the audit chain's head (entry id, hash, CRL number) in an append-only",
        "# file outside the database; `iomtca audit verify` checks the log against it. Put it where",
        "# whoever can write the database cannot rewrite it (another disk, a log shipper).",
        "# [audit]",
        f"# anchor_file = {toml_str(cfg.audit.anchor_file.name)}   # relative to the CA directory",
        f"# anchor_every = {toml_str(format_duration(cfg.audit.anchor_every))}",
        "",
    ]
    return "\n".join(lines)
