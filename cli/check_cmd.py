"""`iomtca check`: validate a CA directory (configuration, key files, certificate chains and
expiry, the database, the audit chain) and say what is wrong, one line each. Exit 1 on any error,
or with --strict on any warning too; secrets are never printed."""
from __future__ import annotations

import inspect
import json
import logging
import os
import sqlite3
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from ca.checks import key_matches, permission_problems, signed_by
from ca.store.sqlite_check import SCHEMA_VERSION, Database
from ca.config import CAConfig, CAPaths, load_config
from ca.errors import ConfigError
from ca.keystore import PASSPHRASE_ENV, load_private_key_pem, read_passphrase
from ca.service_certs import EXPIRY_WARNING, active_gateway_certificates, read_cert, renew_at, service_certificates
from ca.store.sqlite import SQLiteStore
from ca.timefmt import to_rfc3339, utc_now

from .status_cmd import _left

log = logging.getLogger(__name__)

OK, WARN, ERROR = "ok", "warn", "error"
_LABELS = {OK: "ok", WARN: "warn", ERROR: "ERROR"}
SECTIONS = ("config", "key", "cert", "database", "audit")   # the order of the report


def add_parsers(sub, common) -> None:
    p = sub.add_parser("check", parents=[common],
                       help="validate a CA directory: config, key files, certificates, database, audit log")
    p.add_argument("--migrate", action="store_true", help="apply pending database migrations, then check")
    p.add_argument("--strict", action="store_true", help="warnings fail the check too (exit 1)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {check, status, message}")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Finding:
    check: str             # one of SECTIONS
    status: str            # OK, WARN or ERROR
    subject: str | None    # the file or certificate it is about
    text: str

    @property
    def message(self) -> str:
        return f"{self.subject}: {self.text}" if self.subject else self.text

    def line(self) -> str:
        return f"{_LABELS[self.status]:<5} {self.check}{' ' + self.subject if self.subject else ''}: {self.text}"


class Report:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.findings: list[Finding] = []

    def add(self, check: str, status: str, subject: str | None, text: str) -> None:
        self.findings.append(Finding(check, status, subject, text))

    def ok(self, check, subject, text):
        self.add(check, OK, subject, text)

    def warn(self, check, subject, text):
        self.add(check, WARN, subject, text)

    def error(self, check, subject, text):
        self.add(check, ERROR, subject, text)

    def rel(self, path: Path) -> str:
        """A path as the engineer sees it in the directory: private/issuing.key."""
        try:
            return str(Path(path).relative_to(self.home)) + ("/" if Path(path).is_dir() else "")
        except ValueError:
            return str(path)

    def count(self, status: str) -> int:
        return sum(f.status == status for f in self.findings)

    def ordered(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: SECTIONS.index(f.check))


async def _guarded(report: Report, check: str, fn, *args):
    """Run one section; a failure nobody foresaw is one ERROR line (the traceback with -v), never
    the end of the report."""
    try:
        result = fn(*args)
        return await result if inspect.isawaitable(result) else result
    except Exception as exc:
        log.debug("check %s failed", check, exc_info=True)
        report.error(check, None, f"could not be checked: {type(exc).__name__}: {exc}")
        return None


# -- 1. configuration -----------------------------------------------------------------------------

def _check_config(report: Report, paths: CAPaths) -> CAConfig | None:
    """[ca] and [storage], then the server's [enroll] and [console] as `iomtca serve` loads them."""
    from console.config import load_console_config
    from enroll.config import load_enroll_config
    try:
        config = load_config(paths)
    except ConfigError as exc:
        report.error("config", None, str(exc))
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:   # unreadable, not UTF-8, a table as a value
        report.error("config", None, f"{paths.config}: {exc}")
        return None
    fine = True
    for section, loader in (("enroll", load_enroll_config), ("console", load_console_config)):
        try:
            loader(paths)
        except ConfigError as exc:
            report.error("config", None, str(exc))
            fine = False
        except (ValueError, TypeError, AttributeError) as exc:
            report.error("config", None, f"[{section}]: {exc}")
            fine = False
    if fine:
        report.ok("config", None, str(paths.config))
    return config


