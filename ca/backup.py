"""`iomtca backup` and `iomtca restore`: a CA directory in one archive, taken while the server runs,
and put back only when every part of it is what the archive's manifest says.

The archive is a tar file (0600) holding `MANIFEST.json` first, then `iomtca.db` (a consistent
copy by SQLite's online backup API, store/sqlite_backup.py), `config.toml`, the certificates of
the directory, the keys under `private/` as they are stored (encrypted with the CA passphrase),
and the audit anchor file when it is inside the directory. The passphrase file is left out unless
asked for (`include_passphrase`): a backup that holds the keys and the passphrase that opens them
is a copy of the CA for whoever reads it; keep the passphrase apart (docs/OPERATIONS.md).

The manifest names every member with its size, SHA-256 and mode, and records the schema version,
the audit chain's entry count and head hash, and the CRL number series, as of the copy. A restore
refuses (BackupError, one line saying what is wrong) an archive that is not a tar file, lacks its
manifest, holds a member the manifest does not name or a name that would leave the target
directory, misses one it names, or whose bytes do not match; then a restored database that fails
its integrity check or whose audit chain is broken or differs from the manifest's head.

What a restore does not do yet (issue 14): refuse to start a CA restored from an older backup
until the revocations made since are replayed or the loss acknowledged, and move the CRL number
above any published after the backup (the anchors record it: ca/audit_anchor.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from .config import CAPaths, load_config
from .errors import CAError
from .store import sqlite_backup
from .timefmt import to_rfc3339, utc_now

FORMAT = "iomtca-backup/1"
MANIFEST = "MANIFEST.json"
DATABASE = "iomtca.db"
MAX_MEMBER = 64 * 1024 ** 3   # a member larger than this is no backup of ours


class BackupError(CAError):
    code = "bad_request"


@dataclass(frozen=True)
class Summary:
    path: Path
    members: int
    bytes: int
    schema_version: int
    audit_entries: int
    audit_head: str | None
    crl_number: int | None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _members(paths: CAPaths, anchor_file: Path, include_passphrase: bool) -> list[tuple[str, Path]]:
    """(name in the archive, file) of everything but the database."""
    home = paths.home
    out = [("config.toml", paths.config)]
    out += [(p.name, p) for p in sorted(home.glob("*.pem")) if p.is_file()]
    for p in sorted(paths.private.iterdir()):
        if p.is_file() and (include_passphrase or p != paths.passphrase):
            out.append((f"private/{p.name}", p))
    anchors = Path(anchor_file).resolve()
    if anchors.is_file() and anchors.parent == home.resolve():   # outside, as it should be: not ours to copy
        out.append((anchors.name, anchors))
    return out


async def backup(home: Path, out: Path, *, include_passphrase: bool = False, now: datetime | None = None) -> Summary:
    """Write the archive of CA directory `home` to `out` (refused if it exists)."""
    paths = CAPaths(Path(home))
    config = load_config(paths)
    out = Path(out)
    if out.exists():
        raise BackupError(f"{out} exists; a backup never overwrites a file")
    with tempfile.TemporaryDirectory(prefix="iomtca-backup-") as tmp:
        copy = Path(tmp) / DATABASE
        await asyncio.to_thread(sqlite_backup.snapshot, config.database, copy)
        problems, version, entries, head = await sqlite_backup.inspect(copy)
        if problems:
            raise BackupError(f"the database copy fails its checks: {problems[0]}")
        members = [(DATABASE, copy)] + _members(paths, config.audit.anchor_file, include_passphrase)
        manifest = {"format": FORMAT, "created_at": to_rfc3339(now or utc_now()), "source": str(paths.home),
                    "schema_version": version, "audit": {"entries": entries, "head": head},
                    "crl_number": sqlite_backup.crl_number(copy), "passphrase_included": include_passphrase,
                    "members": [{"name": name, "size": p.stat().st_size, "sha256": _sha256(p),
                                 "mode": "0600" if name.startswith("private/") or name == DATABASE else "0644"}
                                for name, p in members]}
        await asyncio.to_thread(_write, out, manifest, members)
    return Summary(out, len(members), out.stat().st_size, version, entries, head, manifest["crl_number"])


def _write(out: Path, manifest: dict, members: list[tuple[str, Path]]) -> None:
    partial = out.with_name(out.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
            for name, path in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode = path.stat().st_size, 0o600
                with open(path, "rb") as src:
                    tar.addfile(info, src)
            tar.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# -- restore -------------------------------------------------------------------------------------

def _safe_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or name != p.as_posix():
        raise BackupError(f"archive member {name[:80]!r} would leave the CA directory; not a backup of ours")
    if len(p.parts) > 2 or (len(p.parts) == 2 and p.parts[0] != "private"):
        raise BackupError(f"archive member {name[:80]!r} is not where a CA directory keeps files")
    return name


def _read_manifest(tar: tarfile.TarFile) -> tuple[dict, tarfile.TarInfo]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile() or first.size > 1 << 20:
        raise BackupError(f"the archive does not start with {MANIFEST}; not an iomtca backup")
    try:
        manifest = json.loads(tar.extractfile(first).read())
    except (ValueError, UnicodeDecodeError):
        raise BackupError(f"{MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{MANIFEST} is not of format {FORMAT}")
    members = manifest.get("members")
    if not isinstance(members, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("size"), int)
            and isinstance(m.get("sha256"), str) for m in members):
        raise BackupError(f"{MANIFEST} lists its members wrongly")
    return manifest, first


async def restore(archive: Path, target: Path) -> Summary:
    """Unpack `archive` into the new directory `target`, refusing at the first thing that is wrong."""
    archive, target = Path(archive), Path(target)
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} exists and is not empty; restore into a new directory")
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=target.parent if target.parent.exists() else None))
    try:
        manifest = await asyncio.to_thread(_unpack, archive, staging)
        problems, version, entries, head = await sqlite_backup.inspect(staging / DATABASE)
        if problems:
            raise BackupError(f"the restored database fails its checks: {problems[0]}")
        if (entries, head) != (manifest["audit"]["entries"], manifest["audit"]["head"]):
            raise BackupError(f"the restored audit log ({entries} entries, head {head}) is not the one the manifest "
                              f"recorded ({manifest['audit']['entries']}, {manifest['audit']['head']})")
        os.chmod(staging, 0o700)
        os.chmod(staging / "private", 0o700)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Summary(target, len(manifest["members"]), archive.stat().st_size, version, entries, head,
                   manifest.get("crl_number"))


def _unpack(archive: Path, staging: Path) -> dict:
    try:
        tar = tarfile.open(archive, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise BackupError(f"{archive} is not a backup archive: {exc}") from None
    with tar:
        try:
            manifest, first = _read_manifest(tar)
            expected = {m["name"]: m for m in manifest["members"]}
            for name in expected:
                _safe_name(name)
            if DATABASE not in expected or "config.toml" not in expected:
                raise BackupError(f"{MANIFEST} names no {DATABASE} or config.toml")
            seen = set()
            (staging / "private").mkdir(mode=0o700)
            for member in tar:
                if member.offset == first.offset:   # the manifest itself, read above
                    continue
                name = _safe_name(member.name)
                if name not in expected or name in seen:
                    raise BackupError(f"archive member {name!r} is not in {MANIFEST}" if name not in expected
                                      else f"archive member {name!r} appears twice")
                if not member.isfile() or member.size != expected[name]["size"] or member.size > MAX_MEMBER:
                    raise BackupError(f"archive member {name!r} is not the {expected[name]['size']}-byte file "
                                      f"{MANIFEST} names")
                seen.add(name)
                digest = hashlib.sha256()
                dest = staging / name
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out, tar.extractfile(member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != expected[name]["sha256"]:
                    raise BackupError(f"archive member {name!r} is damaged: its SHA-256 is not the manifest's")
                if expected[name].get("mode") == "0644":
                    os.chmod(dest, 0o644)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BackupError(f"{archive} is damaged: {type(exc).__name__}: {exc}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise BackupError(f"the archive ends before {missing[0]!r}, which {MANIFEST} names (truncated?)")
    return manifest
