"""`labctl init bastion ...` without a bastion host: usage errors and status exit codes.
(start itself is what the molecule scenario's converge does: playbooks/bastion.yml on a VM.)"""

from __future__ import annotations

import subprocess
import sys

from tests.support import free_port


def labctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labctl.main", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    r = labctl("init", "bastion", "standalone", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("start", "stop", "status"))


def test_full_dhcp_without_range_is_a_usage_error():
    r = labctl("init", "bastion", "standalone", "start", "--dhcp-mode", "full")
    assert r.returncode == 2 and "--dhcp-range" in r.stderr + r.stdout


def test_bad_target_is_a_usage_error():
    r = labctl("init", "bastion", "standalone", "status", "--target", "root@bad host;rm")
    assert r.returncode == 2 and "is not [USER@]HOST[:PORT]" in r.stderr + r.stdout


def test_status_without_a_bastion_exits_3():
    r = labctl("init", "bastion", "standalone", "status", "--port", str(free_port()))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "healthz: no answer" in r.stdout


def test_labd_and_token_go_together_and_the_token_must_be_a_join_token():
    r = labctl("init", "bastion", "standalone", "start", "--labd", "https://labd.example:8443")
    assert r.returncode == 2 and "--labd and --token go together" in r.stderr + r.stdout
    r = labctl("init", "bastion", "standalone", "start", "--labd", "https://labd.example:8443", "--token", "labd_bastion_x")
    assert r.returncode == 2 and "not a join token" in r.stderr + r.stdout
