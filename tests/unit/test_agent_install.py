"""lab-agent's part of the install scripts (bastion_app/agent_install.py, scripts/_agent.sh.j2): the
unit is roles/lab_agent's (one home), the Fedora kickstart with it passes the real `ksvalidator -v
F43`, the image deploy's script parses, neither carries a join token, the wheels served are the
agent's, and the bastion's store keeps one token per install (forgotten with the install)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bastion_app import agent_install
from bastion_app.images.sync import DEFAULT_MANIFEST
from bastion_app.installers import image_install_script, kickstart
from bastion_app.store import Store
from tests.support import IMAGE, MAC, TOKEN, install_params, need_binary, validate_f43
from tests.support import INSTALL_BASE as BASE
from tests.support import image_machine as machine

WHEELS = ["lab_platform-0.1.0-py3-none-any.whl", "pip-23.2.1-py3-none-any.whl", "click-8.5.1-py3-none-any.whl",
          "cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl", "ansible_core-2.19.14-py3-none-any.whl",
          "charset_normalizer-3.5.3-cp311-cp311-manylinux1_x86_64.whl"]
ROLE = Path(__file__).resolve().parents[2] / "roles" / "lab_agent"


def agent(hostname: str = "node1") -> dict:
    return agent_install.script_context(WHEELS, hostname)


def test_the_unit_is_roles_lab_agents_with_its_hardening():
    unit = agent_install.unit_text()
    template = (ROLE / "templates" / "etc" / "systemd" / "system" / "lab-agent.service.j2").read_text()
    fixed = [line for line in template.splitlines() if re.match(r"[A-Z][A-Za-z]+=", line) and "{{" not in line]
    assert len(fixed) > 20
    for line in fixed:  # every setting the role writes, the installer writes
        assert line in unit.splitlines(), line
    assert "ExecStart=/opt/lab-agent/venv/bin/lab-agent run --state-dir /var/lib/lab-agent --exec-user lab-exec" in unit
    assert "ReadWritePaths=/var/lib/lab-agent /var/lib/lab-exec" in unit
    assert unit.startswith("# lab-platform: roles/lab_agent's unit")


def test_the_join_step_reads_the_token_once_and_never_from_the_command_line():
    drop = agent_install.join_dropin(agent_install.role_settings(), "node1")
    assert "ExecStartPre=/bin/sh -c 'if [ ! -e /var/lib/lab-agent/identity.json ]" in drop
    assert ". /var/lib/lab-agent/join.env" in drop and "rm -f /var/lib/lab-agent/join.env" in drop
    assert "--name node1" in drop and "--token" not in drop and "$" not in drop and "%" not in drop
    with pytest.raises(ValueError):
        agent_install.join_dropin(agent_install.role_settings(), "node1$(reboot)")


def test_only_the_agents_wheels_are_fetched():
    names = agent()["wheels"]
    assert "ansible_core-2.19.14-py3-none-any.whl" not in names
    assert {"lab_platform-0.1.0-py3-none-any.whl", "pip-23.2.1-py3-none-any.whl",
            "charset_normalizer-3.5.3-cp311-cp311-manylinux1_x86_64.whl"} <= set(names)


def test_the_kickstart_with_the_agent_passes_ksvalidator(tmp_path):
    text = kickstart(install_params("worker"), base=BASE, syslog_port=5514, manifest=DEFAULT_MANIFEST, agent=agent())
    validate_f43(tmp_path, text)
    post = text[text.index("%post --interpreter=/bin/bash --erroronfail"):]
    post = post[:post.index("%end")]
    assert "lab_in_root python3 -m venv --without-pip /opt/lab-agent/venv" in post
    assert f"{BASE}/api/agent-join" in post and "LAB_AGENT_TOKEN" not in post
    assert "systemctl enable lab-agent.service" in post
    plain = kickstart(install_params("worker"), base=BASE, syslog_port=5514, manifest=DEFAULT_MANIFEST)
    assert "lab-agent" not in plain


def test_the_image_script_with_the_agent_parses_and_installs_it_before_the_bootloader(tmp_path):
    need_binary("bash")
    text = image_install_script(machine(), base=BASE, image=IMAGE, agent=agent())
    path = tmp_path / "install.sh"
    path.write_text(text)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert text.index("post-install: lab-agent") < text.index("LAB_STEP=bootloader")
    for name in agent()["wheels"]:
        assert f"{BASE}/images/lab-agent/{name}" in text
    assert "LAB_AGENT_TOKEN" not in text
    assert "lab-agent" not in image_install_script(machine(), base=BASE, image=IMAGE)


def test_wheels_need_lab_platform_and_pip(tmp_path):
    images = tmp_path / "images"
    (images / "lab-agent").mkdir(parents=True)
    assert agent_install.wheels(images) is None
    (images / "lab-agent" / "lab_platform-0.1.0-py3-none-any.whl").write_bytes(b"PK")
    (images / "lab-agent" / "bad name;.whl").write_bytes(b"PK")
    assert agent_install.wheels(images) is None  # no pip
    src = tmp_path / "wheelhouse"
    src.mkdir()
    with pytest.raises(agent_install.AgentWheelsError, match="no lab_platform"):
        agent_install.install_wheels(src, images)
    (src / "lab_platform-0.1.0-py3-none-any.whl").write_bytes(b"PK")
    names = agent_install.install_wheels(src, images)  # pip's wheel from this Python's ensurepip
    assert any(n.startswith("pip-") for n in names)
    assert agent_install.wheels(images) == sorted(names)


def test_pip_wheel_from_the_distributions_wheel_dir(tmp_path, monkeypatch):
    """Debian's and Fedora's Python have no ensurepip/_bundled: their pip wheel is in WHEEL_PKG_DIR."""
    fake = tmp_path / "ensurepip"
    (fake / "_bundled").mkdir(parents=True)
    distro = tmp_path / "python-wheels"
    distro.mkdir()
    monkeypatch.setattr(agent_install.ensurepip, "__file__", str(fake / "__init__.py"))
    real = agent_install.sysconfig.get_config_var
    monkeypatch.setattr(agent_install.sysconfig, "get_config_var",
                        lambda name: str(distro) if name == "WHEEL_PKG_DIR" else real(name))
    assert agent_install.python_pip_wheel() is None
    src = tmp_path / "wheelhouse"
    src.mkdir()
    (src / "lab_platform-0.1.0-py3-none-any.whl").write_bytes(b"PK")
    with pytest.raises(agent_install.AgentWheelsError, match="no pip wheel of its own"):
        agent_install.install_wheels(src, tmp_path / "images")
    assert not (tmp_path / "images").exists()  # nothing half-written
    (distro / "pip-23.0.1-py3-none-any.whl").write_bytes(b"PK")
    (distro / "setuptools-66.1.1-py3-none-any.whl").write_bytes(b"PK")
    assert agent_install.python_pip_wheel() == distro / "pip-23.0.1-py3-none-any.whl"
    names = agent_install.install_wheels(src, tmp_path / "images")
    assert names == ["lab_platform-0.1.0-py3-none-any.whl", "pip-23.0.1-py3-none-any.whl"]


def test_the_store_keeps_one_token_per_install_and_forgets_it_with_the_install(tmp_path):
    store = Store(tmp_path / "state.db")
    store.discover(MAC, {}, ip="10.0.0.5")
    store.queue_install(MAC, {"hostname": "node1", "role": "worker", "os": "debian-12", "disk": "", "ssh_keys": []},
                        actor="test")
    assert store.agent_tokens_wanted(retry_s=30) == []  # labd has not acknowledged the machine's row yet
    store.link_ack(0, store.link_state()["change_seq"])
    (wanted,) = store.agent_tokens_wanted(retry_s=30)
    assert wanted["hostname"] == "node1" and wanted["install_token"] == store.get(MAC)["install_token"]
    store.agent_token_asked(MAC, wanted["install_token"], "ref1")
    assert store.agent_tokens_wanted(retry_s=30) == []  # asked: not again within retry_s
    assert len(store.agent_tokens_wanted(retry_s=0, now=10 ** 10)) == 1  # but again once it has passed
    assert not store.agent_token_answer(MAC, "other", token="t", error=None)  # an answer to another request
    assert store.agent_token_answer(MAC, "ref1", token=TOKEN, error=None)
    assert store.agent_token(MAC, wanted["install_token"]) == TOKEN
    assert store.agent_tokens_wanted(retry_s=0, now=10 ** 10) == []
    store.cancel(MAC, actor="test")  # the install token goes: so does the agent's
    assert store.agent_token(MAC, wanted["install_token"]) is None
