#!/usr/bin/env python3
"""Install time of the image deploy: PXE power-on to SSH-ready for debian-12 on a BIOS and a UEFI
machine (QEMU, TCG, one CPU each, installed at the same time), with its parts, against a plain cold
boot of the same installed disk (no PXE: the disk alone, power-on to SSH) measured in the same run.
Target: install <= 4x the cold boot.

Parts come from the bastion's event timeline (the install script's progress reports):
  boot        power-on -> the script's first report (firmware, PXE, iPXE, installer kernel, drivers, DHCP)
  image       download and checksum of the image
  partition   partitions, labvg, file systems
  write       extracting the image
  system      fstab, network, users, SSH, GRUB, boot order, `complete` acknowledged
  reboot      `complete` -> SSH answers (firmware, PXE -> local boot, the installed system's boot)
Image size and installer (kernel + initramfs) size are printed too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.lab import Lab, Machine, prepare_images  # noqa: E402

GIB = 1 << 30
#: (part name, the message the part starts with) in timeline order; each part ends where the next begins
MARKS = (("boot", None), ("image", "downloading the image"), ("partition", "image verified"),
         ("write", "writing the image"), ("system", "image written"), ("reboot", "installed, rebooting"))


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def parts(lab: Lab, m: Machine, powered_on: float, ssh_at: float) -> dict[str, float]:
    events = lab.machine_state(m.mac)["events"]
    starts = {"boot": powered_on}
    for name, text in MARKS[1:]:
        hit = next((e for e in events if text in ((e.get("data") or {}).get("message") or "")), None)
        if hit is None:
            raise SystemExit(f"install_time: no event {text!r} for {m.name}: {[e.get('reason') for e in events]}")
        starts[name] = _at(hit)
    names = [n for n, _ in MARKS]
    out = {n: starts[names[i + 1]] - starts[n] for i, n in enumerate(names[:-1])}
    out["reboot"] = ssh_at - starts["reboot"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=1024, help="MiB per machine")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("install_time: skipped (needs root: network namespace, QEMU taps, debootstrap)")
        return 0
    root = Path(tempfile.mkdtemp(prefix="install-time-"))
    info = prepare_images(root / "data", progress=lambda msg: print(msg, file=sys.stderr))
    lab = Lab(root)
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    results: dict[str, dict] = {}
    try:
        lab.up()
        made: dict[str, Machine] = {}
        for i, fw in enumerate(("bios", "uefi")):
            mac = f"52:54:00:be:11:0{i}"
            requests.post(lab.api_url + "/api/discover", json={"mac": mac, "hardware": {"firmware": fw}}, timeout=10)
            r = lab.api("POST", "/api/install", json={"mac": mac, "hostname": f"bench-{fw}", "role": "worker",
                                                      "os": "debian-12", "ssh_keys": [Path(f"{key}.pub").read_text().strip()]})
            r.raise_for_status()
        for i, fw in enumerate(("bios", "uefi")):
            made[fw] = lab.machine(f"bench-{fw}", mac=f"52:54:00:be:11:0{i}", firmware=fw, cpus=1,
                                   memory_mb=args.memory, disk_bytes=20 * GIB)
        powered = {fw: time.time() for fw in made}  # wall clock: the events carry wall-clock times
        for fw, m in made.items():
            got = lab.wait_state(m.mac, "installed", 2400, m)
            lab.wait_ssh(got["ip"], key, 900, m)
            results[fw] = {"install": parts(lab, m, powered[fw], time.time()), "ip": got["ip"]}
        # the baseline: the same disks, powered on with no PXE ROM (the disk alone), to SSH
        for m in made.values():
            lab.stop_machine(m)
            m.pxe = False
        for m in made.values():
            lab.start(m)
        cold_started = time.monotonic()
        for fw, m in made.items():
            waited = lab.wait_ssh(results[fw]["ip"], key, 900, m)
            results[fw]["cold"] = time.monotonic() - cold_started if waited else 0.0
    finally:
        lab.down()
    print(f"install_time: debian-12 image {info['os_image_bytes'] / 1e6:.1f} MB, "
          f"installer (kernel + initramfs) {info['installer_bytes'] / 1e6:.1f} MB; 2 machines at once, 1 CPU each (TCG)")
    worst = 0.0
    for fw, res in results.items():
        total = sum(res["install"].values())
        ratio = total / res["cold"]
        worst = max(worst, ratio)
        detail = "  ".join(f"{k} {v:5.1f}s" for k, v in res["install"].items())
        print(f"  {fw:4s}: PXE power-on -> SSH {total:6.1f}s  ({detail})")
        print(f"  {fw:4s}: baseline cold boot of the installed disk -> SSH {res['cold']:6.1f}s; "
              f"ratio install / cold boot = {ratio:.2f}x (target <= 4x)")
    ok = worst <= 4.0
    print("PASS" if ok else f"FAIL: {worst:.2f}x > 4x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