# -- 2. key files ---------------------------------------------------------------------------------

def _check_keys(report: Report, paths: CAPaths, config: CAConfig) -> dict[Path, object]:
    """Modes and owners of private/ and everything in it, then each key decrypted with the
    passphrase read as `Authority.open` reads it. Returns the keys that decrypted, by path."""
    if not paths.private.is_dir():
        report.error("key", "private/", "missing")
        return {}
    refused = set()
    if problems := permission_problems(paths.private, directory=True):
        for problem in problems:
            report.error("key", "private/", problem)
    else:
        report.ok("key", "private/", f"mode {paths.private.stat().st_mode & 0o777:04o}")
    from_env = bool(os.environ.get(PASSPHRASE_ENV))
    secret_files = sorted(p for p in paths.private.iterdir() if p.is_file())
    if not from_env and config.passphrase_file and config.passphrase_file.is_file() \
            and config.passphrase_file not in secret_files:
        secret_files.append(config.passphrase_file)   # kept outside private/
    for path in secret_files:
        for problem in permission_problems(path):
            report.error("key", report.rel(path), problem)
            refused.add(path)
    try:
        passphrase = read_passphrase(config.passphrase_file)
    except ConfigError as exc:
        if config.passphrase_file not in refused:   # a mode already reported is why
            report.error("key", "passphrase", f"{exc}; the keys were not decrypted")
        return {}
    report.ok("key", "passphrase", f"from ${PASSPHRASE_ENV}" if from_env
              else f"read from {report.rel(config.passphrase_file)}")
    keys, undecrypted = {}, []
    # (path, what its absence means): None is an error; the root key may live offline; the
    # evidence signer is made on the first signed export
    wanted = [(paths.root_key, "missing: fine only if the root CA key is kept offline"), (paths.issuing_key, None),
              (paths.server_key, None), (paths.ocsp_signer, None), (paths.evidence_signer, "")]
    for path, absent in wanted:
        if not path.is_file():
            if absent is None:
                report.error("key", report.rel(path), "missing")
            elif absent:
                report.warn("key", report.rel(path), absent)
            continue
        try:
            keys[path] = load_private_key_pem(path.read_bytes(), passphrase, report.rel(path))
        except ConfigError:
            undecrypted.append(path)
        except OSError as exc:
            report.error("key", report.rel(path), f"cannot read: {exc.strerror}")
    if len(undecrypted) >= 2 and not keys:
        report.error("key", "passphrase", f"decrypts none of the {len(undecrypted)} key files: wrong passphrase "
                                          "(or every key file damaged)")
    else:
        for path in undecrypted:
            report.error("key", report.rel(path), "cannot decrypt: damaged, or encrypted with another passphrase")
    for path in keys:
        if path not in refused:
            report.ok("key", report.rel(path), f"mode {path.stat().st_mode & 0o777:04o}, decrypts")
    return keys


# -- 3. certificates --------------------------------------------------------------------------------

def _expiry(report: Report, subject: str, cert: x509.Certificate, now: datetime, *, ca: bool = False,
            renewed_by: str | None = None) -> bool:
    """Expired: an error. A CA certificate within 30 days of its end, a service certificate in the
    last third of its lifetime (past its renewal point): a warning. True when neither."""
    not_after = cert.not_valid_after_utc
    when, left = to_rfc3339(not_after), _left(int((not_after - now).total_seconds()))
    if not_after <= now:
        report.error("cert", subject, f"expired at {when}")
    elif ca and not_after - now <= EXPIRY_WARNING:
        report.warn("cert", subject, f"expires in {left} ({when}), within 30 days; it is not renewed automatically")
    elif not ca and now >= renew_at(cert):
        report.warn("cert", subject, f"expires in {left} ({when}), in the last third of its lifetime; "
                                     f"its renewal by {renewed_by} is overdue")
    else:
        return True
    return False


