"""The Ansible environment for running the collection against the test VMs (molecule scenarios,
bench/k3s_rerun.py through labctl's runner). The collection is made importable as `lab.platform` by a symlink
`<dir>/ansible_collections/lab/platform -> <repo root>` on ANSIBLE_COLLECTIONS_PATH, which is how a
checkout is used without `ansible-galaxy collection install`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from labctl.runner import link_collection
from tests.vm.image import cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def collections_path(root: Path | None = None) -> Path:
    """A directory holding ansible_collections/lab/platform -> this checkout (labctl's own link)."""
    return link_collection(root or (cache_dir() / "collections"), REPO_ROOT)


def ansible_env(extra: dict | None = None) -> dict[str, str]:
    """Environment for ansible-playbook/molecule/ansible-runner against the test VMs."""
    existing = os.environ.get("ANSIBLE_COLLECTIONS_PATH", "")
    paths = [str(collections_path())] + ([existing] if existing else [])
    env = {
        "ANSIBLE_COLLECTIONS_PATH": os.pathsep.join(paths),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_PIPELINING": "True",
        # Connecting includes starting Python in the guest (with Mitogen: its bootstrap), seconds
        # under TCG on a busy host; Ansible's default of 10 s gave spurious UNREACHABLEs.
        "ANSIBLE_TIMEOUT": "120",
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=300s -o ServerAliveInterval=10",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_FORCE_COLOR": "False",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
    }
    # The venv's ansible-playbook, whichever way this Python was started.
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join([bindir, path]) if path else bindir
    env.update(mitogen_env())
    env.update(extra or {})
    return env


def mitogen_env() -> dict[str, str]:
    """Run modules through Mitogen's strategy when it is installed (a test extra) and not turned off
    with LAB_VM_MITOGEN=0.

    Under TCG every plain module run pays Python's start-up and compiles module_utils afresh in the
    guest (~5 s a task here); Mitogen keeps one interpreter per host with its imports (~0.5 s).
    The modules, the tasks and the hosts are the same ones.
    """
    if os.environ.get("LAB_VM_MITOGEN", "1") == "0":
        return {}
    try:
        import ansible_mitogen
    except ImportError:
        return {}
    return {
        "ANSIBLE_STRATEGY_PLUGINS": str(Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"),
        "ANSIBLE_STRATEGY": "mitogen_linear",
    }
