"""Enterprise Linux 7 (CentOS, RHEL, Oracle, Scientific 7).

- initrd: dracut (--no-hostonly), /boot/initramfs-<kver>.img.
- bootloader: grub 2 (`grub2-install`, `grub2-mkconfig`), grub2-efi-x64's
  modules for UEFI.
- packages: yum, rpm.
- network: ifcfg files in /etc/sysconfig/network-scripts; systemd.
- SELinux: /.autorelabel unless disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.lib.distro.base import Family
from tasks.lib.source.model import NetStyle, OSIdentity


@dataclass(frozen=True)
class EL7(Family):
    name = "el7"
    grub_prefix = "grub2"
    grub_pc_debconf = False
    initrd_image = "/boot/initramfs-{kernel}.img"

    @classmethod
    def matches(cls, os: OSIdentity) -> bool:
        return os.family == "rhel" and os.major == 7

    def systemd_by_release(self) -> bool:
        return True

    def default_network_style(self) -> NetStyle:
        return "ifcfg"

    def sysv_disable(self, service: str) -> list[str]:
        return ["chkconfig", service, "off"]
