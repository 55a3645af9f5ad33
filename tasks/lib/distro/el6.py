"""Enterprise Linux 6 (CentOS, RHEL, Scientific, Oracle 6), and an EL release whose version is unknown.

- initrd: dracut 004 (no --no-hostonly flags: it builds generic images by
  default), /boot/initramfs-<kver>.img. Its mkinitrd is a wrapper p2v does
  not call.
- bootloader: grub legacy (the grub shell's `setup`), grub.conf edited.
- packages: yum, rpm.
- network: ifcfg files in /etc/sysconfig/network-scripts; SysV services
  through chkconfig.
- SELinux: /.autorelabel unless disabled.

An EL release whose major version inspect could not read is answered as
EL6, the oldest: no systemd unless the tree shows it, ifcfg for DHCP. So is
Amazon Linux 2, whose major version is 2 (its tree shows systemd).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.lib.distro.base import Family
from tasks.lib.source.model import NetStyle, OSIdentity


@dataclass(frozen=True)
class EL6(Family):
    name = "el6"
    grub_prefix = "grub2"  # EL6 has no grub 2; the name matters only for a grub 2 someone installed
    grub_pc_debconf = False
    initrd_image = "/boot/initramfs-{kernel}.img"

    @classmethod
    def matches(cls, os: OSIdentity) -> bool:
        return os.family == "rhel" and (os.major is None or os.major < 7)

    def systemd_by_release(self) -> bool:
        return False  # upstart

    def default_network_style(self) -> NetStyle:
        return "ifcfg"

    def sysv_disable(self, service: str) -> list[str]:
        return ["chkconfig", service, "off"]
