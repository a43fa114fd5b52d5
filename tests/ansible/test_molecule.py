"""Role tests: the molecule scenarios under tests/ansible/molecule/ (driver `default`: create and
destroy boot and stop a QEMU VM from the cached Debian 12 image), each with converge, idempotence
(changed=0 on the second run) and testinfra verify on the live VM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.init_cmd import build_wheelhouse
from tests.ansible.conftest import BIN, REPO, collections_root
from tests.support import need_binary, need_root

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("scenario", sorted(p.name for p in (HERE / "molecule").iterdir() if (p / "molecule.yml").exists()))
def test_molecule(scenario, tmp_path):
    need_root()
    need_binary("qemu-system-x86_64", "debootstrap", "ssh")
    wheelhouse = build_wheelhouse(tmp_path / "wheelhouse")
    coll = collections_root(tmp_path / "collections")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        ANSIBLE_COLLECTIONS_PATH=str(coll),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        MOLECULE_EPHEMERAL_DIRECTORY=str(tmp_path / "molecule"),
        LAB_REPO=str(REPO),
        LAB_PYTHON=sys.executable,
        LAB_WHEELHOUSE=str(wheelhouse),
        NO_COLOR="1",
    )
    log = tmp_path / "molecule.log"
    with open(log, "w") as out:
        r = subprocess.run([str(BIN / "molecule"), "test", "-s", scenario], cwd=HERE, env=env,
                           stdout=out, stderr=subprocess.STDOUT, timeout=2300)
    text = log.read_text(errors="replace")
    assert r.returncode == 0, text[-8000:]
    assert "Idempotence completed successfully" in text or "idempotence" in text.lower(), text[-3000:]
