"""What every distro family answers, and the answers they share.

A family is a frozen dataclass around the source's `OSIdentity`: the
release decides some answers (EL9 writes NetworkManager keyfiles, EL8
ifcfg). Constant answers are class attributes, answers that depend on the
release are methods. The fix planners (tasks/lib/fixes, tasks/lib/packages)
and the fix stage ask a family, never a distribution's name.

Some answers are the tools inspect found on the server rather than the
family's: the initrd tool (a Debian may run dracut) and the package manager
(`SystemDescription.initrd.tool`, `.package_manager`). Those are shared
here, keyed by the tool, and a family may override them.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from tasks.lib.packages import PackageTooling, tooling_for
from tasks.lib.runner import P2VError
from tasks.lib.source.model import Kernel, NetStyle, OSIdentity, SystemDescription

# The file that makes an SELinux system relabel every file at its next boot
# (Fedora's selinux-autorelabel, Debian's selinux-basics).
AUTORELABEL = "/.autorelabel"
# Where each network style keeps its files (the ones p2v writes and replaces).
SCRIPTS = "/etc/sysconfig/network-scripts"
NM_CONNECTIONS = "/etc/NetworkManager/system-connections"
LINK_DIR = "/etc/systemd/network"


@dataclass(frozen=True)
class Family(ABC):
    """A distro family: how it builds an initrd, installs grub, installs packages,
    names its network files and relabels for SELinux."""

    os: OSIdentity

    name: ClassVar[str]  # "debian", "ubuntu", "el6", "el7", "el8+", ...
    # grub 2's tools are grub-install, grub-mkconfig, grub-mkimage on Debian and
    # Ubuntu, grub2-* on RHEL (and SUSE); the prefix also names /boot/grub(2).
    grub_prefix: ClassVar[str]
    # Whether grub-pc keeps the disks its upgrades install boot code to in
    # debconf (grub-pc/install_devices), which then must name the virtio disk.
    grub_pc_debconf: ClassVar[bool]
    # Where the bootloader configuration expects a kernel's initrd, when the
    # kernel has none yet ({kernel}: its version).
    initrd_image: ClassVar[str]

    @classmethod
    @abstractmethod
    def matches(cls, os: OSIdentity) -> bool:
        """Whether this family is the source's (the registry asks in order; the first one wins)."""

    @abstractmethod
    def systemd_by_release(self) -> bool:
        """Whether the release boots with systemd, for when the tree does not show it."""

    @abstractmethod
    def default_network_style(self) -> NetStyle:
        """The style of DHCP on eth0 (policy dhcp) when the source uses none that p2v writes."""

    @abstractmethod
    def sysv_disable(self, service: str) -> list[str]:
        """The command line that disables a SysV service (no systemd)."""

    # ------------------------------------------------------------ bootloader

    def grub_tool(self, tool: str) -> str:
        """'install' -> grub-install or grub2-install."""
        return f"{self.grub_prefix}-{tool}"

    @property
    def grub_dir(self) -> str:
        return f"/boot/{self.grub_prefix}"

    def efi_vendor(self) -> str:
        """EFI/<vendor> for grub's loader when the ESP has no vendor directory yet: the os-release ID
        (debian, ubuntu, centos), as before families. RHEL's own packages use "redhat"; a family may say so."""
        return self.os.id or "linux"

    # ------------------------------------------------------------ network files

    def dhcp_file(self, style: NetStyle | str, host: str) -> tuple[str, str, int]:
        """(path, text, mode) of DHCP on eth0 in `style` (network policy dhcp)."""
        return dhcp_file(style, host)

    def interface_files(self, files: Iterable[str]) -> list[str]:
        """Of the source's network files, those that configure interfaces (policy dhcp replaces them)."""
        return interface_files(files)

    # ------------------------------------------------------------ services

    def disable_service(self, service: str, systemd: bool) -> list[str]:
        if systemd:
            return ["systemctl", "disable", service]
        return self.sysv_disable(service.removesuffix(".service"))

    # ------------------------------------------------------------ initrd

    def initrd_path(self, kernel: Kernel) -> str:
        return kernel.initrd or self.initrd_image.format(kernel=kernel.version)

    def initrd_commands(self, system: SystemDescription, kernel: Kernel, modules: Sequence[str]) -> list[list[str]]:
        """The command lines that rebuild `kernel`'s initrd with `modules`, with the tool inspect found.

        dracut: `--no-hostonly --no-hostonly-cmdline` from dracut 033 on (see
        tasks/lib/fixes/initrd.py for why); dracut 004 (EL6) knows neither flag
        and builds generic images by default. initramfs-tools: the modules are
        in /etc/initramfs-tools/modules (the initrd-config step), and
        update-initramfs rebuilds.
        """
        tool = system.initrd.tool
        path = self.initrd_path(kernel)
        if tool == "dracut":
            flags = ["--no-hostonly", "--no-hostonly-cmdline"] if _dracut_at_least(system, 33) else []
            return [["dracut", "-f", *flags, "--add-drivers", " ".join(modules), path, kernel.version]]
        if tool == "initramfs-tools":
            # -u refuses to make an initrd that does not exist yet; -c refuses to replace one.
            return [["update-initramfs", "-u" if kernel.initrd else "-c", "-k", kernel.version]]
        raise P2VError(f"initrd tool {tool or 'none found'}: p2v rebuilds initrds with dracut or initramfs-tools",
                       hint="install dracut or initramfs-tools on the server, then rerun inspect:<host>")

    def initrd_lister(self, system: SystemDescription) -> str:
        """The command that lists an initrd's files, for the tool that made it."""
        return "lsinitrd" if system.initrd.tool == "dracut" else "lsinitramfs"

    # ------------------------------------------------------------ packages

    def packaging(self, system: SystemDescription) -> PackageTooling:
        """The package manager inspect found: apt (dpkg), or yum/dnf (rpm)."""
        return tooling_for(system.package_manager)

    # ------------------------------------------------------------ SELinux

    def relabel_marker(self, system: SystemDescription) -> str | None:
        """The file that asks for a full relabel at first boot; None where SELinux is off."""
        return None if system.selinux == "disabled" else AUTORELABEL


