"""The kernel to boot on KVM, and an initrd that has the virtio drivers.

dracut (RHEL family, Debian with dracut): rebuilt with `--no-hostonly`,
because host-only mode picks the drivers of the machine it runs on (the
conversion host, or the physical server's controller) and leaves out virtio
(clonezilla#132), and `--no-hostonly-cmdline`, because otherwise dracut bakes
the root it sees into the image, which in the chroot is a loop device
(dracut-ng#2519). The command-line flags win over `hostonly="yes"` in
dracut.conf.d (RHEL's 01-dist.conf), which therefore stays. dracut 004 (EL6)
knows neither flag and builds generic images by default. The command lines
are the distro family's (tasks/lib/distro): which tool, where the image goes.

initramfs-tools (Debian family): the drivers are listed in
/etc/initramfs-tools/modules (an edit, so every later `update-initramfs` on
the server keeps them), and conf.d/resume names the new swap (or none):
without it the resume hook asks the chroot which swap is active, which is
the conversion host's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.lib.distro import family_of_system
from tasks.lib.fixes.model import VIRTIO_MODULES, Changes, TreeReader, describe
from tasks.lib.fixes.text import set_shell_var, with_newline
from tasks.lib.planning.model import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.source.kernels import version_key
from tasks.lib.source.model import Kernel, SystemDescription

STEP = "initrd-config"
INITRAMFS_MODULES = "/etc/initramfs-tools/modules"
INITRAMFS_RESUME = "/etc/initramfs-tools/conf.d/resume"


def _has_virtio(kernel: Kernel) -> bool:
    return kernel.virtio.disk_ready


def choose_kernel(layout: Mapping[str, Any]) -> str:
    """The newest kernel that is neither debug nor rescue and has virtio disk support."""
    kernels = describe(layout).kernels
    usable = [k for k in kernels if not k.debug and not k.rescue and _has_virtio(k)]
    if not usable:
        found = ", ".join(f"{k.version} (virtio_blk {k.virtio.virtio_blk}, virtio_pci {k.virtio.virtio_pci})"
                          for k in kernels) or "none"
        raise P2VError(f"no installed kernel can boot on virtio; kernels: {found}",
                       hint="install the distribution's current kernel package on the server (it has "
                            "CONFIG_VIRTIO_BLK and CONFIG_VIRTIO_PCI), then rerun inspect:<host>")
    return max(usable, key=lambda k: version_key(k.version)).version


def _kernel(system: SystemDescription, version: str) -> Kernel:
    for kernel in system.kernels:
        if kernel.version == version:
            return kernel
    raise P2VError(f"kernel {version} is not among the server's kernels")


def initrd_path(system: SystemDescription, version: str) -> str:
    """Where this distribution's bootloader configuration expects the kernel's initrd."""
    return family_of_system(system).initrd_path(_kernel(system, version))


def initrd_commands(layout: Mapping[str, Any], kernel: str) -> list[list[str]]:
    """The command lines that rebuild `kernel`'s initrd in the chroot."""
    system = describe(layout)
    return family_of_system(system).initrd_commands(system, _kernel(system, kernel), VIRTIO_MODULES)


def initrd_check_command(layout: Mapping[str, Any], kernel: str) -> list[str]:
    """The command that lists the rebuilt initrd's files (see `expected_initrd_drivers`)."""
    system = describe(layout)
    lister = family_of_system(system).initrd_lister(system)
    return [lister, initrd_path(system, kernel)]


def expected_initrd_drivers(layout: Mapping[str, Any], kernel: str) -> list[str]:
    """The virtio drivers the initrd listing must show: those built as modules.

    A driver built into the kernel (RHEL 9's virtio_blk) has no module file to
    list, and needs none.
    """
    virtio = _kernel(describe(layout), kernel).virtio
    return [name for name in VIRTIO_MODULES if getattr(virtio, name) != "builtin"]


def _module_names(text: str) -> set[str]:
    return {line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}


def fix_initrd_config(tree: TreeReader, system: SystemDescription, plan: DiskPlan) -> Changes:
    changes = Changes(tree, STEP)
    if system.initrd.tool != "initramfs-tools":
        if system.initrd.tool == "dracut" and system.initrd.dracut_hostonly:
            changes.note('dracut.conf says hostonly="yes"; the rebuild passes --no-hostonly, which wins')
        return changes
    text = tree.read(INITRAMFS_MODULES) or ""
    missing = [m for m in VIRTIO_MODULES if m not in _module_names(text)]
    if missing:
        lines = text.splitlines()
        lines += ["# p2v: the virtio drivers OpenStack KVM needs", *missing]
        changes.write(INITRAMFS_MODULES, with_newline(lines), "virtio drivers in every initramfs", 0o644)
    swap = next((p.swap for p in plan.partitions if p.swap is not None), None)
    resume = f"UUID={swap.uuid}" if swap is not None and swap.uuid else "none"
    current = tree.read(INITRAMFS_RESUME)
    changes.write(INITRAMFS_RESUME, set_shell_var(current or "", "RESUME", resume),
                  f"RESUME={resume}: the new swap, not the conversion host's", 0o644)
    return changes
