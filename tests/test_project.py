"""The project's promises about itself: the README's two commands, CI calling them, module docstrings."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ca", "enroll", "gateway", "firmware_sim", "cli", "bench")


def test_readme_opens_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "make demo" in head and "make test" in head


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in script.split("\n", 2)[-1]  # called, not only mentioned in the comment


def test_makefile_has_the_documented_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test:", "demo:", "bench:", "deps:"):
        assert f"\n{target}" in makefile, target


def test_every_module_says_what_it_owns():
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not ast.get_docstring(ast.parse(path.read_text())):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"modules without a docstring: {missing}"
