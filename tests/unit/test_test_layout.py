"""The tests' own layout: shared test data and fakes live in tests/support.py, so no module under
tests/ or bench/ imports a test module (`test_*.py`) or a conftest (pytest's, for fixtures only)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every module the file imports, `from a import b` giving both a and a.b."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def layout_violations(root: Path) -> list[str]:
    out = []
    for top in ("tests", "bench"):
        for path in sorted((root / top).rglob("*.py")):
            for line, module in imported_modules(path, root):
                last = module.rsplit(".", 1)[-1]
                if module.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                    out.append(f"{path.relative_to(root)}:{line} imports {module} (use tests.support)")
    return sorted(out)


def test_no_module_imports_a_test_module_or_a_conftest():
    assert layout_violations(REPO) == []


def test_the_check_finds_each_kind_of_violation(tmp_path):
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / "tests" / "unit" / "test_a.py").write_text("from tests.unit.test_b import X\nfrom . import test_c\n")
    (tmp_path / "tests" / "unit" / "test_d.py").write_text("import tests.support\nfrom tests.support import need\n")
    (tmp_path / "bench" / "storm.py").write_text("from tests.conftest import start_bastion\nfrom tests import conftest\n")
    assert layout_violations(tmp_path) == [
        "bench/storm.py:1 imports tests.conftest (use tests.support)",
        "bench/storm.py:2 imports tests.conftest (use tests.support)",
        "tests/unit/test_a.py:1 imports tests.unit.test_b (use tests.support)",
        "tests/unit/test_a.py:2 imports tests.unit.test_c (use tests.support)",
    ]
