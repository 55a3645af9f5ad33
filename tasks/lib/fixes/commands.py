"""The command lines the fix stage runs in the chroot for the bootloader and services."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasks.lib.fixes.bootconfig import grub_legacy_partition
from tasks.lib.fixes.model import Command, describe
from tasks.lib.fixes.network import uses_systemd
from tasks.lib.planning.model import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.source.model import SystemDescription
from tasks.lib.spec import FixPolicy


def _grub2_prefix(system: SystemDescription) -> str:
    """RHEL and SUSE call grub 2's tools grub2-*, Debian and Ubuntu grub-*."""
    return "grub" if system.os.family == "debian" else "grub2"


def bootloader_install_commands(layout: Mapping[str, Any], plan: DiskPlan, disk_device: str) -> list[Command]:
    """Boot code for BIOS on `disk_device` (the image's loop device, as the chroot sees it).

    - grub2: `grub-install --target=i386-pc <dev>` (grub2-install on RHEL).
    - grub legacy: the grub shell in batch mode, fed `device (hd0) <dev>`,
      `root (hd0,N)` (the partition with /boot) and `setup (hd0)`. An empty
      device map keeps it from probing the conversion host's disks.
    - UEFI: grub's EFI loader on the ESP, see `efi_loader`.
    """
    system = describe(layout)
    if plan.firmware == "uefi":
        loader = efi_loader(system, plan)
        return list(loader.commands) if loader else []
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
    raise P2VError(f"bootloader {boot.kind}: p2v configures grub2 and grub legacy only",
                   hint="install grub on the server, then rerun inspect:<host>")


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


# ---------------------------------------------------------------- UEFI

EFI_MODULES = "/usr/lib/grub/x86_64-efi"  # grub-efi-amd64-bin (Debian), grub2-efi-x64-modules (RHEL)
EFI_LOAD_CFG = "/run/p2v-grub-efi-load.cfg"  # the chroot's /run is a tmpfs of the fix stage's
_FS_MODULES = {"ext2": "ext2", "ext3": "ext2", "ext4": "ext2", "xfs": "xfs", "btrfs": "btrfs", "vfat": "fat"}


@dataclass(frozen=True)
class EfiLoader:
    """What the bootloader-install step does on a UEFI target, and the words for the receipt."""

    commands: tuple[Command, ...]
    written: tuple[str, ...]  # paths in the target tree (the ESP's view) that get the core image
    load_cfg: str
    why: str


def efi_loader(system: SystemDescription, plan: DiskPlan) -> EfiLoader | None:
    """grub's x86_64-efi core image, built in the target's chroot with its own grub, onto the ESP.

    `grub-install --target=x86_64-efi` refuses an --efi-directory that is not
    a mounted FAT filesystem, and this kernel mounts no vfat; so the steps
    grub-install takes are taken one by one: the modules go to <grub dir>/
    x86_64-efi, and `grub-mkimage -O x86_64-efi` makes a core image whose
    embedded config finds the filesystem holding /boot by its new UUID and
    sets the prefix there (grub.cfg is then update-grub's, from the
    bootloader-config step). The ESP is the fix stage's working copy
    (tasks/lib/esp.py), written back by mtools.

    The image goes to EFI/<vendor>/grubx64.efi (the source's, which names the
    old UUID) and to the fallback EFI/BOOT/BOOTX64.EFI, which firmware
    without a boot entry starts: NVRAM entries do not travel to the cloud.
    A signed chain (shim) is left as it is, its stub grub.cfg being rewritten
    by bootloader-config; only a missing fallback is then written (the
    image boots without secure boot). None: the ESP needs nothing.
    """
    esp = next((fs for fs in plan.filesystems if fs.esp), None)
    if esp is None:
        raise P2VError("the source boots by UEFI but the plan has no EFI system partition",
                       hint="inspect found no vfat /boot/efi; check the server's fstab")
    boot = system.bootloader
    if boot.kind != "grub2":
        raise P2VError(f"UEFI with bootloader {boot.kind}: p2v installs grub2's EFI loader only")
    top = f"{esp.mountpoint}/EFI/"
    binaries = [p for p in boot.efi_binaries if p.startswith(top)]
    # FAT names are case-insensitive, the working copy's are not: reuse the ESP's own spelling.
    directories_found = sorted({p[len(top):].split("/")[0] for p in binaries})
    boot_dir = next((d for d in directories_found if d.upper() == "BOOT"), "BOOT")
    vendor_dirs = [d for d in directories_found if d.upper() != "BOOT"]
    fallback = next((p for p in binaries if p.upper() == f"{top}{boot_dir}/BOOTX64.EFI".upper()),
                    f"{top}{boot_dir}/BOOTX64.EFI")
    shim = any(re.match(r"shim", p.rsplit("/", 1)[1], re.IGNORECASE) for p in binaries
               if not p.startswith(f"{top}{boot_dir}/"))
    vendor = vendor_dirs[0] if vendor_dirs else (system.os.id or "linux")
    written: list[str] = []
    if not shim:
        written.append(f"{top}{vendor}/grubx64.efi")
    if not (shim and fallback in binaries):
        written.append(fallback)
    if not written:
        return None
    tool = _grub2_prefix(system)
    grub_dir = "/boot/grub2" if tool == "grub2" else "/boot/grub"
    holder = "/boot" if any(fs.mountpoint == "/boot" for fs in plan.filesystems) else "/"
    holder_fs = plan.filesystem(holder)
    prefix = grub_dir.removeprefix("/boot") if holder == "/boot" else grub_dir
    load_cfg = f"search.fs_uuid {holder_fs.uuid} root\nset prefix=($root)'{prefix}'\n"
    directories = sorted({grub_dir + "/x86_64-efi", *(path.rsplit("/", 1)[0] for path in written)})
    commands = [
        Command(("mkdir", "-p", *directories)),
        Command(("cp", "-a", f"{EFI_MODULES}/.", f"{grub_dir}/x86_64-efi/")),
        Command(("tee", EFI_LOAD_CFG), load_cfg),
        Command((f"{tool}-mkimage", "-O", "x86_64-efi", "-o", written[0], "-c", EFI_LOAD_CFG, "-p", prefix,
                 "part_gpt", "part_msdos", _FS_MODULES.get(holder_fs.fstype, "ext2"), "search_fs_uuid")),
        *(Command(("cp", written[0], path)) for path in written[1:]),
    ]
    what = " and ".join(path.removeprefix(esp.mountpoint + "/") for path in written)
    why = (f"grub's x86_64-efi core image ({tool}-mkimage; it finds {holder} by UUID {holder_fs.uuid}, prefix "
           f"{prefix}) written to {what} on the ESP" + ("; the signed shim chain is left as it was" if shim else ""))
    return EfiLoader(commands=tuple(commands), written=tuple(written), load_cfg=load_cfg, why=why)
