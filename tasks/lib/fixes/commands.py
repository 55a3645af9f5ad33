"""The command lines the fix stage runs in the chroot for the bootloader and services."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.lib.fixes.bootconfig import grub_legacy_partition
from tasks.lib.fixes.model import Command, describe
from tasks.lib.fixes.network import uses_systemd
from tasks.lib.plan import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.spec import FixPolicy
from tasks.lib.system import SystemDescription


def _grub2_prefix(system: SystemDescription) -> str:
    """RHEL and SUSE call grub 2's tools grub2-*, Debian and Ubuntu grub-*."""
    return "grub" if system.os.family == "debian" else "grub2"


def bootloader_install_commands(layout: Mapping[str, Any], plan: DiskPlan, disk_device: str) -> list[Command]:
    """Boot code for BIOS on `disk_device` (the image's loop device, as the chroot sees it).

    - grub2: `grub-install --target=i386-pc <dev>` (grub2-install on RHEL).
    - grub legacy: the grub shell in batch mode, fed `device (hd0) <dev>`,
      `root (hd0,N)` (the partition with /boot) and `setup (hd0)`. An empty
      device map keeps it from probing the conversion host's disks.
    - UEFI: nothing; the ESP's files were copied, and firmware with no boot
      entry of its own starts the fallback \\EFI\\BOOT\\BOOTX64.EFI.
    """
    system = describe(layout)
    if plan.firmware == "uefi":
        return []
    kind = system.bootloader.kind
    if kind == "grub2":
        return [Command((f"{_grub2_prefix(system)}-install", "--target=i386-pc", disk_device))]
    if kind == "grub-legacy":
        script = f"device (hd0) {disk_device}\nroot (hd0,{grub_legacy_partition(plan)})\nsetup (hd0)\nquit\n"
        return [Command(("grub", "--batch", "--no-floppy", "--device-map=/dev/null"), script)]
    raise P2VError(f"bootloader {kind}: p2v installs grub2 and grub legacy only",
                   hint="install grub on the server, then rerun inspect:<host>")


# grub-mkconfig's script that lists other operating systems: in the chroot it
# would find the conversion host's own disks (its /dev is bound in), so the fix
# stage hides it for that run.
OS_PROBER_SCRIPT = "/etc/grub.d/30_os-prober"
# Where Nova attaches an image's disk on virtio-blk (hw_disk_bus=virtio).
VIRTIO_BOOT_DISK = "/dev/vda"
GRUB_PC_INSTALL_DEVICES = "grub-pc/install_devices"


def debconf_install_device_command(layout: Mapping[str, Any], plan: DiskPlan) -> Command | None:
    """Debian's grub-pc reinstalls boot code on upgrades to the disks its debconf
    answer names: the physical server's disk id, which the cloud does not have.
    Point it at the virtio disk; None where grub-pc's answer does not apply."""
    system = describe(layout)
    if system.os.family != "debian" or system.bootloader.kind != "grub2" or plan.firmware == "uefi":
        return None
    return Command(("debconf-set-selections",), f"grub-pc {GRUB_PC_INSTALL_DEVICES} multiselect {VIRTIO_BOOT_DISK}\n")


def bootloader_config_commands(layout: Mapping[str, Any]) -> list[list[str]]:
    """grub2: regenerate grub.cfg from /etc/default/grub; grub legacy: [] (its file is edited)."""
    boot = describe(layout).bootloader
    if boot.kind == "grub-legacy":
        return []
    if boot.kind == "grub2" and boot.config_path:
        return [[f"{_grub2_prefix(describe(layout))}-mkconfig", "-o", boot.config_path]]
    raise P2VError(f"bootloader {boot.kind}: p2v configures grub2 and grub legacy only")


def service_commands(layout: Mapping[str, Any], policy: FixPolicy, *,
                     has_systemd: bool | None = None) -> list[tuple[list[str], str]]:
    """(command line, what it does) that disable the services the spec lists (vendor RAID, iLO agents ...).

    systemd: `systemctl disable` (works offline in a chroot); EL6 and other
    SysV systems: `chkconfig <name> off`, or `update-rc.d <name> disable` on
    Debian. `has_systemd` overrides the guess from the OS version.
    """
    system = describe(layout)
    if has_systemd is None:
        has_systemd = uses_systemd(_NoTree(), system)
    commands: list[tuple[list[str], str]] = []
    for name in policy.remove_services:
        if has_systemd:
            argv = ["systemctl", "disable", name]
        elif system.os.family == "debian":
            argv = ["update-rc.d", name.removesuffix(".service"), "disable"]
        else:
            argv = ["chkconfig", name.removesuffix(".service"), "off"]
        commands.append((argv, f"disabled the hardware-specific service {name}"))
    return commands


class _NoTree:
    """A tree that has nothing: `uses_systemd` then decides by the OS version."""

    def read(self, path: str) -> str | None:
        return None

    def exists(self, path: str) -> bool:
        return False

    def listdir(self, path: str) -> list[str]:
        return []
