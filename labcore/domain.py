"""The domain's names: machine roles and operating systems, one table each.

Everything that lists roles or operating systems derives from these tables: validation
(:mod:`labcore.validate`), the API's Literal types (:mod:`labcore.schemas`), the installers' disk
layout and package choices, the boot scripts, ``labctl roles``, ``labctl app k3s`` and the doctor.
The Ansible side cannot import labcore (an AWX execution environment has ansible-core only); a test
ties its module choices and playbook role lists to these tables instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

K3sKind = Literal["server", "agent", "none"]
InstallerKind = Literal["kickstart", "autoinstall", "image"]


@dataclass(frozen=True)
class Role:
    name: str
    summary: str
    #: what the machine becomes in a k3s cluster: a server (control plane), an agent, or nothing
    k3s: K3sKind
    #: mount points of the role's own data volumes, kept on reprovision (besides /home and /srv,
    #: which every role keeps)
    kept_volumes: tuple[str, ...]
    #: what the install and the collection put on the machine (``labctl roles -o wide``)
    installs: tuple[str, ...]


_K3S_HOST = ("chronyd", "kernel modules br_netfilter, overlay", "sysctl ip_forward, inotify limits",
             "firewalld disabled")

ROLES: tuple[Role, ...] = (
    Role("vanilla", "OS only: no k3s, no cluster services", "none", (), ("chronyd",)),
    Role("worker", "k3s agent + Longhorn storage; joins an existing cluster", "agent", ("/var/lib/longhorn",),
         (*_K3S_HOST, "k3s binary (agent)", "Longhorn prerequisites, /var/lib/longhorn kept on reprovision")),
    Role("infra", "k3s server + embedded etcd (control-plane node)", "server", ("/var/lib/rancher",),
         (*_K3S_HOST, "k3s binary (server)", "/var/lib/rancher kept on reprovision")),
    Role("labcontroller", "infra + bastion + labd + CockroachDB: a self-sufficient controller", "server",
         ("/var/lib/rancher",),
         ("everything infra installs", "lab-platform bastion (dnsmasq, PXE, HTTP)", "labd", "CockroachDB")),
)


@dataclass(frozen=True)
class OperatingSystem:
    name: str
    #: how it installs: an Anaconda kickstart, a subiquity autoinstall, or the image deploy (the
    #: bastion's installer environment writes a root-filesystem image it built itself)
    installer: InstallerKind
    #: its installer also provides the rescue shell and the kickstart-based discovery
    rescue: bool
    #: the kernel and initrd file names under images/<name>/ (an image OS boots the shared
    #: installer environment, images/installer/, instead)
    kernel: str
    initrd: str
    #: its loader's folder on the EFI system partition (EFI/<efi_dir>/)
    efi_dir: str
    #: image OSes: the Debian suite the image is built from
    suite: str = ""


OPERATING_SYSTEMS: tuple[OperatingSystem, ...] = (
    OperatingSystem("fedora-43", "kickstart", True, "vmlinuz", "initrd.img", "fedora"),
    OperatingSystem("ubuntu-26.04", "autoinstall", False, "vmlinuz", "initrd", "ubuntu"),
    OperatingSystem("debian-12", "image", False, "", "", "debian", suite="bookworm"),
    OperatingSystem("debian-13", "image", False, "", "", "debian", suite="trixie"),
)

#: The ESP folders (EFI/<dir>/) of every system a lab machine may have had installed. A reinstall
#: removes all but its own, and the local-boot GRUB looks for loaders in these folders, in this order.
EFI_LOADER_DIRS: tuple[str, ...] = tuple(dict.fromkeys(o.efi_dir for o in OPERATING_SYSTEMS))

DEBUG_MODES = ("rescue", "pxe")

ROLE_NAMES: tuple[str, ...] = tuple(r.name for r in ROLES)
OS_NAMES: tuple[str, ...] = tuple(o.name for o in OPERATING_SYSTEMS)
#: operating systems installed from installer media (kernel, initrd under images/<name>/)
MEDIA_OS_NAMES: tuple[str, ...] = tuple(o.name for o in OPERATING_SYSTEMS if o.installer != "image")
#: operating systems deployed as an image the bastion builds (lab-bastion images build-os)
IMAGE_OS_NAMES: tuple[str, ...] = tuple(o.name for o in OPERATING_SYSTEMS if o.installer == "image")
K3S_SERVER_ROLES: tuple[str, ...] = tuple(r.name for r in ROLES if r.k3s == "server")
K3S_AGENT_ROLES: tuple[str, ...] = tuple(r.name for r in ROLES if r.k3s == "agent")
K3S_ROLES: tuple[str, ...] = tuple(r.name for r in ROLES if r.k3s != "none")


_ROLE_BY_NAME = {r.name: r for r in ROLES}
_OS_BY_NAME = {o.name: o for o in OPERATING_SYSTEMS}


def role(name: str) -> Role:
    """The role called ``name`` (KeyError for an unknown one: validate first)."""
    return _ROLE_BY_NAME[name]


def operating_system(name: str) -> OperatingSystem:
    """The operating system called ``name`` (KeyError for an unknown one: validate first)."""
    return _OS_BY_NAME[name]


#: The OS whose installer provides the rescue and kickstart-discovery environments.
RESCUE_OS: OperatingSystem = next(o for o in OPERATING_SYSTEMS if o.rescue)
