"""Fake hosts for running the k3s playbooks and role entry points here, without a VM and without k3s.

Each fake host is `ansible_connection: local` with its own Python interpreter wrapper that sets
LAB_FAKE_HOST to the host's name and puts a directory of fake commands (k3s, kubectl, systemctl, ip,
iptables-save, ...) first on PATH. The real Ansible tasks and conditions run; the commands they call
log their arguments (with the host they ran "on", delegation included) and print recorded outputs.

    hosts = FakeHosts(tmp_path, {"k3s_servers": {"s1": {...hostvars}}, "k3s_agents": {...}})
    hosts.respond("k3s kubectl get nodes -o json", stdout=Path(...).read_text())
    result = hosts.play("playbooks/k3s_health.yml")     # ansible-playbook, callback_plugins/lab_record.py
    result.rc, result.calls (list of (host, argv)), result.task_names(), result.failed_messages()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FAKE_COMMANDS = ["k3s", "kubectl", "systemctl", "ip", "iptables-save", "iptables-restore", "ip6tables-save",
                 "ip6tables-restore", "ps", "pgrep", "umount"]

# The one fake program behind every fake command: logs "HOST<TAB>argv as JSON" (and its stdin for the
# *-restore commands), then answers with the longest recorded argv prefix.
FAKE = r'''#!{python}
import json, os, sys
d = os.environ["LAB_FAKE_DIR"]
argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
stdin = sys.stdin.read() if argv[0].endswith("-restore") else None
with open(os.path.join(d, "calls.log"), "a") as log:
    log.write(json.dumps({{"host": os.environ.get("LAB_FAKE_HOST", "?"), "argv": argv, "stdin": stdin}}) + "\n")
with open(os.path.join(d, "responses.json")) as f:
    responses = json.load(f)
best = None
for r in responses:
    n = len(r["argv"])
    if argv[:n] == r["argv"] and r.get("host") in (None, os.environ.get("LAB_FAKE_HOST")):
        if best is None or n > len(best["argv"]):
            best = r
best = best or {{"stdout": "", "rc": 0}}
sys.stdout.write(best.get("stdout", ""))
sys.exit(best.get("rc", 0))
'''

WRAPPER = """#!/bin/sh
export LAB_FAKE_HOST={host}
export LAB_FAKE_DIR={dir}
export PATH={bin}:$PATH
exec {python} "$@"
"""

# Facts a fake host reports (no fact gathering runs against it).
FACTS = {"ansible_os_family": "Debian", "ansible_distribution": "Debian", "ansible_distribution_major_version": "12",
         "ansible_service_mgr": "systemd", "ansible_selinux": {"status": "disabled"}}


@dataclass
class Result:
    rc: int
    doc: dict
    calls: list[dict]
    stderr: str

    def task_names(self, host: str | None = None) -> list[str]:
        """Names of the tasks that ran (ok, changed or failed) in order, for one host or any."""
        names = []
        for play in self.doc.get("plays", []):
            for task in play["tasks"]:
                hosts = task["hosts"]
                if any(not r.get("skipped") for h, r in hosts.items() if host in (None, h)):
                    names.append(task["task"]["name"])
        return names

    def failed_messages(self) -> dict[str, str]:
        out = {}
        for play in self.doc.get("plays", []):
            for task in play["tasks"]:
                for h, r in task["hosts"].items():
                    if r.get("failed"):
                        out[h] = r.get("msg", "")
        return out

    def argvs(self, host: str | None = None) -> list[list[str]]:
        return [c["argv"] for c in self.calls if host in (None, c["host"])]


class FakeHosts:
    def __init__(self, tmp: Path, groups: dict[str, dict[str, dict]]):
        self.dir = tmp
        self.bin = tmp / "fakebin"
        self.bin.mkdir(parents=True)
        fake = self.bin / "fake"
        fake.write_text(FAKE.format(python=sys.executable))
        fake.chmod(0o755)
        for name in FAKE_COMMANDS:
            (self.bin / name).symlink_to(fake)
        self.responses: list[dict] = []
        inventory: dict = {"all": {"children": {}}}
        for group, hosts in groups.items():
            inventory["all"]["children"][group] = {"hosts": {}}
            for host, hostvars in hosts.items():
                wrapper = tmp / f"python-{host}"
                wrapper.write_text(WRAPPER.format(host=host, dir=tmp, bin=self.bin, python=sys.executable))
                wrapper.chmod(0o755)
                inventory["all"]["children"][group]["hosts"][host] = {
                    "ansible_connection": "local", "ansible_python_interpreter": str(wrapper),
                    "ansible_host": "192.0.2.1", "ansible_nodename": host,
                    "ansible_default_ipv4": {"address": "192.0.2.1"}, **FACTS, **hostvars}
        self.inventory = tmp / "inventory.yml"
        self.inventory.write_text(yaml.safe_dump(inventory))

    def respond(self, command: str | list[str], stdout: str = "", rc: int = 0, host: str | None = None) -> None:
        argv = command.split() if isinstance(command, str) else command
        self.responses.append({"argv": argv, "stdout": stdout, "rc": rc, "host": host})

    def play(self, playbook: str | Path, extravars: dict | None = None, check: bool = False,
             limit: str | None = None) -> Result:
        (self.dir / "responses.json").write_text(json.dumps(self.responses))
        log = self.dir / "calls.log"
        log.write_text("")
        collections = self.dir / "collections"
        if not collections.exists():
            from labctl.runner import link_collection

            link_collection(collections, REPO)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_STDOUT_CALLBACK="lab_record",
                   ANSIBLE_CALLBACK_PLUGINS=str(Path(__file__).resolve().parent / "callback_plugins"),
                   ANSIBLE_LOCAL_TEMP=str(self.dir / "tmp"), ANSIBLE_HOME=str(self.dir / "home"),
                   ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_DEPRECATION_WARNINGS="0",
                   LAB_FAKE_DIR=str(self.dir), PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}")
        cmd = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(playbook),
               "-e", json.dumps(extravars or {})]
        if check:
            cmd.append("--check")
        if limit:
            cmd += ["--limit", limit]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=self.dir)
        try:
            doc = json.loads(p.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"ansible-playbook gave no JSON (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}") from None
        calls = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return Result(p.returncode, doc, calls, p.stderr)
