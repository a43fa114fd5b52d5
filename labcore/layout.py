"""The disk layout (seed: "Disk Layout"): one table for the Fedora kickstart and the Ubuntu
autoinstall alike.

Every role gets :data:`COMMON` (``/home`` and ``/srv`` kept on reprovision); a role's own data
volumes are the mount points its :attr:`labcore.domain.Role.kept_volumes` names, sized here in
:data:`DATA_VOLUMES`. So which volumes a reprovision keeps is said once, in the role table.
"""

from __future__ import annotations

from dataclasses import dataclass

from labcore import domain


@dataclass(frozen=True)
class Volume:
    mount: str
    name: str  # logical volume name in labvg
    size_mib: int | None  # None = the rest of the volume group
    fstype: str
    preserve: bool  # kept on reprovision


GIB = 1024
EFI_MIB = 600
BOOT_MIB = 3 * GIB
TMP_SIZE = "4G"

#: every role's logical volumes
COMMON = (
    Volume("swap", "swap", 27 * GIB, "swap", False),
    Volume("/", "root", 33 * GIB, "xfs", False),
    Volume("/var", "var", 100 * GIB, "xfs", False),
    Volume("/var/log", "varlog", 10 * GIB, "xfs", False),
    Volume("/home", "home", 10 * GIB, "xfs", True),
    Volume("/srv", "srv", 20 * GIB, "xfs", True),
)
#: the roles' own data volumes by mount point (always kept); which role has which: Role.kept_volumes
DATA_VOLUMES = {v.mount: v for v in (
    Volume("/var/lib/longhorn", "longhorn", None, "xfs", True),
    Volume("/var/lib/rancher", "rancher", 20 * GIB, "xfs", True),
)}
LAYOUT = COMMON + tuple(DATA_VOLUMES.values())


def volumes_for(role: str) -> list[Volume]:
    """The logical volumes of a machine with ``role`` (a validated role name)."""
    return [*COMMON, *(DATA_VOLUMES[mount] for mount in domain.role(role).kept_volumes)]
