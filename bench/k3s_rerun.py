"""k3s.yml: wall time of a second, no-change run against the first run on the same VM.

Boots one Debian 12 VM from the tests/vm harness (server role), runs playbooks/k3s.yml twice
through ansible-runner up to the line (a stand-in k3s binary; k3s is not started because it cannot
be downloaded here), and prints both wall times, their ratio and the second run's changed count,
which must be 0 (exit status 1 otherwise). The baseline is the first run on the same VM.

    .venv/bin/python bench/k3s_rerun.py [--keep-artifacts DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.vm import machine  # noqa: E402
from tests.vm.ansible import run_playbook  # noqa: E402
from tests.vm.image import ensure_image, missing_tools  # noqa: E402

VM_NAME = "bench-k3s-rerun"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-artifacts", metavar="DIR", help="keep ansible-runner artefacts in DIR")
    args = parser.parse_args()
    if os.geteuid() != 0 or missing_tools():
        print(f"k3s_rerun: skipped (needs root and {', '.join(missing_tools()) or 'qemu/debootstrap'})")
        return 0
    ensure_image(echo=lambda m: print(m, file=sys.stderr))
    work = Path(args.keep_artifacts or tempfile.mkdtemp(prefix="k3s-rerun-"))
    work.mkdir(parents=True, exist_ok=True)
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
        first = run_playbook(playbook, inventory, work / "run1", extravars)
        if first.rc != 0:
            print(f"k3s_rerun: first run failed (rc={first.rc}); artefacts in {first.artifact_dir}")
            return 1
        second = run_playbook(playbook, inventory, work / "run2", extravars)
    finally:
        machine.down(VM_NAME)
        if not args.keep_artifacts:
            shutil.rmtree(work, ignore_errors=True)
    changed = second.total("changed")
    print(f"k3s_rerun: VM boot {vm.boot_seconds}s (TCG)")
    print(f"k3s_rerun: first run  {first.seconds:7.1f}s  changed={first.total('changed')}")
    print(f"k3s_rerun: second run {second.seconds:7.1f}s  changed={changed}  (must be 0)")
    print(f"k3s_rerun: second/first = {second.seconds / first.seconds:.2f} (baseline: first run on the same VM)")
    if second.rc != 0 or changed != 0:
        print(f"k3s_rerun: FAIL second run rc={second.rc} changed={changed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
