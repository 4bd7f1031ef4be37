"""Service-certificate renewal in the core, with an injected clock: the arithmetic (from issuance,
not from the backdated notBefore), the config rules for lifetimes, the renewals of the server
and RA certificates and of the OCSP responder, and what `iomtca status` is built from."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca import profiles, service_certs
from ca.authority import Authority
from ca.config import CAConfig, CAPaths, parse_config, render_config
from ca.errors import ConfigError, KeyPolicyError, ProofOfPossessionError, RevokedError, UnauthorizedError
from ca.issuance import BACKDATE, build_certificate, service_names
from ca.keystore import load_private_key, write_atomic
from ca.model import RevocationReason
from ca.signer import KeySigner
from tests.conftest import T0, make_csr

SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def leaf(lifetime: timedelta, now=T0, profile=profiles.SERVER) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return build_certificate(public_key=key.public_key(), subject=x509.Name([]), sans=[x509.DNSName("x.test")],
                             profile=profile, issuer=None, serial=12345678901234567890, now=now,
                             signer=KeySigner(key), lifetime=lifetime)


def not_backdated(not_before, not_after) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_after).sign(key, hashes.SHA256()))


# -- arithmetic ---------------------------------------------------------------------------------

def test_renewal_point_counts_from_issuance_not_from_the_backdated_not_before():
    cert = leaf(timedelta(seconds=30))
    assert cert.not_valid_before_utc == T0 - BACKDATE
    assert service_certs.issued_at(cert) == T0
    assert service_certs.validity(cert) == timedelta(seconds=30)
    assert service_certs.renew_at(cert) == T0 + timedelta(seconds=20)
    # a 30 s certificate is not due when it is made (from notBefore it would be, 5 min ago)
    assert not service_certs.renewal_due(cert, timedelta(seconds=30), T0)
    assert not service_certs.renewal_due(cert, timedelta(seconds=30), T0 + timedelta(seconds=19))
    assert service_certs.renewal_due(cert, timedelta(seconds=30), T0 + timedelta(seconds=20))
    assert service_certs.renewal_reason(cert, None, T0 + timedelta(seconds=31)) == "expired"


def test_a_certificate_longer_than_the_configured_lifetime_is_due_at_once():
    cert = leaf(timedelta(days=90))
    assert not service_certs.renewal_due(cert, timedelta(days=90), T0 + timedelta(days=1))
    assert service_certs.renewal_due(cert, timedelta(days=30), T0)
    assert "longer than the configured lifetime 30d" in service_certs.renewal_reason(cert, timedelta(days=30), T0)
    assert not service_certs.renewal_due(cert, None, T0)


def test_issuance_of_a_certificate_that_was_not_backdated_is_its_not_before():
    cert = not_backdated(T0, T0 + timedelta(minutes=3))   # shorter than BACKDATE, too
    assert service_certs.issued_at(cert) == T0
    assert service_certs.renew_at(cert) == T0 + timedelta(minutes=2)


# -- config -------------------------------------------------------------------------------------

def parse(text: str) -> CAConfig:
    return parse_config(tomllib.loads(text), Path("/tmp/ca"))


def test_ocsp_signer_lifetime_sets_the_ocsp_profile():
    cfg = parse('[ca]\nocsp_signer_lifetime = "2d"\n')
    assert cfg.profile("ocsp").lifetime == timedelta(days=2) == cfg.ocsp_signer_lifetime
    cfg = parse('[ca.profiles.ocsp]\nlifetime = "3d"\n')
    assert cfg.profile("ocsp").lifetime == timedelta(days=3) == cfg.ocsp_signer_lifetime
    cfg = parse('[ca]\nocsp_signer_lifetime = "36h"\n[ca.profiles.ocsp]\nlifetime = "1d12h"\n')
    assert cfg.profile("ocsp").lifetime == timedelta(hours=36)
    assert parse("").profile("ocsp").lifetime == timedelta(days=7)


def test_conflicting_ocsp_lifetimes_are_refused_naming_both():
    with pytest.raises(ConfigError) as err:
        parse('[ca]\nocsp_signer_lifetime = "2d"\n[ca.profiles.ocsp]\nlifetime = "3d"\n')
    assert "ocsp_signer_lifetime" in str(err.value) and "[ca.profiles.ocsp] lifetime" in str(err.value)
    assert "2d" in str(err.value) and "3d" in str(err.value)


def test_rendered_config_parses_back_with_its_lifetimes():
    cfg = CAConfig(ocsp_signer_lifetime=timedelta(days=2),
                   profiles={**profiles.BUILTIN, "ocsp": profiles.OCSP})
    text = render_config(cfg, passphrase_file="private/passphrase")
    back = parse(text)
    assert back.ocsp_signer_lifetime == timedelta(days=2) == back.profile("ocsp").lifetime
    assert back.profile("server").lifetime == timedelta(days=90)
    # the commented profile tables become real ones when uncommented
    uncommented = text.replace("# [ca.profiles.server]", "[ca.profiles.server]").replace(
        '# lifetime = "90d"', 'lifetime = "90d"', 1)
    assert parse(uncommented).profile("server").lifetime == timedelta(days=90)


def set_ca_tables(home: Path, tables: str) -> None:
    path = home / "config.toml"
    text = path.read_text()
    path.write_text(text.replace("\n[storage]", "\n" + tables.strip() + "\n\n[storage]", 1))


def set_ca_setting(home: Path, line: str) -> None:
    path = home / "config.toml"
    key = line.split("=")[0].strip()
    lines = [line if ln.startswith(key + " ") else ln for ln in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")


async def test_issue_service_honours_each_configured_profile_lifetime(ca_home, clock):
    set_ca_tables(ca_home, '[ca.profiles.server]\nlifetime = "1h"\n[ca.profiles.gateway]\nlifetime = "2h"')
    set_ca_setting(ca_home, 'ocsp_signer_lifetime = "3h"')
    async with await Authority.open(ca_home, clock=clock) as authority:
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        for profile, hours in (("server", 1), ("gateway", 2), ("ocsp", 3)):
            subject, sans = service_names("x", "hospital.test", "x")
            issued = await authority.issue_service(key, profile, subject, sans, actor="test")
            assert issued.certificate.not_valid_after_utc == T0 + timedelta(hours=hours), profile


# -- the server certificate -------------------------------------------------------------------

def server_cert(home: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((home / "server.pem").read_bytes())[0]


async def audit(authority, action=None):
    async with authority.store.read() as tx:
        rows = await tx.audit_rows()
    return [r for r in rows if action is None or r.action == action]


async def test_server_certificate_renews_when_due_and_only_then(ca_home, clock):
    first = server_cert(ca_home)
    clock.advance(days=1)
    async with await Authority.open(ca_home, clock=clock) as authority:
        assert not await service_certs.renew_server_certificate(authority)
        assert server_cert(ca_home) == first
        clock.now = service_certs.renew_at(first)
        assert await service_certs.renew_server_certificate(authority)
        second = server_cert(ca_home)
        assert second.serial_number != first.serial_number
        assert service_certs.issued_at(second) == clock.now
        assert not await service_certs.renew_server_certificate(authority)   # not twice
        key = load_private_key(ca_home / "private" / "server.key", authority.key_passphrase)
        assert key.public_key().public_bytes(*SPKI) == second.public_key().public_bytes(*SPKI)
        assert stat.S_IMODE((ca_home / "private" / "server.key").stat().st_mode) == 0o600
        chain = x509.load_pem_x509_certificates((ca_home / "server.pem").read_bytes())
        assert chain[1] == authority.issuer.certificate and len(chain) == 2
        rows = [r for r in await audit(authority, "certificate_issued") if json.loads(r.detail)["profile"] == "server"]
        assert rows[-1].actor == service_certs.SERVER_ACTOR and int(rows[-1].serial, 16) == second.serial_number


async def test_a_shortened_server_lifetime_renews_at_the_next_start(ca_home, clock):
    set_ca_tables(ca_home, '[ca.profiles.server]\nlifetime = "30s"')
    clock.advance(minutes=1)
    async with await Authority.open(ca_home, clock=clock) as authority:
        assert await service_certs.renew_server_certificate(authority)
        cert = server_cert(ca_home)
        assert service_certs.validity(cert) == timedelta(seconds=30)
        assert not await service_certs.renew_server_certificate(authority)
        clock.advance(seconds=19)
        assert not await service_certs.renew_server_certificate(authority)
        clock.advance(seconds=1)
        assert await service_certs.renew_server_certificate(authority)


async def test_two_processes_due_at_once_renew_once(ca_home, clock):
    clock.advance(days=61)   # past 2/3 of 90 days
    a = await Authority.open(ca_home, clock=clock)
    b = await Authority.open(ca_home, clock=clock)
    try:
        results = await asyncio.gather(service_certs.renew_server_certificate(a),
                                       service_certs.renew_server_certificate(b))
        assert sorted(results) == [False, True]
    finally:
        await a.close()
        await b.close()


async def test_a_key_that_does_not_match_is_renewed_at_start(ca_home, clock):
    async with await Authority.open(ca_home, clock=clock) as authority:
        other = ec.generate_private_key(ec.SECP256R1())
        write_atomic(ca_home / "private" / "server.key", other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(authority.key_passphrase)), mode=0o600)
        assert not await service_certs.renew_server_certificate(authority)   # the cheap check: not due
        assert await service_certs.renew_server_certificate(authority, check_key=True)
        key = load_private_key(ca_home / "private" / "server.key", authority.key_passphrase)
        assert key.public_key().public_bytes(*SPKI) == server_cert(ca_home).public_key().public_bytes(*SPKI)


# -- the OCSP responder -------------------------------------------------------------------------

async def test_responder_rotates_at_start_when_longer_than_ocsp_signer_lifetime(ca_home, clock):
    before = x509.load_pem_x509_certificate((ca_home / "ocsp.pem").read_bytes())
    clock.advance(minutes=1)
    async with await Authority.open(ca_home, clock=clock) as authority:
        assert (await authority.responder()).certificate == before     # 7 days, as configured
    set_ca_setting(ca_home, 'ocsp_signer_lifetime = "1d"')
    async with await Authority.open(ca_home, clock=clock) as authority:
        responder = await authority.responder()
        assert responder.certificate.serial_number != before.serial_number
        assert service_certs.validity(responder.certificate) == timedelta(days=1)
        assert not responder.needs_rotation(clock.now, timedelta(days=1))
        clock.advance(hours=16)
        assert responder.needs_rotation(clock.now)


def test_responder_rotation_counts_from_issuance():
    from ca.ocsp_signer import OCSPResponder
    responder = OCSPResponder(leaf(timedelta(seconds=30), profile=profiles.OCSP), None)
    assert not responder.needs_rotation(T0 + timedelta(seconds=19))
    assert responder.needs_rotation(T0 + timedelta(seconds=20))
    assert responder.needs_rotation(T0, timedelta(seconds=10))


# -- the RA certificate -------------------------------------------------------------------------

async def ra_cert(home: Path, clock) -> x509.Certificate:
    """The first RA certificate of a gateway registered and enrolled now (at `clock`)."""
    from ca import gateways
    async with await Authority.open(home, clock=clock) as authority:
        token = await gateways.register(authority, "ward-unit", actor="operator:test")
        return (await gateways.enroll(authority, "ward-unit", token.secret, make_csr()[0])).certificate


async def test_ra_renewal_keeps_the_names_and_takes_the_new_key(ca_home, clock):
    presented = await ra_cert(ca_home, clock)
    clock.advance(hours=1)
    async with await Authority.open(ca_home, clock=clock) as authority:
        csr, key = make_csr(subject="whatever-the-csr-says")
        issued = await service_certs.renew_ra_certificate(authority, presented, csr)
        cert = issued.certificate
        assert cert.subject == presented.subject
        assert (cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                == presented.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        assert cert.public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)
        assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (await authority.certificate(cert.serial_number)).profile == "gateway"
        row = (await audit(authority, "certificate_issued"))[-1]
        assert row.actor == "gateway:ward-unit" and int(row.serial, 16) == cert.serial_number
        # the new certificate renews in its turn
        again = await service_certs.renew_ra_certificate(authority, cert, make_csr()[0])
        assert again.serial != cert.serial_number


@pytest.mark.parametrize("case", ["bad-signature", "weak-key", "revoked", "expired", "not-ra", "unknown"])
async def test_ra_renewal_refusals_are_audited(ca_home, clock, case):
    presented = await ra_cert(ca_home, clock)
    clock.advance(hours=1)
    async with await Authority.open(ca_home, clock=clock) as authority:
        csr = make_csr()[0]
        expected = {"bad-signature": ProofOfPossessionError, "weak-key": KeyPolicyError, "revoked": RevokedError,
                    "expired": UnauthorizedError, "not-ra": UnauthorizedError, "unknown": UnauthorizedError}[case]
        if case == "bad-signature":
            der = bytearray(csr.public_bytes(serialization.Encoding.DER))
            der[-5] ^= 0xFF
            csr = x509.load_der_x509_csr(bytes(der))
        elif case == "weak-key":
            csr = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))[0]
        elif case == "revoked":
            await authority.revoke(presented.serial_number, RevocationReason.keyCompromise, actor="test")
        elif case == "expired":
            clock.now = presented.not_valid_after_utc + timedelta(seconds=1)
        elif case == "not-ra":
            presented = server_cert(ca_home)
        elif case == "unknown":
            presented = leaf(timedelta(days=1), profile=profiles.GATEWAY)
        before = len(await authority.certificates())
        with pytest.raises(expected):
            await service_certs.renew_ra_certificate(authority, presented, csr)
        assert len(await authority.certificates()) == before
        refused = await audit(authority, "ra_renewal_refused")
        assert len(refused) == 1 and json.loads(refused[0].detail)["code"] == expected.code


# -- status -------------------------------------------------------------------------------------

def test_status_warns_only_when_an_engineer_is_needed(ca_home, clock):
    paths = CAPaths(ca_home)
    config = parse((ca_home / "config.toml").read_text())
    assert [s.name for s in service_certs.directory_status(paths, config, T0)] == [
        "server", "OCSP responder", "issuing CA", "root CA"]
    gw = [("ward-unit", asyncio.run(ra_cert(ca_home, clock)))]
    names = [s.name for s in service_certs.directory_status(paths, config, T0, gw)]
    assert names == ["server", "OCSP responder", "gateway ward-unit RA", "issuing CA", "root CA"]
    # a day in: the 7-day responder expires within 30 days, but its renewal is ahead: no warning
    day = service_certs.directory_status(paths, config, T0 + timedelta(days=1), gw)
    assert [s.warning for s in day] == [None] * 5
    assert all(s.renew_at for s in day[:3]) and day[3].renew_at is None
    # 80 days in: the 90-day certificates are past renewal (is the server running?), the responder expired
    late = {s.name: s for s in service_certs.directory_status(paths, config, T0 + timedelta(days=80), gw)}
    assert "overdue" in late["server"].warning and "overdue" in late["gateway ward-unit RA"].warning
    assert "expired" in late["OCSP responder"].warning
    assert late["issuing CA"].warning is None
    issuing = x509.load_pem_x509_certificate((ca_home / "issuing.pem").read_bytes())
    near = {s.name: s for s in service_certs.directory_status(paths, config,
                                                             issuing.not_valid_after_utc - timedelta(days=10))}
    assert "not renewed automatically" in near["issuing CA"].warning


# -- keystore -----------------------------------------------------------------------------------

def test_write_atomic_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), (tmp_path / "f").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "f", b"data")
    assert synced == [(False, False), (True, True)]   # the file before the rename, the directory after
