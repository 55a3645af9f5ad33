"""A distribution p2v has no family for (openSUSE, Arch, an unreadable os-release).

p2v does not refuse one: it converts it with the answers it gave before
distro families existed, which are these. Where one is wrong for the
distribution (SUSE keeps its ifcfg files in /etc/sysconfig/network and names
its initrd /boot/initrd-<kver>), that distribution wants a family of its own:
one module here and its line in `tasks.lib.distro.FAMILIES`.

- initrd: the tool inspect found (dracut or initramfs-tools),
  /boot/initrd.img-<kver> when the kernel has none yet.
- bootloader: grub 2 as `grub2-install`, `grub2-mkconfig`; no debconf.
- packages: apt, or yum/dnf, as found; anything else is refused by the
  packages step.
- network: ifupdown for DHCP when the source uses no style p2v writes; no
  systemd unless the tree shows it; SysV services through chkconfig.
- SELinux: /.autorelabel unless disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.lib.distro.base import Family
from tasks.lib.source.model import NetStyle, OSIdentity


@dataclass(frozen=True)
class Other(Family):
    name = "other"
    grub_prefix = "grub2"
    grub_pc_debconf = False
    initrd_image = "/boot/initrd.img-{kernel}"

    @classmethod
    def matches(cls, os: OSIdentity) -> bool:
        return True

    def systemd_by_release(self) -> bool:
        return False

    def default_network_style(self) -> NetStyle:
        return "ifupdown"

    def sysv_disable(self, service: str) -> list[str]:
        return ["chkconfig", service, "off"]
