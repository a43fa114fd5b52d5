"""The disk layout (seed: "Disk Layout"): one table for the Fedora kickstart, the Ubuntu
autoinstall and the image deploy alike, and the space it needs.

Every role gets :data:`COMMON` (``/home`` and ``/srv`` kept on reprovision); a role's own data
volumes are the mount points its :attr:`labcore.domain.Role.kept_volumes` names, sized here in
:data:`DATA_VOLUMES`. So which volumes a reprovision keeps is said once, in the role table.

Units: the seed's table gives decimal sizes (600 MB, 3 GB, 27 GB, ...), as disks are sold; the
installers take MiB (kickstart ``--size``, curtin ``<n>M``). Each size here is the seed's size in
MiB, rounded up, so every volume holds at least what the seed promises. In GiB the same numbers
made an infra machine need 223.6 GiB (240.1 GB), more than a 240 GB disk holds; in GB it needs
223.6 GB (208.3 GiB).

:func:`disk_mib_needed` and :func:`lv_alloc_mib` are the space arithmetic; the install scripts
get their results rendered in (``_install-disk.sh.j2``) and compare them with the disk and the
volume group before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from labcore import domain

MIB = 2**20
GB = 10**9


def mib_of(n_bytes: int) -> int:
    """``n_bytes`` in MiB, rounded up."""
    return -(-n_bytes // MIB)


def gb(n: int) -> int:
    """The seed's ``n GB`` (decimal) in MiB, rounded up."""
    return mib_of(n * GB)


@dataclass(frozen=True)
class Volume:
    mount: str
    name: str  # logical volume name in labvg
    size_mib: int | None  # None = the rest of the volume group
    fstype: str
    preserve: bool  # kept on reprovision
    #: the smallest size the image deploy gives it on a disk too small for the seed's sizes
    #: (:func:`scaled_sizes`); a multiple of EXTENT_MIB
    min_mib: int = 512


EFI_MIB = mib_of(600 * 10**6)  # 573
BOOT_MIB = gb(3)  # 2862
BIOS_BOOT_MIB = 1  # the autoinstall creates it beside the ESP; the kickstart instead of it (BIOS)
TMP_SIZE = "4G"  # tmpfs /tmp (memory, not disk)
#: LVM's default physical extent (Anaconda/blivet and curtin create labvg with it): every logical
#: volume takes a whole number of extents.
EXTENT_MIB = 4
#: the GPT: the first partition starts at 1 MiB, the backup table sits in the last MiB
GPT_MIB = 2
#: LVM metadata at the start of the physical volume (the data area starts at 1 MiB)
PV_METADATA_MIB = 1

#: every role's logical volumes
COMMON = (
    Volume("swap", "swap", gb(27), "swap", False, 512),
    Volume("/", "root", gb(33), "xfs", False, 3072),
    Volume("/var", "var", gb(100), "xfs", False, 2048),
    Volume("/var/log", "varlog", gb(10), "xfs", False, 512),
    Volume("/home", "home", gb(10), "xfs", True, 512),
    Volume("/srv", "srv", gb(20), "xfs", True, 512),
)
#: the roles' own data volumes by mount point (always kept); which role has which: Role.kept_volumes
DATA_VOLUMES = {v.mount: v for v in (
    Volume("/var/lib/longhorn", "longhorn", None, "xfs", True, 1024),
    Volume("/var/lib/rancher", "rancher", gb(20), "xfs", True, 1024),
)}
LAYOUT = COMMON + tuple(DATA_VOLUMES.values())


def volumes_for(role: str) -> list[Volume]:
    """The logical volumes of a machine with ``role`` (a validated role name)."""
    return [*COMMON, *(DATA_VOLUMES[mount] for mount in domain.role(role).kept_volumes)]


def lv_alloc_mib(v: Volume) -> int:
    """What creating ``v`` takes from labvg: its size rounded up to whole extents; a volume that
    takes the rest of the group needs at least one extent."""
    size = v.size_mib or 1
    return -(-size // EXTENT_MIB) * EXTENT_MIB


def disk_mib_needed(role: str) -> int:
    """The smallest disk (MiB) a fresh install of ``role`` fits on: partition table, BIOS boot
    partition, ESP, ``/boot``, the physical volume's metadata and every logical volume."""
    return (GPT_MIB + BIOS_BOOT_MIB + EFI_MIB + BOOT_MIB + PV_METADATA_MIB
            + sum(lv_alloc_mib(v) for v in volumes_for(role)))


# -- small disks (the image deploy) ------------------------------------------------------------
#
# The seed's sizes need a 200+ GB disk. The image deploy also installs on smaller disks, by this
# rule: when labvg is smaller than the volumes' seed sizes, every volume gets its ``min_mib``, and
# the space beyond the minimums is shared among the fixed-size volumes in proportion to how far
# each one's seed size is above its minimum (rounded down to whole extents); the volume without a
# size (worker: /var/lib/longhorn) takes what is left. A 20 GiB disk gives a worker about 4.3 GiB
# of / and 6.4 GiB of /var. Below :func:`min_disk_mib` the install fails before partitioning.
# The partitions (BIOS boot, ESP, /boot) keep their sizes. ``image/install.sh.j2`` computes the
# same rule in bash from labvg's real free space; a unit test holds the two to the same results.


def scaled_sizes(role: str, vg_mib: int) -> dict[str, int | None]:
    """Logical volume name -> size (MiB; None: the rest) for ``role`` in a labvg of ``vg_mib``."""
    vols = volumes_for(role)
    if vg_mib >= sum(lv_alloc_mib(v) for v in vols):
        return {v.name: v.size_mib for v in vols}
    extra = vg_mib - sum(v.min_mib for v in vols)
    span = sum(v.size_mib - v.min_mib for v in vols if v.size_mib)
    sizes: dict[str, int | None] = {}
    for v in vols:
        if v.size_mib is None:
            sizes[v.name] = None
        else:
            share = max(extra, 0) * (v.size_mib - v.min_mib) // span
            sizes[v.name] = (v.min_mib + share) // EXTENT_MIB * EXTENT_MIB
    return sizes


def min_disk_mib(role: str) -> int:
    """The smallest disk (MiB) the image deploy installs ``role`` on: the partitions, the physical
    volume's metadata and every volume at its minimum, plus one extent of alignment."""
    return (GPT_MIB + BIOS_BOOT_MIB + EFI_MIB + BOOT_MIB + PV_METADATA_MIB + EXTENT_MIB
            + sum(v.min_mib for v in volumes_for(role)))
