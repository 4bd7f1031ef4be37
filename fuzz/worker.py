"""One atheris (libFuzzer) run of one target, in its own process:

    python -m fuzz.worker TARGET|all [libFuzzer flags...] CORPUS_DIR

Our packages are instrumented for coverage; a non-expected exception is a crash (a finding), which
libFuzzer writes to its -artifact_prefix. `fuzz/run.py` starts these and reads their summaries.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["ca", "enroll", "gateway", "common", "fuzz"]):
    from fuzz import targets


def main() -> None:
    targets.PKI.issuer   # made before the first input: not counted against the per-input timeout
    if sys.argv[1] == "all":   # one process for every target: the first byte picks it (the suite's smoke)
        every = list(targets.TARGETS.values())

        def one(data: bytes) -> None:
            if data:
                targets.check(every[data[0] % len(every)], data[1:])
    else:
        target = targets.TARGETS[sys.argv[1]]

        def one(data: bytes) -> None:
            targets.check(target, data)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
