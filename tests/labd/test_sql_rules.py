"""labd's SQL stays inside what CockroachDB accepts (docs/labd.md, "CockroachDB rules"): no SERIAL
or sequences (UUID keys), no LISTEN/NOTIFY (CockroachDB has changefeeds instead), no advisory locks
(silent no-ops there), and one DDL statement per migration step (one DDL per transaction)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from labd import migrations
from tests.support import REPO

FORBIDDEN = [
    (re.compile(r"\b(BIG|SMALL)?SERIAL\d?\b", re.I), "SERIAL: use UUID keys (gen_random_uuid())"),
    (re.compile(r"\bSEQUENCE\b|\bnextval\s*\(|\bcurrval\s*\(|\bsetval\s*\(", re.I), "a sequence: use UUID keys"),
    (re.compile(r"\bGENERATED\s+(ALWAYS|BY\s+DEFAULT)\s+AS\s+IDENTITY\b", re.I), "an identity column (a sequence)"),
    (re.compile(r"\bLISTEN\b|\bNOTIFY\b|\bpg_notify\b|\bUNLISTEN\b", re.I), "LISTEN/NOTIFY: CockroachDB has none"),
    (re.compile(r"\bpg_(try_)?advisory", re.I), "an advisory lock: a no-op on CockroachDB"),
]
DDL = re.compile(r"^\s*(CREATE|ALTER|DROP|TRUNCATE|COMMENT|GRANT|REVOKE|RENAME)\b", re.I)
SQLISH = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|LISTEN|NOTIFY)\b")


def sql_strings(root: Path) -> list[tuple[str, str]]:
    """(place, text) of every string literal (f-strings' constant parts too) in labd/*.py that looks
    like SQL; docstrings (prose) aside."""
    out = []
    for path in sorted((root / "labd").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
                    and SQLISH.search(node.value)):
                out.append((f"{path.relative_to(root)}:{node.lineno}", node.value))
    for path in sorted((root / "labd").rglob("*.sql")):
        out.append((str(path.relative_to(root)), path.read_text()))
    return out


def violations(strings: list[tuple[str, str]], steps: list[tuple[str, str]]) -> list[str]:
    found = [f"{place}: {why}" for place, text in strings for rx, why in FORBIDDEN if rx.search(text)]
    for step_id, statement in steps:
        parts = [p for p in statement.split(";") if p.strip()]
        if len(parts) != 1:
            found.append(f"migration {step_id}: {len(parts)} statements (one per step)")
        elif not DDL.match(parts[0]):
            found.append(f"migration {step_id}: not a DDL statement")
    ids = [s for s, _ in steps]
    if ids != sorted(ids) or len(set(ids)) != len(ids):
        found.append("migration ids are not unique and in order")
    return found


def test_labd_sql_keeps_to_the_cockroachdb_rules():
    strings = sql_strings(REPO)
    assert len(strings) > 30  # the scan sees labd's queries
    assert violations(strings, migrations.STEPS) == []


def test_the_check_finds_each_forbidden_construct():
    bad = [("a", "CREATE TABLE t (id SERIAL PRIMARY KEY)"), ("b", "SELECT nextval('s')"), ("c", "LISTEN events"),
           ("d", "SELECT pg_notify('x', 'y')"), ("e", "SELECT pg_advisory_lock(1)"), ("f", "CREATE SEQUENCE s"),
           ("g", "CREATE TABLE t (id BIGINT GENERATED ALWAYS AS IDENTITY)"), ("h", "SELECT pg_try_advisory_xact_lock(2)")]
    steps = [("0002", "CREATE TABLE a (x INT); CREATE INDEX i ON a (x)"), ("0001", "INSERT INTO a VALUES (1)")]
    found = violations(bad, steps)
    for place in "abcdefgh":
        assert any(f.startswith(f"{place}: ") for f in found), place
    assert "migration 0002: 2 statements (one per step)" in found
    assert "migration 0001: not a DDL statement" in found
    assert "migration ids are not unique and in order" in found
