"""Role tests on real Debian 12 VMs: every molecule scenario under tests/ansible/molecule/.

Driver `default`: create and destroy boot and stop QEMU VMs from the cached Debian 12 image
(tests/vm, TCG). Each scenario runs its test sequence (bastion: converge, idempotence, verify; k3s:
check mode on the fresh hosts, converge, idempotence, verify) and this test also reads the
idempotence step's recap: every host must report changed=0 there.

The scenarios run one after the other: run together on this two-core machine (three TCG VMs) they
took longer than in turn (1,050 s against 1,003 s). Modules run through Mitogen when it is installed
(tests/vm/ansible.py: `mitogen_env`), which is what makes the scenarios fit in `make test` under
TCG; LAB_VM_MITOGEN=0 runs them the plain way. The full molecule log, with a time stamp per line,
is kept in artifacts/molecule-<scenario>.log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from labctl.init_cmd import build_wheelhouse
from tests.support import BIN, REPO, need_binary, need_root
from tests.vm.ansible import ansible_env, collections_path
from tests.vm.image import ensure_image

HERE = Path(__file__).resolve().parent
SCENARIOS = sorted(p.name for p in (HERE / "molecule").iterdir() if (p / "molecule.yml").exists())
ANSI = re.compile(r"\x1b\[[0-9;]*m|\x1b\]8;;[^\x1b]*\x1b\\")
TIMEOUT_S = 2300


def descendants(pid: int) -> list[int]:
    """Every process below *pid* (children first found, grandchildren after), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class MoleculeRun:
    """`molecule test -s SCENARIO`, its output copied to a time-stamped log as it runs."""

    def __init__(self, scenario: str, work: Path, wheelhouse: Path):
        self.scenario = scenario
        self.log = REPO / "artifacts" / f"molecule-{scenario}.log"
        self.log.parent.mkdir(exist_ok=True)
        self.steps: dict[str, float] = {}
        self.started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
        env.update(ansible_env({"ANSIBLE_COLLECTIONS_PATH": str(collections_path(work / "collections"))}))
        env.update(
            PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            ANSIBLE_HOME=str(work / "ansible-home"),
            MOLECULE_EPHEMERAL_DIRECTORY=str(work / "molecule"),
            LAB_REPO=str(REPO),
            LAB_PYTHON=sys.executable,
            LAB_WHEELHOUSE=str(wheelhouse),
            NO_COLOR="1",
        )
        self.env = env
        self.proc: subprocess.Popen | None = None

    def run(self) -> int:
        """Run to the end (killed after TIMEOUT_S, even when silent); the VMs are stopped either way."""
        step = re.compile(rf"\[{self.scenario} > (\w+)\] (Executing|Executed)")
        current, since = None, 0.0
        self.proc = subprocess.Popen([str(BIN / "molecule"), "test", "-s", self.scenario], cwd=HERE, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        watchdog = threading.Timer(TIMEOUT_S, self.kill)
        watchdog.start()
        try:
            with open(self.log, "w", buffering=1) as out:
                for line in self.proc.stdout:
                    now = time.monotonic()
                    out.write(f"[{now - self.started:7.1f}s] {line}")
                    m = step.search(ANSI.sub("", line))
                    if m and m.group(2) == "Executing":
                        current, since = m.group(1), now
                    elif m and m.group(1) == current:
                        self.steps[current] = self.steps.get(current, 0.0) + now - since
            return self.proc.wait()
        finally:
            watchdog.cancel()
            self.stop()

    def kill(self) -> None:
        """molecule and everything it started (ansible-playbook and its workers hold the output pipe
        open too, and some run in a session of their own, out of reach of killpg)."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
            self.proc.wait()
        # Whatever happened, no VM of this scenario outlives the test.
        platforms = yaml.safe_load((HERE / "molecule" / self.scenario / "molecule.yml").read_text())["platforms"]
        subprocess.run([sys.executable, "-m", "tests.vm", "down", *(p["name"] for p in platforms)],
                       cwd=REPO, capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 100)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule(scenario, tmp_path):
    need_root()
    need_binary("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ssh")
    ensure_image()
    run = MoleculeRun(scenario, tmp_path, build_wheelhouse(tmp_path / "wheelhouse"))
    returncode = run.run()
    text = ANSI.sub("", run.log.read_text(errors="replace"))
    print(f"molecule test -s {scenario}: {time.monotonic() - run.started:.0f}s; steps: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in run.steps.items()))
    assert returncode == 0, f"molecule test -s {scenario} failed (full log: {run.log}):\n" + "\n".join(text.splitlines()[-80:])
    section = text.split(f"[{scenario} > idempotence] Executing", 1)[-1].split(f"[{scenario} > verify]", 1)[0]
    recaps = re.findall(r"^\[.*?\] (\S+)\s+: ok=\d+\s+changed=(\d+)", section, re.M)
    assert recaps and all(c == "0" for _, c in recaps), f"idempotence recaps: {recaps}"
