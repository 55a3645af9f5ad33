"""The description of a source OS: frozen dataclasses, as layout.json's `system` holds them.

The types every describer and format parser shares. `tasks.lib.source.codec`
turns them into plain JSON and back (`from_json` resolves the annotations in
this module, so every type a field names must live here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tasks.lib.source.codec import to_json

Family = Literal["rhel", "debian", "unknown"]


VirtioState = Literal["module", "builtin", "missing", "unknown"]


InitrdToolName = Literal["dracut", "initramfs-tools", "mkinitrd"]


BootloaderKind = Literal["grub2", "grub-legacy", "extlinux", "unknown"]


Firmware = Literal["bios", "uefi"]


NetStyle = Literal["ifcfg", "ifupdown", "NetworkManager", "netplan", "systemd-networkd"]


InterfaceKind = Literal["ethernet", "bond", "vlan", "bridge", "team", "other"]


IPMethod = Literal["static", "dhcp", "none"]


BindingKind = Literal[
    "HWADDR",  # ifcfg: matches the NIC by MAC
    "MACADDR",  # ifcfg: sets (spoofs) the MAC
    "udev-rule",  # udev rules: ATTR{address}=="..." NAME="..."
    "nm-mac-address",  # NetworkManager: [ethernet] mac-address (match); [bridge] mac-address (set)
    "nm-cloned-mac-address",  # NetworkManager: sets the MAC
    "netplan-match",  # netplan: match: {macaddress: ...}
    "netplan-macaddress",  # netplan: macaddress: ... (sets)
    "networkd-match",  # .network [Match] MACAddress=
    "networkd-link-match",  # .link [Match] MACAddress=
    "networkd-macaddress",  # .network/.netdev/.link MACAddress= outside [Match] (sets)
    "hwaddress",  # ifupdown: hwaddress [ether] ... (sets)
]


BindingAction = Literal["match", "set"]


SELinuxMode = Literal["enforcing", "permissive", "disabled"]


MachineIdState = Literal["present", "empty", "uninitialized", "missing"]


PackageManager = Literal["apt", "dnf", "yum", "zypper"]


VIRTIO_DRIVERS: Mapping[str, tuple[str, str]] = {
    # module name: (kernel config symbol, directory under kernel/)
    "virtio_blk": ("CONFIG_VIRTIO_BLK", "drivers/block"),
    "virtio_scsi": ("CONFIG_SCSI_VIRTIO", "drivers/scsi"),
    "virtio_net": ("CONFIG_VIRTIO_NET", "drivers/net"),
    "virtio_pci": ("CONFIG_VIRTIO_PCI", "drivers/virtio"),
}


MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class OSIdentity:
    family: Family
    id: str  # os-release ID: centos, rhel, rocky, debian, ubuntu, ...
    version: str | None  # major.minor where known ("7.9", "22.04", "12.5")
    major: int | None
    minor: int | None
    pretty_name: str | None
    codename: str | None
    id_like: tuple[str, ...]
    sources: tuple[str, ...]  # the files this was read from


@dataclass(frozen=True)
class VirtioSupport:
    virtio_blk: VirtioState
    virtio_scsi: VirtioState
    virtio_net: VirtioState
    virtio_pci: VirtioState

    @property
    def disk_ready(self) -> bool:
        """virtio_blk and virtio_pci are available (built in or as modules)."""
        ok = ("module", "builtin")
        return self.virtio_blk in ok and self.virtio_pci in ok


@dataclass(frozen=True)
class Kernel:
    version: str  # the kver: 3.10.0-1160.el7.x86_64
    vmlinuz: str  # /boot/vmlinuz-<kver>
    initrd: str | None
    config: str | None  # /boot/config-<kver> (or the copy in the modules dir)
    modules_dir: str | None  # resolved in the tree: /usr/lib/modules/<kver> on merged-usr systems
    debug: bool
    rescue: bool  # RHEL's 0-rescue-<machine-id> kernel
    virtio: VirtioSupport


@dataclass(frozen=True)
class InitrdTooling:
    tool: InitrdToolName | None  # the one to use
    tools: tuple[InitrdToolName, ...]  # every one present (CentOS 6: dracut and mkinitrd)
    paths: tuple[str, ...]  # what showed them
    version: str | None  # dracut's version, from dracut-version.sh
    dracut_hostonly: bool | None  # hostonly= from dracut.conf(.d); None when not set
    initramfs_modules: str | None  # MODULES= from initramfs-tools' initramfs.conf


@dataclass(frozen=True)
class BootEntry:
    title: str  # submenu entries are "Submenu>Entry"
    id: str | None  # grub2 $menuentry_id_option, or the BLS entry's file stem
    kernel: str | None  # as written in the config (relative to the /boot filesystem when separate)
    kernel_version: str | None
    initrd: str | None
    args: tuple[str, ...]  # as written ($kernelopts and friends are not expanded; see expand_grub_vars)
    grub_root: str | None  # legacy "root (hd0,0)" / grub2 "set root='hd0,msdos1'"
    source: str  # the file the entry is in


@dataclass(frozen=True)
class Link:
    path: str
    target: str  # resolved inside the tree


@dataclass(frozen=True)
class Bootloader:
    kind: BootloaderKind
    firmware: Firmware
    config_path: str | None  # the configuration grub reads
    configs: tuple[str, ...]  # every config file found (EFI stubs included)
    efi_binaries: tuple[str, ...]
    esp_mountpoint: str | None  # where fstab mounts the EFI system partition
    bls: bool  # grub2 with /boot/loader/entries (GRUB_ENABLE_BLSCFG)
    entries: tuple[BootEntry, ...]  # in menu order
    default: str | None  # the default as written (index, title, id, "saved", ...)
    default_index: int | None  # into entries, when it could be resolved
    defaults_file: str | None  # /etc/default/grub
    defaults: dict[str, str]  # its GRUB_* values
    cmdline_linux: tuple[str, ...]  # GRUB_CMDLINE_LINUX
    cmdline_linux_default: tuple[str, ...]  # GRUB_CMDLINE_LINUX_DEFAULT
    kernel_cmdline: tuple[str, ...] | None  # /etc/kernel/cmdline (BLS systems)
    grubenv_file: str | None
    grubenv: dict[str, str]
    links: tuple[Link, ...]  # /etc/grub.conf, /etc/sysconfig/grub, ... that point at the real files

    @property
    def default_kernel(self) -> str | None:
        if self.default_index is None:
            return None
        return self.entries[self.default_index].kernel_version


@dataclass(frozen=True)
class Route:
    destination: str  # CIDR; the default route is 0.0.0.0/0 (or ::/0)
    gateway: str | None
    metric: int | None


@dataclass(frozen=True)
class Interface:
    name: str  # the device name (NetworkManager profile id when the profile names no device)
    style: NetStyle
    file: str
    kind: InterfaceKind
    method: IPMethod  # IPv4
    addresses: tuple[str, ...]  # CIDR, IPv4 and IPv6, in file order
    gateway: str | None
    routes: tuple[Route, ...]
    dns: tuple[str, ...]
    onboot: bool | None
    master: str | None  # the bond, bridge or team this one belongs to
    members: tuple[str, ...]  # bond slaves or bridge ports
    bond_mode: str | None
    bond_options: tuple[str, ...]  # key=value
    vlan_id: int | None
    vlan_parent: str | None
    profile: str | None  # NetworkManager connection id, ifcfg NAME=, netplan id


@dataclass(frozen=True)
class MacBinding:
    file: str
    mac: str  # lower case, colon separated
    interface: str | None
    kind: BindingKind
    action: BindingAction  # "match": picks the NIC by MAC; "set": forces the NIC's MAC


@dataclass(frozen=True)
class NetworkConfig:
    styles: tuple[NetStyle, ...]
    interfaces: tuple[Interface, ...]
    mac_bindings: tuple[MacBinding, ...]
    gateway: str | None  # GATEWAY= in /etc/sysconfig/network
    files: tuple[str, ...]  # every configuration file read


@dataclass(frozen=True)
class CloudInit:
    installed: bool
    network_disabled: bool  # network: {config: disabled} in cloud.cfg(.d)
    datasources: tuple[str, ...] | None  # datasource_list, when set


@dataclass(frozen=True)
class SystemDescription:
    os: OSIdentity
    hostname: str | None
    kernels: tuple[Kernel, ...]  # newest first
    initrd: InitrdTooling
    bootloader: Bootloader
    network: NetworkConfig
    selinux: SELinuxMode
    selinux_type: str | None
    package_manager: PackageManager | None
    cloud_init: CloudInit
    qemu_guest_agent: bool
    machine_id: MachineIdState
    merged_usr: bool
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        data = to_json(self)
        assert isinstance(data, dict)
        return data


def kver_from_kernel_path(path: str | None) -> str | None:
    if not path:
        return None
    base = path.rsplit("/", 1)[-1]
    for prefix in ("vmlinuz-", "vmlinux-", "kernel-"):
        if base.startswith(prefix) and len(base) > len(prefix):
            return base[len(prefix) :]
    return None
