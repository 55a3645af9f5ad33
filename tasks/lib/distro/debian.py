"""Debian (and derivatives other than Ubuntu: Devuan, Raspbian, Mint, Kali, ...).

- initrd: initramfs-tools (`update-initramfs`), /boot/initrd.img-<kver>;
  dracut where the server has it instead.
- bootloader: grub-pc (`grub-install`, `grub-mkconfig`), grub-efi's modules
  for UEFI; grub-pc's debconf answer names the virtio disk.
- packages: apt-get, dpkg-query.
- network: ifupdown (/etc/network/interfaces) unless the source uses another
  style; SysV services through update-rc.d.
- SELinux: /.autorelabel when it is on (selinux-basics).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.lib.distro.base import Family
from tasks.lib.source.model import NetStyle, OSIdentity

SYSTEMD_SINCE = 8  # jessie


@dataclass(frozen=True)
class Debian(Family):
    name = "debian"
    grub_prefix = "grub"
    grub_pc_debconf = True
    initrd_image = "/boot/initrd.img-{kernel}"

    @classmethod
    def matches(cls, os: OSIdentity) -> bool:
        return os.family == "debian"

    def systemd_by_release(self) -> bool:
        # Debian's version numbers say nothing about a derivative's (Mint 21,
        # Devuan 4 has no systemd at all): for those only the tree tells.
        return self.os.id == "debian" and (self.os.major or 0) >= SYSTEMD_SINCE

    def default_network_style(self) -> NetStyle:
        return "ifupdown"

    def sysv_disable(self, service: str) -> list[str]:
        return ["update-rc.d", service, "disable"]
