"""Ubuntu.

- initrd: initramfs-tools (`update-initramfs`), /boot/initrd.img-<kver>.
- bootloader: grub-pc (`grub-install`, `grub-mkconfig`), grub-efi's modules
  for UEFI; grub-pc's debconf answer names the virtio disk.
- packages: apt-get, dpkg-query.
- network: netplan where the source has it (every release since 17.10),
  else ifupdown; SysV services (before 16.04) through update-rc.d.
- SELinux: off by default (AppArmor); /.autorelabel when it is on.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.lib.distro.base import Family
from tasks.lib.source.model import NetStyle, OSIdentity

SYSTEMD_SINCE = 16  # 16.04 xenial; 14.04 ran upstart


@dataclass(frozen=True)
class Ubuntu(Family):
    name = "ubuntu"
    grub_prefix = "grub"
    grub_pc_debconf = True
    initrd_image = "/boot/initrd.img-{kernel}"

    @classmethod
    def matches(cls, os: OSIdentity) -> bool:
        return os.family == "debian" and os.id == "ubuntu"

    def systemd_by_release(self) -> bool:
        return (self.os.major or 0) >= SYSTEMD_SINCE

    def default_network_style(self) -> NetStyle:
        return "ifupdown"

    def sysv_disable(self, service: str) -> list[str]:
        return ["update-rc.d", service, "disable"]
