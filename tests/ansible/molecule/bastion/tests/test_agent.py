"""lab-agent on the bastion VM after converge (role lab.platform.lab_agent with a one-use token scoped
to the host): enrolled, active in labd, and running a command through labd (pytest-testinfra)."""

import json

from labd_probe import LOGIN

# As an operator: log in to labd (verified with labd's CA), see the agent, run `uname -a` on it and
# read the command's output and exit code (labctl exec's polling, in a few lines of stdlib).
EXEC = LOGIN + r"""
host = sys.argv[2]
deadline = time.monotonic() + 120
while True:  # enrolled at converge; connected to the hub once it has beaten
    agent = call("/api/v1/agents/" + host, token=token)
    if agent["status"] == "active" and agent.get("last_seen_at"):
        break
    assert time.monotonic() < deadline, agent
    time.sleep(1)
made = call("/api/v1/agents/" + host + "/exec", {"argv": ["uname", "-a"]}, token)
out, after = [], 0
while True:
    c = call("/api/v1/commands/%s?after=%d" % (made["id"], after), token=token)
    out += [o["data"] for o in c["output"] if o["stream"] == "stdout"]
    after = c["next_after"]
    if c["state"] not in ("queued", "sent") and not c["output"]:
        break
    assert time.monotonic() < deadline + 60, c
    time.sleep(0.5)
print(json.dumps({"status": agent["status"], "state": c["state"], "result": c.get("result"), "output": "".join(out)}))
"""


def test_service_runs_enabled_and_hardened(host):
    svc = host.service("lab-agent")
    assert svc.is_running and svc.is_enabled
    unit = host.file("/etc/systemd/system/lab-agent.service").content_string
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_KILL"):
        assert line in unit, line


def test_identity_is_private(host):
    state = host.file("/var/lib/lab-agent")
    assert state.is_directory and state.user == "root" and state.mode == 0o700
    for name in ("key.pem", "cert.pem", "identity.json"):
        f = host.file(f"/var/lib/lab-agent/{name}")
        assert f.exists and f.mode == 0o600, name


def test_agent_is_active_in_labd_and_runs_a_command_as_the_exec_user(host):
    name = host.check_output("hostname")
    r = host.run("python3 -c %s /var/lib/labd/admin-password %s", EXEC, name)
    assert r.rc == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["status"] == "active" and got["state"] == "done" and got["result"]["exit_code"] == 0, got
    assert "Linux" in got["output"] and host.check_output("uname -r") in got["output"], got


def test_join_token_in_no_log(host):
    journal = host.run("journalctl --no-pager -o cat").stdout
    assert "LAB_AGENT_TOKEN" not in journal
