"""Fixtures for the lab.platform collection tests: a real `lab-bastion serve`, the collection on
ANSIBLE_COLLECTIONS_PATH (a symlink to this checkout) and helpers that run the real ansible CLIs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import start_bastion
from tests.vm.ansible import collections_path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def ansible_env(coll: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "LAB_BASTION_"))}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(coll),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCALHOST_WARNING="False",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_HOME=str(coll / "ansible-home"),
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def machines_requests(url: str) -> float:
    """lab_bastion_requests_total for GET /api/machines (all statuses), from /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("lab_bastion_requests_total{") and 'endpoint="/api/machines"' in line and 'method="GET"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def inventory_list(inv: Path, env: dict[str, str], *args: str) -> dict:
    r = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--list", *args], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def unsafe(value):
    """ansible-inventory --list shows unsafe strings as {"__ansible_unsafe": "..."}; unwrap them."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: unsafe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unsafe(v) for v in value]
    return value


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    out = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", stdout, re.M):
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    return collections_path(tmp_path_factory.mktemp("collections"))


@pytest.fixture(scope="module")
def lab_bastion(tmp_path_factory):
    b = start_bastion(tmp_path_factory.mktemp("bastion") / "data", workers=2)
    yield b
    b.stop()


# The molecule scenarios' testinfra checks run on the VM through molecule (test_molecule.py), not here.
collect_ignore_glob = ["molecule/*"]
