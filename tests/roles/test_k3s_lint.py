"""ansible-lint (production profile) of the source checkout and syntax checks of the k3s playbooks (no VM).

The built collection is linted as Galaxy's importer does in tests/ansible/test_collection.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import need

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOKS = ["k3s.yml", "k3s_health.yml", "k3s_upgrade.yml", "k3s_reset.yml"]


def _env():
    from tests.vm.ansible import ansible_env

    return {**os.environ, **ansible_env(), "PATH": f"{BIN}:{os.environ['PATH']}"}


@pytest.mark.timeout(900)
def test_ansible_lint_production_profile():
    """`ansible-lint` at the repository root, as a role author runs it: no paths, so the whole
    checkout that .ansible-lint does not exclude (the collection, collections/requirements.yml and
    the molecule scenarios under tests/ansible/molecule)."""
    need((BIN / "ansible-lint").exists(), "needs ansible-lint in the venv (make venv)")
    proc = subprocess.run(
        [str(BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # An excluded path passes silently (0 files processed): the YAML of the roles, the playbooks and
    # the molecule scenarios must at least all have been read.
    processed = re.search(r"in (\d+) files processed", proc.stderr)
    content = [p for d in ("roles", "playbooks", "tests/ansible/molecule") for p in (REPO / d).rglob("*.yml")]
    assert processed and int(processed.group(1)) >= len(content), proc.stderr[-3000:]


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax(playbook, tmp_path):
    need((BIN / "ansible-playbook").exists(), "needs ansible-core in the venv (make venv)")
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        "all:\n  children:\n    k3s_servers:\n      hosts: {s1: {}}\n    k3s_agents:\n      hosts: {a1: {}}\n"
    )
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(inventory), f"playbooks/{playbook}"],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
