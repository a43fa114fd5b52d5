#!/usr/bin/env python3
"""Power on 100 machines behind emulated Redfish BMCs, 10 at a time: through the bastion vs sushy directly.

One sushy-tools Redfish emulator (tests/bmc.py's systems driver: sushy-tools' fake driver, state in
memory) serves 100 systems, one per machine. The same run measures, with all machines off first:

- direct: 10 threads call sushy themselves, per machine what the bastion's driver does (connect
  to the BMC, read the system and its power state, reset ON);
- bastion: `labctl power on` 's batch path (labctl.power.run_batch, --max-parallel 10): one
  POST /api/power to a real `lab-bastion serve` (nginx, gunicorn, 4 workers), which makes those
  calls from a pool of 10 threads, opens the sealed credentials, records an event per machine and
  streams a line per machine back.

Both sides run --rounds times, alternated (direct, bastion, direct, ...; every machine off before
each round); prints the medians and their ratio (target <= 1.2x) and checks every machine ended up
on each time.

    python bench/power.py [--machines 100] [--max-parallel 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from labctl.client import Client  # noqa: E402
from labctl.power import run_batch  # noqa: E402
from tests.support import HW, start_bastion, start_redfish_bmc, synthetic_mac  # noqa: E402

USER, PASSWORD = "bench", "bench-Secret-1"


def uuid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012x}"


def sushy_conn(address: str):
    import sushy

    return sushy.Sushy(address, auth=sushy.auth.BasicAuth(USER, PASSWORD), server_side_retries=1,
                       server_side_retries_delay=1, read_timeout=8, connect_timeout=3)


def direct_on(address: str, i: int) -> str:
    import sushy

    system = sushy_conn(address).get_system(f"/redfish/v1/Systems/{uuid(i)}")
    if system.power_state != sushy.PowerState.ON:
        system.reset_system(sushy.ResetType.ON)
    return "on"


def all_off(address: str, n: int, parallel: int) -> None:
    import sushy

    def off(i: int) -> None:
        sushy_conn(address).get_system(f"/redfish/v1/Systems/{uuid(i)}").reset_system(sushy.ResetType.FORCE_OFF)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(off, range(n)))


def count_on(address: str, n: int, parallel: int) -> int:
    import sushy

    def state(i: int) -> bool:
        return sushy_conn(address).get_system(f"/redfish/v1/Systems/{uuid(i)}").power_state == sushy.PowerState.ON

    with ThreadPoolExecutor(parallel) as pool:
        return sum(pool.map(state, range(n)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=100)
    ap.add_argument("--max-parallel", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds of each side; the medians are compared")
    args = ap.parse_args()
    n, cap = args.machines, args.max_parallel
    with tempfile.TemporaryDirectory(prefix="bench-power-") as d:
        systems = [{"uuid": uuid(i), "name": f"m{i}", "power_state": "Off", "nics": []} for i in range(n)]
        bmc = start_redfish_bmc(Path(d) / "redfish", systems, USER, PASSWORD)
        server = start_bastion(Path(d) / "data", workers=args.workers,
                               env={"LAB_BASTION_DISCOVER_RATE": "100000", "LAB_BASTION_DISCOVER_BURST": "100000"})
        try:
            s = server.session()
            macs = [synthetic_mac(i, "52:54:07") for i in range(n)]
            for i, mac in enumerate(macs):
                s.post(server.url + "/api/discover", json={"mac": mac, "hardware": HW}).raise_for_status()
                s.put(f"{server.url}/api/machines/{mac}/bmc", json={
                    "driver": "redfish", "address": bmc.address, "username": USER, "password": PASSWORD,
                    "system_id": uuid(i)}).raise_for_status()

            directs, vias = [], []
            for _ in range(args.rounds):  # alternated, so a noisy moment hits both sides alike
                all_off(bmc.address, n, cap)
                t = time.monotonic()
                with ThreadPoolExecutor(cap) as pool:
                    assert all(r == "on" for r in pool.map(lambda i: direct_on(bmc.address, i), range(n)))
                directs.append(time.monotonic() - t)
                assert count_on(bmc.address, n, cap) == n

                all_off(bmc.address, n, cap)
                client = Client(server.url, server.token)
                t = time.monotonic()
                results = run_batch(client, macs, {"action": "on"}, max_parallel=cap)
                vias.append(time.monotonic() - t)
                failed = [r for r in results if "error" in r]
                if failed:
                    print(f"bastion: {len(failed)} calls failed, e.g. {failed[0]}")
                    return 1
                assert count_on(bmc.address, n, cap) == n and all(r["changed"] for r in results)
        finally:
            server.stop()
            bmc.stop()
    direct, via = statistics.median(directs), statistics.median(vias)
    ratio = via / direct
    print(f"power on {n} machines, {cap} at a time, median of {args.rounds} alternated rounds: "
          f"sushy directly {direct:.2f} s, through the bastion {via:.2f} s")
    print("  rounds: direct " + " ".join(f"{x:.2f}" for x in directs) + " / bastion " + " ".join(f"{x:.2f}" for x in vias))
    print(f"ratio bastion/direct: {ratio:.2f}x (target <= 1.2x): {'OK' if ratio <= 1.2 else 'OVER TARGET'}")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
