"""The k3s roles on real Debian 12 VMs: `molecule test -s k3s` (create, check mode on the fresh
hosts, converge, idempotence, testinfra verify, destroy) through playbooks/k3s.yml.

The line: k3s cannot be downloaded here, so the scenario hands the roles a stand-in k3s binary and
images tarball and sets k3s_server_run_enabled / k3s_agent_run_enabled to false. Everything up to
starting k3s runs for real on the VMs (packages, kernel modules, sysctls, firewall, time sync,
config.yaml and drop-ins, Cilium HelmChart, CIS files, token, systemd units, Longhorn prerequisites).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import need, need_binary, need_root

REPO = Path(__file__).resolve().parents[2]
SCENARIO = "k3s"
VM_NAMES = ["k3s-server-1", "k3s-agent-1"]
ANSI = re.compile(r"\x1b\[[0-9;]*m|\x1b\]8;;[^\x1b]*\x1b\\")
STEP = re.compile(rf"\[{SCENARIO} > (\w+)\]")

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.vm]


def _prereqs() -> None:
    need_root()
    need_binary("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ssh")
    need(shutil.which("molecule", path=str(Path(sys.executable).parent)) is not None, "needs molecule in the venv (make venv)")


@pytest.mark.timeout(5400)
def test_molecule_k3s(tmp_path):
    _prereqs()
    from tests.vm.ansible import ansible_env
    from tests.vm.image import ensure_image

    started = time.monotonic()
    ensure_image()
    env = {**os.environ, **ansible_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = REPO / "artifacts" / "molecule-k3s.log"
    log.parent.mkdir(exist_ok=True)
    steps: dict[str, float] = {}
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "molecule"), "test", "-s", SCENARIO],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            )
            current, step_started = None, 0.0
            for line in proc.stdout:
                now = time.monotonic()
                out.write(f"[{now - started:7.1f}s] {line}")
                plain = ANSI.sub("", line)
                m = STEP.search(plain)
                if m and "Executing" in plain:
                    current, step_started = m.group(1), now
                elif m and "Executed" in plain and current == m.group(1):
                    steps[current] = steps.get(current, 0.0) + (now - step_started)
            returncode = proc.wait(timeout=5300)
    finally:
        # Whatever happened, no VM outlives the test.
        subprocess.run([sys.executable, "-m", "tests.vm", "down", *VM_NAMES], cwd=REPO, capture_output=True)
    text = ANSI.sub("", log.read_text(errors="replace"))
    tail = "\n".join(text.splitlines()[-60:])
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in steps.items())
    print(f"molecule steps: {timing}")
    assert returncode == 0, f"molecule test -s {SCENARIO} failed (full log: {log}):\n{tail}"
    # The idempotence step ran and every host reported changed=0 in it.
    section = text.split(f"[{SCENARIO} > idempotence] Executing", 1)[-1].split(f"[{SCENARIO} > verify]", 1)[0]
    recaps = re.findall(r"^\[.*?\] (\S+)\s+: ok=\d+\s+changed=(\d+)", section, re.M)
    assert {h for h, _ in recaps} == set(VM_NAMES) and all(c == "0" for _, c in recaps), recaps
    print(f"molecule test -s {SCENARIO}: {time.monotonic() - started:.0f}s (log: {log})")
