"""Command line for the test VM harness.

    python -m tests.vm build                      build (once) and print the cached image
    python -m tests.vm up NAME [--json] [--reuse] boot NAME on a fresh overlay, wait for SSH
    python -m tests.vm down NAME...               stop NAME(s), remove overlays  (--all: every VM)
    python -m tests.vm ssh NAME [-- CMD...]       run a command (or a shell) in NAME
    python -m tests.vm list                       running VMs
    python -m tests.vm inventory NAME...          Ansible inventory (YAML) for the named VMs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tests.vm import image as image_mod
from tests.vm import machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__.splitlines()[1])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the cached image if needed and describe it")
    p_up = sub.add_parser("up", help="boot a VM and wait for SSH")
    p_up.add_argument("name")
    p_up.add_argument("--memory", type=int, default=machine.DEFAULT_MEMORY_MB)
    p_up.add_argument("--cpus", type=int, default=machine.DEFAULT_CPUS)
    p_up.add_argument("--timeout", type=float, default=300)
    p_up.add_argument("--reuse", action="store_true", help="return the running VM of that name if any")
    p_up.add_argument("--json", action="store_true")
    p_down = sub.add_parser("down", help="stop VMs")
    p_down.add_argument("names", nargs="*")
    p_down.add_argument("--all", action="store_true")
    p_ssh = sub.add_parser("ssh", help="run a command in a VM")
    p_ssh.add_argument("name")
    p_ssh.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="running VMs")
    p_inv = sub.add_parser("inventory", help="print an Ansible inventory for VMs")
    p_inv.add_argument("names", nargs="+")
    p_inv.add_argument("--group", action="append", default=[], metavar="GROUP=NAME[,NAME]")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "build":
            img = image_mod.ensure_image(echo=lambda m: print(m, file=sys.stderr))
            print(json.dumps({**img.info(), "path": str(img.qcow2), "kernel": str(img.kernel)}, indent=2))
        elif args.cmd == "up":
            vm = machine.up(args.name, args.memory, args.cpus, args.timeout, reuse=args.reuse)
            if args.json:
                print(json.dumps({**vm.__dict__, "inventory": vm.inventory_vars(), "instance_config": vm.instance_config()}))
            else:
                print(f"{vm.name}: ssh -p {vm.port} -i {vm.key} root@127.0.0.1 (booted in {vm.boot_seconds}s)")
        elif args.cmd == "down":
            names = [vm.name for vm in machine.running()] if args.all else args.names
            for name in names:
                print(f"{name}: {'stopped' if machine.down(name) else 'not running'}")
        elif args.cmd == "ssh":
            vm = machine.VM.load(args.name)
            if vm is None or not vm.alive:
                print(f"VM {args.name} is not running", file=sys.stderr)
                return 2
            command = [c for c in args.command if c != "--"] if args.command else []
            os.execvp("ssh", vm.ssh_argv(*command))
        elif args.cmd == "list":
            for vm in machine.running():
                state = "up" if vm.alive else "dead"
                print(f"{vm.name}\t{state}\tpid={vm.pid}\tport={vm.port}\tboot={vm.boot_seconds}s\t{vm.console}")
        elif args.cmd == "inventory":
            print(inventory_yaml(args.names, dict(g.split("=", 1) for g in args.group)))
    except (machine.VMError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def inventory_yaml(names: list[str], groups: dict[str, str]) -> str:
    import yaml

    hosts = {}
    for name in names:
        vm = machine.VM.load(name)
        if vm is None:
            raise machine.VMError(f"VM {name} is not running")
        hosts[name] = vm.inventory_vars()
    inv: dict = {"all": {"hosts": hosts, "children": {}}}
    for group, members in groups.items():
        inv["all"]["children"][group] = {"hosts": {m: {} for m in members.split(",") if m}}
    return yaml.safe_dump(inv, sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