def _cert(report: Report, subject: str, cert, *, issuer, issuer_name: str, key=None, key_path: Path | None = None,
          now: datetime, ca: bool = False, renewed_by: str | None = None) -> x509.Certificate | None:
    """One certificate: signed by `issuer`, matching its key (when it is here), and its expiry."""
    fine = issuer is not None   # None: the issuer's own certificate is missing (reported already)
    if issuer is not None and (why := signed_by(cert, issuer)):
        report.error("cert", subject, f"not issued by the {issuer_name}: {why}")
        fine = False
    if key is not None and not key_matches(key, cert):
        report.error("cert", subject, f"does not match its key {report.rel(key_path)}")
        fine = False
    if _expiry(report, subject, cert, now, ca=ca, renewed_by=renewed_by) and fine:
        report.ok("cert", subject, f"valid until {to_rfc3339(cert.not_valid_after_utc)}, issued by the {issuer_name}")
    return cert


def _check_certs(report: Report, paths: CAPaths, keys: dict, gateway_certs, now: datetime) -> None:
    root = read_cert(paths.root_cert)
    if root is None:
        report.error("cert", "root.pem", "missing or damaged")
    else:
        _cert(report, "root.pem", root, issuer=root, issuer_name="root CA itself", key=keys.get(paths.root_key),
              key_path=paths.root_key, now=now, ca=True)
    issuing = read_cert(paths.issuing_cert)
    if issuing is None:
        report.error("cert", "issuing.pem", "missing or damaged")
    else:
        _cert(report, "issuing.pem", issuing, issuer=root, issuer_name="root CA", key=keys.get(paths.issuing_key),
              key_path=paths.issuing_key, now=now, ca=True)
    if root is not None and issuing is not None:
        try:
            chain = x509.load_pem_x509_certificates(paths.chain.read_bytes())
        except (OSError, ValueError):
            chain = None
        if chain != [issuing, root]:
            report.error("cert", "chain.pem", "is not issuing.pem followed by root.pem")
        else:
            report.ok("cert", "chain.pem", "issuing.pem followed by root.pem")
    for svc in service_certificates(paths):
        cert = read_cert(svc.cert_path)
        if cert is None:
            report.error("cert", report.rel(svc.cert_path), "missing or damaged")
            continue
        _cert(report, report.rel(svc.cert_path), cert, issuer=issuing, issuer_name="issuing CA",
              key=keys.get(svc.key_path), key_path=svc.key_path, now=now, renewed_by=svc.renewed_by)
    for gateway, cert in gateway_certs:
        _cert(report, f"gateway {gateway} RA", cert, issuer=issuing, issuer_name="issuing CA", now=now,
              renewed_by=f"gateway {gateway} (over the RA API)")
    evidence = read_cert(paths.evidence_signer) if paths.evidence_signer.is_file() else None
    if evidence is not None:   # renewed when next used (expiry or a new issuing CA): only the key can be wrong
        subject = report.rel(paths.evidence_signer)
        key = keys.get(paths.evidence_signer)
        if key is not None and not key_matches(key, evidence):
            report.error("cert", subject, "the key in the file does not match its certificate")
        else:
            report.ok("cert", subject, f"valid until {to_rfc3339(evidence.not_valid_after_utc)}, "
                                       "renewed at the next signed export when due")


# -- 4. the database ----------------------------------------------------------------------------------

async def _migrate(path: Path) -> None:
    store = await SQLiteStore.open(path)   # opening the store runs the pending migrations
    await store.close()


