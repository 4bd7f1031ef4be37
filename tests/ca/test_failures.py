"""Failed anonymous logins (ca/failures.py): counted per device and source and per source, in the
store (shared by processes, kept across restarts), audited per source and window."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from ca import failures
from ca.authority import Authority, TokenAuth
from ca.errors import NotAcceptedError, RateLimitedError
from ca.registry import new_device
from tests.conftest import make_csr

A, B = "198.51.100.7", "203.0.113.9"


@pytest.fixture
async def authority(ca_home, clock):
    a = await Authority.open(ca_home, clock=clock)
    yield a
    await a.close()


async def register(authority, device_id: str) -> str:
    return (await authority.registry.add(new_device(device_id, model="m", owner="o"), actor="t")).secret


async def attempt(authority, device_id: str, secret: str, source: str):
    return await authority.enroll(device_id, make_csr()[0], TokenAuth(secret, source=source))


async def audit(authority, action: str) -> list:
    async with authority.store.read() as tx:
        return [r for r in await tx.audit_rows() if r.action == action]


async def test_a_stranger_locks_out_only_themselves(authority):
    secret = await register(authority, "pump-1")
    for n in range(failures.DEVICE_SOURCE_LIMIT):
        with pytest.raises(NotAcceptedError):
            await attempt(authority, "pump-1", f"guess-{n}", A)
    with pytest.raises(RateLimitedError) as locked:
        await attempt(authority, "pump-1", secret, A)   # even the right token, from the stranger's address
    assert 0 < locked.value.retry_after <= 2 * failures.WINDOW.total_seconds()
    issued = await attempt(authority, "pump-1", secret, B)   # the pump, from its own address
    assert issued.device_id == "pump-1"


async def test_an_unknown_id_and_a_wrong_token_are_one_answer(authority):
    await register(authority, "pump-1")
    with pytest.raises(NotAcceptedError) as unknown:
        await attempt(authority, "ghost-7", "whatever", A)
    with pytest.raises(NotAcceptedError) as wrong:
        await attempt(authority, "pump-1", "whatever", A)
    assert (unknown.value.code, unknown.value.message) == (wrong.value.code, wrong.value.message)
    assert unknown.value.why != wrong.value.why   # the server itself still knows which


async def test_the_per_source_limit_spans_device_ids(authority):
    authority.failure_limits = failures.Limits(source=3)
    secrets = {d: await register(authority, d) for d in ("p-1", "p-2", "p-3", "p-4")}
    for device in ("p-1", "p-2", "ghost-1"):
        with pytest.raises(NotAcceptedError):
            await attempt(authority, device, "wrong", A)
    with pytest.raises(RateLimitedError, match="from address"):
        await attempt(authority, "p-4", secrets["p-4"], A)
    assert (await attempt(authority, "p-4", secrets["p-4"], B)).device_id == "p-4"


async def test_a_gateway_is_counted_but_not_locked_as_a_whole(authority):
    """Relayed attempts (ra:GATEWAY) speak for a whole ward: no per-source limit, the per-device
    one still holds."""
    authority.failure_limits = failures.Limits(source=3)
    secret = await register(authority, "p-9")
    for n in range(6):
        with pytest.raises(NotAcceptedError):
            await attempt(authority, f"ghost-{n}", "wrong", "ra:ward-3")
    assert (await attempt(authority, "p-9", secret, "ra:ward-3")).device_id == "p-9"
    async with authority.store.read() as tx:
        assert await tx.count_failures("source", "ra:ward-3", authority.now() - timedelta(hours=1)) == 6


async def test_counts_are_in_the_store_for_every_process_and_after_a_restart(ca_home, clock):
    first = await Authority.open(ca_home, clock=clock)
    secret = await register(first, "pump-1")
    for n in range(failures.DEVICE_SOURCE_LIMIT):
        with pytest.raises(NotAcceptedError):
            await attempt(first, "pump-1", f"guess-{n}", A)
    second = await Authority.open(ca_home, clock=clock)   # another worker, or the same after a restart
    await first.close()
    try:
        with pytest.raises(RateLimitedError):
            await attempt(second, "pump-1", secret, A)
        clock.advance(minutes=31)   # two windows later the count has aged out
        assert (await attempt(second, "pump-1", secret, A)).device_id == "pump-1"
    finally:
        await second.close()


async def test_failures_are_audited_once_per_source_and_window(authority, clock):
    await register(authority, "pump-1")
    for n in range(3):
        with pytest.raises(NotAcceptedError):
            await attempt(authority, "pump-1", f"guess-{n}", A)
    for device in ("ghost-1", "ghost-2"):
        with pytest.raises(NotAcceptedError):
            await attempt(authority, device, "x", A)
    with pytest.raises(NotAcceptedError):
        await attempt(authority, "pump-1", "x", B)
    assert await audit(authority, "enroll_refused") == []   # no row per probe
    assert await authority.audit_anonymous_failures() == 0   # the window has not ended
    clock.advance(minutes=16)
    assert await authority.audit_anonymous_failures() == 2
    entries = {r.actor: json.loads(r.detail) for r in await audit(authority, "anonymous_failures")}
    assert entries[f"source:{A}"]["count"] == 5 and entries[f"source:{B}"]["count"] == 1
    assert entries[f"source:{A}"]["devices"][0] == "pump-1"   # named most often
    assert set(entries[f"source:{A}"]["devices"]) == {"pump-1", "ghost-1", "ghost-2"}
    assert entries[f"source:{A}"]["distinct_devices"] == 3
    assert await authority.audit_anonymous_failures() == 0   # each window once
    clock.advance(hours=2)
    await authority.audit_anonymous_failures()
    async with authority.store.read() as tx:   # old windows are forgotten once audited
        assert await tx.count_failures("source", A, authority.now() - timedelta(days=1)) == 0


def test_the_operator_is_the_real_uid_not_the_environment(monkeypatch):
    import os
    import pwd

    from ca.credentials import operator
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    assert operator().name == pwd.getpwuid(os.getuid()).pw_name != "mallory"
