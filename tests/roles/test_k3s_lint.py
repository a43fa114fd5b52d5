"""ansible-lint (production profile) and syntax checks of the k3s roles and playbooks (no VM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import need

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K3S_PATHS = [
    "roles/k3s_common",
    "roles/k3s_host_prep",
    "roles/k3s_networking",
    "roles/k3s_hardening",
    "roles/k3s_server",
    "roles/k3s_agent",
    "playbooks/k3s.yml",
    "playbooks/k3s_health.yml",
    "playbooks/k3s_upgrade.yml",
    "playbooks/k3s_reset.yml",
    "tests/ansible/molecule/k3s",
]
PLAYBOOKS = ["k3s.yml", "k3s_health.yml", "k3s_upgrade.yml", "k3s_reset.yml"]


def _env():
    from tests.vm.ansible import ansible_env

    return {**os.environ, **ansible_env(), "PATH": f"{BIN}:{os.environ['PATH']}"}


@pytest.mark.timeout(900)
def test_ansible_lint_production_profile():
    need((BIN / "ansible-lint").exists(), "needs ansible-lint in the venv (make venv)")
    proc = subprocess.run(
        [str(BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor", *K3S_PATHS],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


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
