"""The reliability campaign (issue 9). Each test records its figures with ``record``; the session
writes them to artifacts/reliability.json, which docs/reliability.md quotes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

FIGURES: dict[str, dict] = {}
OUT = Path(__file__).resolve().parents[2] / "artifacts" / "reliability.json"


@pytest.fixture
def record(request):
    def _record(**figures):
        FIGURES.setdefault(request.node.name, {}).update(figures)
        print(f"\n[reliability] {request.node.name}: {json.dumps(figures)}")

    return _record


def pytest_sessionfinish(session, exitstatus):
    if FIGURES:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "figures": FIGURES}, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, figs in FIGURES.items():
            terminalreporter.write_line(f"{name}: {json.dumps(figs)}")