def _dracut_at_least(system: SystemDescription, major: int) -> bool:
    found = re.match(r"(\d+)", system.initrd.version or "")
    # An unknown version is taken as a modern one: every dracut since 2013 has the flags.
    return found is None or int(found.group(1)) >= major


def dhcp_file(style: str, host: str) -> tuple[str, str, int]:
    """(path, text, mode) of DHCP on eth0 in `style`, where every family so far keeps that style's files."""
    if style == "netplan":
        return ("/etc/netplan/01-p2v-dhcp.yaml",
                "# Written by p2v: DHCP on eth0\nnetwork:\n  version: 2\n  ethernets:\n    eth0:\n"
                "      dhcp4: true\n", 0o600)
    if style == "NetworkManager":
        ident = uuid.uuid5(uuid.NAMESPACE_DNS, f"{host}.p2v.eth0")
        return (f"{NM_CONNECTIONS}/eth0.nmconnection",
                f"[connection]\nid=eth0\nuuid={ident}\ntype=ethernet\ninterface-name=eth0\nautoconnect=true\n\n"
                "[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n", 0o600)
    if style == "ifcfg":
        return (f"{SCRIPTS}/ifcfg-eth0",
                "# Written by p2v: DHCP on eth0\nDEVICE=eth0\nTYPE=Ethernet\nBOOTPROTO=dhcp\nONBOOT=yes\n", 0o644)
    if style == "systemd-networkd":
        return (f"{LINK_DIR}/10-p2v-eth0.network",
                "# Written by p2v: DHCP on eth0\n[Match]\nName=eth0\n\n[Network]\nDHCP=yes\n", 0o644)
    return ("/etc/network/interfaces",
            "# Written by p2v: DHCP on eth0\nsource /etc/network/interfaces.d/*\n\nauto lo\n"
            "iface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n", 0o644)


def interface_files(files: Iterable[str]) -> list[str]:
    """The source's interface configuration files (not the loopback's, not global settings)."""
    out = []
    for path in files:
        name = path.rsplit("/", 1)[-1]
        if path.startswith(f"{SCRIPTS}/") and name != "ifcfg-lo" and name.startswith(("ifcfg-", "route-", "route6-")):
            out.append(path)
        elif path.startswith(f"{NM_CONNECTIONS}/") or (path.startswith("/etc/netplan/") and name.endswith(".yaml")):
            out.append(path)
        elif path.startswith(f"{LINK_DIR}/") and name.endswith((".network", ".netdev")):
            out.append(path)
        elif path == "/etc/network/interfaces" or path.startswith("/etc/network/interfaces.d/"):
            out.append(path)
    return out
