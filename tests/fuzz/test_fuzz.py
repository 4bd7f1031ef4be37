"""The fuzz harness in the suite: every input that ever made a target fail (tests/fuzz/corpus/),
a seeded mutation smoke of every target (hypothesis), and a short atheris run of every target
through `python -m fuzz.run`, the command `make fuzz` runs for longer."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.seeds import seeds
from fuzz.targets import TARGETS, check

CORPUS = Path(__file__).parent / "corpus"
SEEDS = seeds()
REGRESSIONS = sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_the_corpus_names_only_targets_and_is_not_empty():
    assert REGRESSIONS, "the regression corpus went missing"
    assert {p.parent.name for p in REGRESSIONS} <= set(TARGETS)


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_input_that_once_failed_passes(path):
    check(TARGETS[path.parent.name], path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_valid_inputs_go_all_the_way_through(name):
    """The seeds raise nothing at all: a target that refused its own valid input would fuzz only
    its first check."""
    assert SEEDS[name], name
    for data in SEEDS[name]:
        TARGETS[name].run(data)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, at, value in edits:
        if not out:
            break
        at %= len(out)
        if kind == 0:
            out[at] ^= 1 << (value % 8)
        elif kind == 1:
            out[at] = value
        elif kind == 2:
            del out[at:at + 1 + value % 8]
        else:
            out[at:at] = bytes([value]) * (1 + value % 4)
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_inputs_get_only_expected_errors(name, data):
    seed = data.draw(st.sampled_from(SEEDS[name]))
    check(TARGETS[name], _mutate(seed, data.draw(EDITS)))


def test_atheris_smoke_of_every_target(tmp_path):
    """atheris over all targets in one process (the first byte of an input picks the target),
    starting from every target's seeds and the regression corpus."""
    proc = subprocess.run([sys.executable, "-m", "fuzz.run", "--together", "--runs", "4000", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"^all\s+([\d,]+) runs in .*: ok$", proc.stdout, re.M)
    assert found and int(found.group(1).replace(",", "")) >= 4000, proc.stdout
    corpus = list((tmp_path / "corpus" / "all").iterdir())
    assert {f.read_bytes()[0] % len(TARGETS) for f in corpus if f.stat().st_size} == set(range(len(TARGETS)))
