"""The nginx front's configuration (bastion_app/front.py): what it promises, and that a data
directory path cannot add a directive to it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bastion_app import front
from labcore import bastion_config
from tests.support import need


def config(data_dir: Path, **over) -> bastion_config.Config:
    return bastion_config.load(data_dir, overrides={"listen": "127.0.0.1:8080", "dnsmasq": False, **over}, env={}, detect=False)


def test_promises(tmp_path):
    text = front.config_text(config(tmp_path), tmp_path / "run", tmp_path / "run" / "g.sock")
    for line in ("listen 127.0.0.1:8080;", "client_header_timeout 10s;", "client_body_timeout 10s;",
                 f"limit_conn per_source {front.PER_SOURCE_CONNECTIONS};", "limit_conn_status 429;",
                 "proxy_set_header X-Forwarded-For $remote_addr;", f"server unix:{tmp_path}/run/g.sock;",
                 f"alias {tmp_path.resolve()}/images/;", "internal;", "proxy_read_timeout 330s;"):
        assert line in text, line
    assert "listen [::1]:9000;" in front.config_text(config(tmp_path, listen="[::1]:9000"), tmp_path, tmp_path / "s")


@pytest.mark.parametrize("name", ['a"b', "a;b", "a b", "a{b", "a$b", "a\nb"])
def test_a_path_cannot_add_a_directive(tmp_path, name):
    with pytest.raises(bastion_config.ConfigError, match="may not contain"):
        front.config_text(config(tmp_path / name), tmp_path, tmp_path / "s")


def test_nginx_accepts_it(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    need(Path(nginx).exists(), "needs nginx (Debian's nginx-light: make deps-system)")
    run = tmp_path / "run"
    run.mkdir()
    conf = front.write_config(config(tmp_path), run, run / "g.sock")
    r = subprocess.run([*front.argv(conf, nginx), "-t"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