async def _check_database(report: Report, config: CAConfig, migrate: bool) -> Database | None:
    """Integrity, schema version (migrated first with --migrate), foreign keys. Returns the open
    database when its contents can be read further (the audit chain, gateway certificates)."""
    path, name = config.database, report.rel(config.database)
    if not path.is_file():
        report.error("database", name, "missing")
        return None
    db = None
    try:
        db = Database(path)
        if problems := db.integrity_problems():
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            report.error("database", name, f"integrity_check: {problems[0]}{more}")
            db.close()
            return None
        report.ok("database", name, "integrity_check ok")
        version = db.schema_version()
        if version > SCHEMA_VERSION:
            report.error("database", name, f"database schema {version} is newer than this iomt-ca "
                                           f"({SCHEMA_VERSION}); use a newer iomtca")
            db.close()
            return None
        if version < SCHEMA_VERSION and migrate:
            db.close()
            db = None
            try:
                await _migrate(path)
            except (sqlite3.Error, OSError) as exc:
                report.error("database", name, f"migrating schema {version} to {SCHEMA_VERSION} failed: {exc}")
                return None
            db = Database(path)
            report.ok("database", name, f"migrated schema {version} to {db.schema_version()}")
            version = db.schema_version()
        if version < SCHEMA_VERSION:
            report.warn("database", name, f"database schema {version} is older than this iomt-ca ({SCHEMA_VERSION}), "
                                          "migrations pending; run iomtca serve or iomtca check --migrate to migrate")
        else:
            report.ok("database", name, f"schema {version}, current")
        if problems := db.foreign_key_problems():
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            report.error("database", name, f"foreign_key_check: {problems[0]}{more}")
        else:
            report.ok("database", name, "foreign_key_check ok")
        db.version = version
        return db
    except (sqlite3.Error, OSError) as exc:
        report.error("database", name, f"cannot read: {exc}")
        if db is not None:
            db.close()
        return None


# -- 5. the audit chain ---------------------------------------------------------------------------------

async def _check_audit(report: Report, db: Database) -> None:
    try:
        chain = await db.verify_audit()
    except sqlite3.Error as exc:
        report.error("audit", None, f"cannot read the log: {exc}")
        return
    if chain.problems:
        more = f" (and {len(chain.problems) - 1} more)" if len(chain.problems) > 1 else ""
        report.error("audit", None, f"chain broken: {chain.problems[0]}{more}, in {chain.entries} entries; "
                                    "`iomtca audit verify` lists every problem")
    else:
        report.ok("audit", None, f"chain intact: {chain.entries} entries, head {chain.head or '-'}")


async def _gateway_certificates(db: Database | None) -> list:
    if db is None or db.version != SCHEMA_VERSION:   # an older schema may lack the tables
        return []
    return await active_gateway_certificates(db)


async def run(args) -> int:
    paths = CAPaths(Path(args.dir))
    report = Report(paths.home)
    now = utc_now()
    config = await _guarded(report, "config", _check_config, report, paths)
    if config is not None:
        keys = await _guarded(report, "key", _check_keys, report, paths, config) or {}
        db = await _guarded(report, "database", _check_database, report, config, args.migrate)
        try:
            gateway_certs = await _guarded(report, "cert", _gateway_certificates, db) or []
            await _guarded(report, "cert", _check_certs, report, paths, keys, gateway_certs, now)
            if db is not None:
                await _guarded(report, "audit", _check_audit, report, db)
        finally:
            if db is not None:
                db.close()
    errors, warnings = report.count(ERROR), report.count(WARN)
    if args.json:
        print(json.dumps([{"check": f.check, "status": f.status, "message": f.message} for f in report.ordered()],
                         indent=2))
    else:
        for finding in report.ordered():
            print(finding.line())
    if errors or (args.strict and warnings):
        print(f"iomtca: error: {paths.home}: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
        return 1
    if not args.json:
        print(f"check passed: {paths.home}: {report.count(OK)} checks ok, {warnings} warning(s)")
    return 0
