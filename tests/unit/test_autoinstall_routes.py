"""GET /autoinstall/<mac>/<token>/user-data and meta-data through the Flask app."""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

import yaml

from tests.support import need_binary, queue_install

MAC = "52:54:00:ab:cd:02"


def test_nocloud_user_data_and_meta_data(client, auth):
    token = queue_install(client, auth, os_name="ubuntu-26.04", mac=MAC, hostname="node-ai")
    dispatch = client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    assert f"/autoinstall/{MAC}/{token}/" in dispatch  # the iPXE script points here
    r = client.get(f"/autoinstall/{MAC}/{token}/user-data")
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    doc = yaml.safe_load(r.get_data(as_text=True))
    assert doc["autoinstall"]["user-data"]["hostname"] == "node-ai"
    m = client.get(f"/autoinstall/{MAC}/{token}/meta-data")
    assert yaml.safe_load(m.get_data(as_text=True))["local-hostname"] == "node-ai"


def test_refusals(client, auth):
    token = queue_install(client, auth, os_name="ubuntu-26.04", mac=MAC)
    assert client.get(f"/autoinstall/{MAC}/{'x' * 24}/user-data").status_code == 403
    assert client.get(f"/autoinstall/{MAC}/bad/user-data").status_code == 400
    assert client.get(f"/autoinstall/nope/{token}/meta-data").status_code == 400
    assert client.get(f"/autoinstall/52:54:00:00:00:77/{token}/user-data").status_code == 403


def test_fedora_machine_gets_no_autoinstall(client, auth):
    token = queue_install(client, auth, os_name="fedora-43", mac=MAC)
    r = client.get(f"/autoinstall/{MAC}/{token}/user-data")
    assert r.status_code == 409 and "fedora-43" in r.json["error"]


def casper_urls(cmdline: str) -> list[str]:
    """The url= values casper acts on, found the way casper's initramfs script does: a shell `case`
    over the kernel command line's words with the pattern url=*.iso (scripts/casper)."""
    need_binary("sh")
    out = subprocess.run(["sh", "-c", 'for x in $1; do case "$x" in url=*.iso) echo "${x#url=}" ;; esac; done',
                          "casper", cmdline], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_casper_finds_the_installer_iso_on_the_kernel_line(client, auth, data_dir):
    token = queue_install(client, auth, os_name="ubuntu-26.04", mac=MAC)
    script = client.get(f"/dispatch?mac={MAC}").get_data(as_text=True)
    [kernel] = [ln for ln in script.splitlines() if ln.startswith("kernel ")]
    [url] = casper_urls(kernel)
    base = script.rsplit("chain --replace ", 1)[1].split("/dispatch", 1)[0]  # the bastion's URL
    assert url == f"{base}/images/ubuntu-26.04/installer.iso"
    # the URL casper downloads is served by the artefact route (no token needed)
    iso = data_dir / "images" / "ubuntu-26.04" / "installer.iso"
    iso.parent.mkdir(parents=True, exist_ok=True)
    iso.write_bytes(b"ISO9660 stand-in")
    r = client.get(urlsplit(url).path)
    assert r.status_code == 200 and r.data == b"ISO9660 stand-in"
    # cloud-init NoCloud: ds=nocloud with an http seed ending in "/" (nocloud-net is a deprecated alias)
    [ds] = [w for w in kernel.split() if w.startswith("ds=")]
    assert ds == f"ds=nocloud;s={base}/autoinstall/{MAC}/{token}/"


def test_casper_would_ignore_the_former_tokenised_url():
    # the former kernel line's url= ended in ?token=...: casper never takes it
    assert casper_urls("ip=dhcp url=http://h/images/ubuntu-26.04/installer.iso?token=tok_x autoinstall") == []
