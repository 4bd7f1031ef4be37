"""Shared fixtures: a CA directory made once per session and copied per test, and a settable clock."""
from __future__ import annotations

import asyncio
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ca.bootstrap import init_ca

# Named test timestamp: every clock in the tests starts here unless told otherwise.
T0 = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)


class FakeClock:
    """A clock the test moves by hand; the CA reads time only through it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def ca_template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("ca-template") / "ca"
    asyncio.run(init_ca(home, trust_domain="hospital.test", clock=FakeClock()))
    return home


@pytest.fixture
def ca_home(ca_template, tmp_path) -> Path:
    """A fresh copy of an initialised CA directory (keys, config, database)."""
    home = tmp_path / "ca"
    shutil.copytree(ca_template, home)
    return home


def make_csr(key=None, subject: str = "anything", sans: list[x509.GeneralName] | None = None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, None if key.__class__.__name__.startswith("Ed") else hashes.SHA256()), key
