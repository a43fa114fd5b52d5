#!/usr/bin/env python3
"""Dynamic inventory at scale: `ansible-inventory --list` through the lab.platform.lab plugin
against a running bastion with 10,000 installed machines, versus the same hosts, groups and host
variables as a static YAML inventory (the baseline), in the same run.

The machines are loaded with `lab-bastion import` (a state.json), then `lab-bastion serve` runs.
The static file is written from the plugin's own output, so both inventories hold exactly the same
data. Each inventory is listed --rounds times, alternating, after one untimed plugin run (which
also writes the static file); the medians are compared. The bastion's
`lab_bastion_requests_total{endpoint="/api/machines"}` counter must grow by exactly one per page of
`GET /api/machines` per plugin run (a page holds up to 1,000 machines).
Target: plugin <= 1.2 x static.

    python bench/inventory.py [--machines 10000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.boot_storm import all_machines, start_server  # noqa: E402
from tests.support import BIN, ansible_env, machines_requests, synthetic_mac, unsafe  # noqa: E402
from tests.vm.ansible import collections_path  # noqa: E402

ROLES = ["worker", "worker", "worker", "infra", "labcontroller", "vanilla"]
OSES = ["fedora-43", "ubuntu-26.04"]


def state_doc(n: int) -> dict:
    installed = {}
    for i in range(n):
        mac = synthetic_mac(i)
        installed[mac] = {
            "hostname": f"node{i:05d}", "role": ROLES[i % len(ROLES)], "os": OSES[i % 2],
            "ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", "installed_at": 1_700_000_000 + i,
            "hardware": {
                "cpu": {"model": "AMD EPYC 7313P 16-Core Processor", "cores": 16, "threads": 32, "arch": "x86_64"},
                "memory_mb": 65536 if i % 3 else 131072, "firmware": "uefi" if i % 4 else "bios",
                "dmi": {"vendor": "Supermicro", "product": "AS-1114S-WN10RT", "serial": f"S{i:08d}", "uuid": "",
                        "bios_vendor": "American Megatrends", "bios_version": "2.4"},
                "disks": [{"name": "nvme0n1", "size_bytes": 1_920_383_410_176, "model": "SAMSUNG MZQL21T9", "serial": f"D{i}",
                           "rotational": False, "removable": False, "transport": "nvme"}],
                "nics": [{"name": "eno1", "mac": mac, "driver": "igb", "link": True, "speed_mbps": 1000}],
            },
        }
    return {"installed": installed}


def static_inventory(listing: dict) -> dict:
    """The --list output of the plugin as a YAML inventory: groups with their hosts, host variables."""
    hostvars = unsafe(listing["_meta"]["hostvars"])
    groups = {}
    for name, body in listing.items():
        if name in ("_meta", "all", "ungrouped") or not isinstance(body, dict):
            continue
        groups[name] = {"hosts": {h: None for h in body.get("hosts", [])}}
    return {"all": {"hosts": hostvars, "children": groups}}


def timed_list(source: Path, env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(source), "--list"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"ansible-inventory -i {source} failed:\n{r.stderr[-3000:]}")
    return seconds, json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=1, help="timed runs of each (the static one takes minutes at 10,000)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-inventory-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        (tmp / "state.json").write_text(json.dumps(state_doc(args.machines)))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bastion_app.cli", "import", "--data-dir", str(data), str(tmp / "state.json")],
                       check=True, capture_output=True, cwd=REPO)
        print(f"loaded {args.machines} installed machines with lab-bastion import in {time.perf_counter() - t0:.1f} s")
        server = start_server(data, workers=2)
        try:
            env = ansible_env(collections_path(tmp / "collections"), ANSIBLE_INVENTORY_UNPARSED_FAILED="True")
            plugin = tmp / "lab.yml"
            plugin.write_text(yaml.safe_dump({"plugin": "lab.platform.lab", "sources": [server.url], "token": server.token}))
            # Warm-up run (also the source of the static file), then the timed rounds.
            _, listing = timed_list(plugin, env)
            hosts = len(listing["_meta"]["hostvars"])
            assert hosts == args.machines, f"plugin listed {hosts} hosts, expected {args.machines}"
            static = tmp / "static.yml"
            static.write_text(yaml.dump(static_inventory(listing), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                        sort_keys=False, default_flow_style=False))
            plugin_s, static_s = [], []
            before = machines_requests(server.url)
            for _ in range(args.rounds):
                seconds, static_listing = timed_list(static, env)
                static_s.append(seconds)
                assert unsafe(static_listing["_meta"]["hostvars"]) == unsafe(listing["_meta"]["hostvars"]), "static inventory differs"
                plugin_s.append(timed_list(plugin, env)[0])
            requests_made = machines_requests(server.url) - before
            walk = machines_requests(server.url)
            all_machines(server)  # the pages a client walks
            pages = machines_requests(server.url) - walk
        finally:
            server.stop()
    p, s = statistics.median(plugin_s), statistics.median(static_s)
    ratio = p / s
    print(f"hosts: {hosts}, groups: {len([k for k in listing if k not in ('_meta', 'all')])}")
    print(f"static YAML inventory (baseline): median {s:.2f} s  {[round(x, 2) for x in static_s]}")
    print(f"lab.platform.lab plugin:         median {p:.2f} s  {[round(x, 2) for x in plugin_s]}")
    print(f"ratio plugin/static: {ratio:.2f}x (target <= 1.2x)")
    print(f"GET /api/machines per plugin run: {requests_made / args.rounds:g} (target: exactly 1 per page, {pages:g} pages)")
    ok = ratio <= 1.2 and requests_made == args.rounds * pages
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
