"""Configuration: bastion.yaml, LAB_BASTION_* overrides, flags, validation, network detection."""

import pytest

from labcore import bastion_config as c


def test_defaults_file_env_and_flags(tmp_path):
    (tmp_path / "bastion.yaml").write_text("listen: 127.0.0.1:9000\nworkers: 2\ndhcp_mode: full\ndhcp_range: 10.0.0.10,10.0.0.99\n")
    cfg = c.load(tmp_path, env={"LAB_BASTION_WORKERS": "3", "LAB_BASTION_DNSMASQ": "false"}, detect=False)
    assert (cfg.listen, cfg.workers, cfg.dnsmasq, cfg.dhcp_mode) == ("127.0.0.1:9000", 3, False, "full")
    cfg = c.load(tmp_path, overrides={"workers": 5, "listen": None}, env={"LAB_BASTION_WORKERS": "3"}, detect=False)
    assert cfg.workers == 5 and cfg.listen_port == 9000
    assert cfg.db_path == tmp_path / "state.db"


@pytest.mark.parametrize("yaml_text,match", [
    ("nonsense: 1\n", "unknown setting"),
    ("listen: nope\n", "HOST:PORT"),
    ("dhcp_mode: relay\n", "proxy or full"),
    ("workers: many\n", "invalid value"),
    ("interface: \"eth0\\nport=53\"\n", "not an interface"),
    ("server_ip: 10.0.0.300\n", "not an IP"),
    ("public_url: \"http://x/ y\"\n", "public_url"),
    ("- a list\n", "mapping"),
    ("listen: [\n", "not valid YAML"),
])
def test_bad_config_is_a_clear_error(tmp_path, yaml_text, match):
    (tmp_path / "bastion.yaml").write_text(yaml_text)
    with pytest.raises(c.ConfigError, match=match):
        c.load(tmp_path, env={}, detect=False)


def test_no_data_dir():
    with pytest.raises(c.ConfigError, match="--data-dir"):
        c.load(None, env={})


def test_explicit_network_wins_over_detection(tmp_path):
    cfg = c.load(tmp_path, overrides={"server_ip": "192.0.2.10", "subnet": "192.0.2.0/24", "interface": "lab0"}, env={})
    assert (cfg.server_ip, cfg.subnet, cfg.interface) == ("192.0.2.10", "192.0.2.0/24", "lab0")
    assert cfg.base_url() == "http://192.0.2.10:8080"


def test_detection_finds_the_default_route_interface(tmp_path):
    found = c.detect_network()
    if not found["interface"]:
        pytest.skip("this host has no IPv4 default route")
    cfg = c.load(tmp_path, env={})
    assert cfg.interface == found["interface"] and cfg.server_ip and cfg.subnet
