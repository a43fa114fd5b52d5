"""Run the collection's playbooks against test VMs through ansible-runner.

`run_playbook()` is the glue labctl can reuse (`labctl app k3s install` wants the same thing:
an inventory, extra vars, a private data directory whose artefacts are kept, per-host stats and a
return code). The collection is made importable as `lab.platform` by a symlink
`<dir>/ansible_collections/lab/platform -> <repo root>` on ANSIBLE_COLLECTIONS_PATH, which is how a
checkout is used without `ansible-galaxy collection install`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.vm.image import cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def collections_path(root: Path | None = None) -> Path:
    """A directory holding ansible_collections/lab/platform -> this checkout."""
    base = root or (cache_dir() / "collections")
    link = base / "ansible_collections" / "lab" / "platform"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) != REPO_ROOT:
        link.unlink()
    if not link.exists():
        tmp = link.with_name(f".platform-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(REPO_ROOT)
        tmp.rename(link)
    return base


def ansible_env(extra: dict | None = None) -> dict[str, str]:
    """Environment for ansible-playbook/molecule/ansible-runner against the test VMs."""
    existing = os.environ.get("ANSIBLE_COLLECTIONS_PATH", "")
    paths = [str(collections_path())] + ([existing] if existing else [])
    env = {
        "ANSIBLE_COLLECTIONS_PATH": os.pathsep.join(paths),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_PIPELINING": "True",
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
    env.update(extra or {})
    return env


@dataclass
class PlaybookResult:
    rc: int
    status: str
    seconds: float
    stats: dict = field(default_factory=dict)
    artifact_dir: str = ""

    def total(self, key: str) -> int:
        """Sum of one stat (ok, changed, failures, dark, skipped) over hosts."""
        return sum(self.stats.get(key, {}).values())


def run_playbook(
    playbook: str,
    inventory: dict | str,
    private_data_dir: str | Path,
    extravars: dict | None = None,
    check: bool = False,
    tags: str | None = None,
    quiet: bool = True,
    event_handler=None,
) -> PlaybookResult:
    """Run `playbook` (a path or a collection playbook name like lab.platform.k3s) with ansible-runner.

    `private_data_dir` keeps the run's artefacts (stdout, events, stats) for inspection.
    `event_handler(event) -> bool` receives every runner event (for live per-host progress).
    """
    import ansible_runner

    private_data_dir = Path(private_data_dir)
    private_data_dir.mkdir(parents=True, exist_ok=True)
    cmdline = []
    if check:
        cmdline.append("--check")
    if tags:
        cmdline += ["--tags", tags]
    started = time.monotonic()
    r = ansible_runner.run(
        private_data_dir=str(private_data_dir),
        playbook=playbook,
        inventory=inventory,
        extravars=extravars or {},
        envvars=ansible_env(),
        cmdline=" ".join(cmdline) or None,
        quiet=quiet,
        event_handler=event_handler,
    )
    return PlaybookResult(
        rc=r.rc,
        status=r.status,
        seconds=round(time.monotonic() - started, 1),
        stats=r.stats or {},
        artifact_dir=str(r.config.artifact_dir),
    )
