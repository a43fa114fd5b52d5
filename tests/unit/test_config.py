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


@pytest.mark.parametrize("settings,match", [
    ({"workers": 0}, "workers: must be at least 1"),
    ({"threads": "0"}, "threads: must be at least 1"),
    ({"syslog_port": 70000}, "syslog_port: must be at most 65535"),
    ({"listen": "0.0.0.0:0"}, "listen: must be HOST:PORT"),
    ({"log_lines": 9}, "log_lines: must be at least 10"),
    ({"followers": 0}, "followers: must be at least 1"),
    ({"error_rate": 0}, "error_rate: must be at least 1"),
    ({"error_burst": 0}, "error_burst: must be at least 1"),
    ({"discovery": "pxe"}, "discovery: must be image or kickstart"),
    ({"discovery_action": "halt"}, "discovery_action: must be poweroff or reboot"),
    ({"db_synchronous": "OFF"}, "db_synchronous: must be FULL, NORMAL or EXTRA"),
    ({"log_level": "loud"}, "log_level: must be debug, info, warning, error or critical"),
    ({"dnsmasq": "maybe"}, "dnsmasq: invalid value 'maybe'"),
    ({"subnet": "10.0.0.0/33"}, "subnet: .* is not a network"),
    ({"gateway": "gw"}, "gateway: 'gw' is not an IP address"),
    ({"interface": "a" * 16}, "interface: .* is not an interface name"),
    ({"interface": ".."}, "interface: .* is not an interface name"),
    ({"interface": "eth0:1"}, "interface: .* is not an interface name"),
    ({"access_log": "relative.log"}, "access_log: .*absolute file path"),
    ({"dhcp_mode": "full"}, "dhcp_mode full needs dhcp_range START,END"),
    ({"dhcp_mode": "full", "dhcp_range": "10.0.0.9,10.0.0.1"}, "dhcp_range: 10.0.0.9 comes after 10.0.0.1"),
    ({"dhcp_range": "10.0.0.1,fe80::1"}, "dhcp_range: .* two IPv4 addresses"),
    ({"workers": 0, "listen": "x"}, "listen: .*; workers: must be at least 1"),
])
def test_each_rule_names_the_setting_and_what_to_change(tmp_path, settings, match):
    with pytest.raises(c.ConfigError, match=match):
        c.load(tmp_path, overrides=settings, env={}, detect=False)


def test_strings_from_the_environment_are_typed(tmp_path):
    env = {"LAB_BASTION_WORKERS": " 8 ", "LAB_BASTION_DNSMASQ": "off", "LAB_BASTION_DB_SYNCHRONOUS": "normal",
           "LAB_BASTION_EXTRA": '{"a": 1}', "LAB_BASTION_ACCESS_LOG": "-"}
    cfg = c.load(tmp_path, env=env, detect=False)
    assert (cfg.workers, cfg.dnsmasq, cfg.db_synchronous, cfg.extra, cfg.access_log) == (8, False, "NORMAL", {"a": 1}, "-")
    for word, value in (("yes", True), ("ON", True), ("1", True), ("no", False), ("False", False), ("0", False)):
        assert c.load(tmp_path, env={"LAB_BASTION_DNSMASQ": word}, detect=False).dnsmasq is value


def test_as_dict_lists_every_setting_and_validate_checks_changes(tmp_path):
    cfg = c.load(tmp_path, env={}, detect=False)
    assert list(cfg.as_dict()) == list(c.SETTINGS) and cfg.as_dict()["data_dir"] == str(tmp_path)
    assert c.validate(cfg) == cfg
    cfg.dhcp_mode = "full"  # attributes are not validated on assignment: validate() checks them again
    with pytest.raises(c.ConfigError, match="dhcp_range"):
        c.validate(cfg)
