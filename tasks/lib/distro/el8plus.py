"""Enterprise Linux 8 and later (RHEL, CentOS Stream, Rocky, Alma, Oracle), and
the rest of the RHEL family by its own major version (Fedora, Amazon Linux 2023).

- initrd: dracut (--no-hostonly), /boot/initramfs-<kver>.img.
- bootloader: grub 2 with BLS entries (`grub2-install`, `grub2-mkconfig`),
  grub2-efi-x64's modules for UEFI.
- packages: dnf (or yum, as found), rpm.
- network: EL8 ifcfg; from EL9 on NetworkManager keyfiles (ifcfg is
  deprecated there); systemd.
- SELinux: /.autorelabel unless disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.lib.distro.base import Family
from tasks.lib.source.model import NetStyle, OSIdentity

KEYFILES_SINCE = 9


@dataclass(frozen=True)
class EL8Plus(Family):
    name = "el8+"
    grub_prefix = "grub2"
    grub_pc_debconf = False
    initrd_image = "/boot/initramfs-{kernel}.img"

    @classmethod
    def matches(cls, os: OSIdentity) -> bool:
        return os.family == "rhel" and os.major is not None and os.major >= 8

    def systemd_by_release(self) -> bool:
        return True

    def default_network_style(self) -> NetStyle:
        return "NetworkManager" if (self.os.major or 0) >= KEYFILES_SINCE else "ifcfg"

    def sysv_disable(self, service: str) -> list[str]:
        return ["chkconfig", service, "off"]
