"""k3s.yml: wall time of a second, no-change run against the first run on the same VM.

Boots one Debian 12 VM from the tests/vm harness (server role), runs playbooks/k3s.yml twice
through labctl's ansible-runner glue (the same environment as the molecule scenarios, Mitogen
included when installed) up to the line (a stand-in k3s binary; k3s is not started because it cannot
be downloaded here), and prints both wall times, their ratio and the second run's changed count,
which must be 0 (exit status 1 otherwise). The baseline is the first run on the same VM.

    .venv/bin/python bench/k3s_rerun.py

The two runs' ansible-runner artefacts are kept in $LABCTL_HOME/runs (~/.labctl/runs), as for any
labctl run, and their paths are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labctl.runner import run_playbook  # noqa: E402
from tests.vm import machine  # noqa: E402
from tests.vm.ansible import ansible_env  # noqa: E402
from tests.vm.image import ensure_image, missing_tools  # noqa: E402

VM_NAME = "bench-k3s-rerun"


def timed_run(playbook: str, inventory: dict, extravars: dict, name: str):
    started = time.monotonic()
    result = run_playbook(playbook, inventory=inventory, extravars=extravars, name=name, quiet=True, envvars=ansible_env())
    return result, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if os.geteuid() != 0 or missing_tools():
        print(f"k3s_rerun: skipped (needs root and {', '.join(missing_tools()) or 'qemu/debootstrap'})")
        return 0
    ensure_image(echo=lambda m: print(m, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="k3s-rerun-"))
    airgap = work / "airgap"
    airgap.mkdir(exist_ok=True)
    binary = airgap / "k3s"
    binary.write_text("#!/bin/sh\necho 'stand-in for the k3s binary: not starting k3s' >&2\nexit 1\n")
    binary.chmod(0o755)
    images = airgap / "k3s-airgap-images-amd64.tar.zst"
    images.write_text("stand-in for the k3s airgap images tarball\n")
    extravars = {
        "k3s_server_run_enabled": False,  # the line: starting k3s
        "k3s_server_airgap_binary": str(binary),
        "k3s_server_airgap_images": [str(images)],
        "k3s_server_kubeconfig_fetch_enabled": False,
    }
    vm = machine.up(VM_NAME)
    try:
        inventory = {"all": {"children": {"k3s_servers": {"hosts": {VM_NAME: vm.inventory_vars()}}}}}
        playbook = str(REPO / "playbooks" / "k3s.yml")
        first, first_s = timed_run(playbook, inventory, extravars, "k3s-rerun-1")
        if not first.ok:
            print(f"k3s_rerun: first run failed (rc={first.rc}); artefacts in {first.run_dir}")
            return 1
        second, second_s = timed_run(playbook, inventory, extravars, "k3s-rerun-2")
    finally:
        machine.down(VM_NAME)
        shutil.rmtree(work, ignore_errors=True)
    changed = second.stats["changed"]
    print(f"k3s_rerun: VM boot {vm.boot_seconds}s (TCG)")
    print(f"k3s_rerun: first run  {first_s:7.1f}s  changed={first.stats['changed']}")
    print(f"k3s_rerun: second run {second_s:7.1f}s  changed={changed}  (must be 0)")
    print(f"k3s_rerun: second/first = {second_s / first_s:.2f} (baseline: first run on the same VM)")
    print(f"k3s_rerun: artefacts in {first.run_dir} and {second.run_dir}")
    if not second.ok or changed != 0:
        print(f"k3s_rerun: FAIL second run rc={second.rc} changed={changed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
