"""The project's promises about itself: the README's two commands, CI calling them, module docstrings."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "ca", "enroll", "gateway", "firmware_sim", "cli", "bench")


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


# The gateway is a registration authority: it talks to the CA only over the RA API.
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_the_gateway_reaches_no_ca_key_and_no_ca_core():
    """Nothing under gateway/ imports anything of ca/ (not even its config or model: the gateway
    runs from its own directory); what both share is in common/."""
    found = {}
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        bad = sorted(n for n in _imports(path) if n == "ca" or n.startswith("ca."))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert found == {}, f"gateway modules importing CA keys or core: {found}"


def test_common_depends_on_nothing_of_ours():
    ours = ("ca", "enroll", "gateway", "firmware_sim", "cli", "bench")
    found = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] in ours)
             for p in sorted((ROOT / "common").rglob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}
