"""Describe the operating system of a mounted source tree, without changing it.

The inspect stage mounts the source server's filesystems read-only as one tree
and calls `describe_system(root)`. The result says what later stages need to
plan: which distribution, which kernels (and whether they have virtio), which
initrd tool and bootloader, the kernel command lines, the network
configuration with every place a MAC address is bound, hostname and SELinux.

Rules this module keeps:

- It only reads. No subprocess, no write, no chroot.
- Every path is resolved inside `root`: an absolute symlink such as
  `/etc/grub.conf -> /boot/grub/grub.conf` is followed *within the tree*, and
  `..` never climbs above `root` (`SourceTree`, on top of
  `tasks.lib.paths.resolve_in_root`). The host's own files are never read
  through a link, and FIFOs or huge files are skipped, not read.
- fstab belongs to inspect (`tasks.lib.fstab`); here it only says whether an
  EFI system partition is mounted.
- A malformed or unreadable file is a warning in the description, not a
  crash.
- Each format has its own small parser that works on text, so that it can be
  tested on a snippet.
- Output is deterministic: lists of unordered things (kernels, interfaces,
  MAC bindings, files) are sorted; ordered things (kernel arguments, boot menu
  entries, addresses) keep the order of the file. `to_json` sorts keys.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import shlex
import stat
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tasks.lib.fstab import parse_fstab
from tasks.lib.paths import resolve_in_root
from tasks.lib.runner import P2VError

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

# Largest file we read. grub.cfg, modules.dep and friends are far smaller; a
# bigger one is not a configuration file.
MAX_READ = 16 * 1024 * 1024


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Reading the tree without leaving it
# ---------------------------------------------------------------------------


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


class SourceTree:
    """A read-only view of a tree where every symlink is resolved inside `root`.

    Paths are absolute *tree* paths ("/etc/fstab"). An absolute link target is
    taken relative to `root`, and `..` stops at `root`, as if the tree were
    chrooted. Problems (loops, permissions, huge files) become `warnings`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        """The tree path with every symlink followed inside the tree, or None if missing.

        The walk itself is `tasks.lib.paths.resolve_in_root`, the one place
        that decides how a path inside a server tree is followed.
        """
        try:
            host = resolve_in_root(self.root, path, follow_last=follow_last)
            os.lstat(host)
        except P2VError:
            self.warn(f"{path}: too many levels of symbolic links (ignored)")
            return None
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self.warn(f"{path}: cannot look up ({exc.strerror})")
            return None
        relative = host.relative_to(os.path.abspath(self.root)).as_posix()
        return "/" if relative == "." else "/" + relative

    def host_path(self, path: str) -> Path | None:
        """Where `path` (resolved inside the tree) is on the host, or None if missing."""
        resolved = self.resolve(path)
        if resolved is None:
            return None
        return self.root.joinpath(*_components(resolved))

    def _mode(self, path: str) -> int | None:
        host = self.host_path(path)
        if host is None:
            return None
        try:
            return os.lstat(host).st_mode
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return self._mode(path) is not None

    def is_file(self, path: str) -> bool:
        mode = self._mode(path)
        return mode is not None and stat.S_ISREG(mode)

    def is_dir(self, path: str) -> bool:
        mode = self._mode(path)
        return mode is not None and stat.S_ISDIR(mode)

    def is_symlink(self, path: str) -> bool:
        resolved = self.resolve(path, follow_last=False)
        if resolved is None:
            return False
        try:
            return stat.S_ISLNK(os.lstat(self.root.joinpath(*_components(resolved))).st_mode)
        except OSError:
            return False

    def read_bytes(self, path: str, *, limit: int = MAX_READ) -> bytes | None:
        """The content of a regular file, None when missing (a warning when unreadable)."""
        host = self.host_path(path)
        if host is None:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(host, flags)
        except OSError as exc:
            self.warn(f"{path}: cannot open ({exc.strerror})")
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    self.warn(f"{path}: not a regular file (ignored)")
                return None
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > limit:
                self.warn(f"{path}: larger than {limit} bytes (ignored)")
                return None
            return b"".join(chunks)
        except OSError as exc:
            self.warn(f"{path}: cannot read ({exc.strerror})")
            return None
        finally:
            os.close(fd)

    def read_text(self, path: str, *, limit: int = MAX_READ) -> str | None:
        data = self.read_bytes(path, limit=limit)
        return None if data is None else data.decode("utf-8", errors="replace")

    def listdir(self, path: str) -> list[str]:
        """Names in a directory, sorted; empty when it is missing or not a directory."""
        host = self.host_path(path)
        if host is None:
            return []
        try:
            if not stat.S_ISDIR(os.lstat(host).st_mode):
                return []
            return sorted(os.listdir(host))
        except OSError as exc:
            self.warn(f"{path}: cannot list ({exc.strerror})")
            return []

    def files(self, directory: str, pattern: str = "*") -> list[str]:
        """Regular files (links followed inside the tree) in a directory whose names match."""
        base = directory.rstrip("/")
        return [
            f"{base}/{name}"
            for name in self.listdir(directory)
            if fnmatch.fnmatchcase(name, pattern) and self.is_file(f"{base}/{name}")
        ]

    def first_file(self, paths: Iterable[str]) -> str | None:
        return next((p for p in paths if self.is_file(p)), None)


# ---------------------------------------------------------------------------
# Small text parsers
# ---------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(\+?)=(.*)$")


def parse_shell_vars(text: str) -> tuple[dict[str, str], list[str]]:
    """KEY=value lines as the shell would read them (os-release, ifcfg, /etc/default/grub).

    Returns the values (the last assignment wins, `+=` appends as in bash) and
    the problems found. Command substitutions are kept as text, never run.
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGNMENT.match(line)
        if not match:
            problems.append(f"line {number}: not a KEY=value line: {stripped[:80]!r}")
            continue
        key, append, raw = match.groups()
        try:
            words = shlex.split(raw, comments=True, posix=True)
        except ValueError as exc:
            problems.append(f"line {number}: {key}: {exc}")
            words = [raw.strip().strip("\"'")]
        value = " ".join(words)
        values[key] = values.get(key, "") + value if append else value
    return values, problems


def parse_os_release(text: str) -> dict[str, str]:
    values, _ = parse_shell_vars(text)
    return values


def version_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders 5.15.0-105 after 5.15.0-91 (numbers compare as numbers)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|\D+", text))


def major_minor(version: str | None) -> tuple[str | None, int | None, int | None]:
    """'7.9.2009' -> ('7.9', 7, 9); '22.04' -> ('22.04', 22, 4); '9' -> ('9', 9, None)."""
    if not version:
        return None, None, None
    match = re.match(r"^(\d+)(?:\.(\d+))?", version)
    if not match:
        return version, None, None
    major, minor = match.group(1), match.group(2)
    text = f"{major}.{minor}" if minor is not None else major
    return text, int(major), int(minor) if minor is not None else None


_RELEASE_NAMES: tuple[tuple[str, str], ...] = (
    (r"^CentOS", "centos"),
    (r"^Red Hat Enterprise Linux", "rhel"),
    (r"^Rocky Linux", "rocky"),
    (r"^AlmaLinux", "almalinux"),
    (r"^(Oracle Linux|Enterprise Linux Enterprise Linux)", "ol"),
    (r"^Scientific Linux", "scientific"),
    (r"^CloudLinux", "cloudlinux"),
    (r"^EuroLinux", "eurolinux"),
    (r"^Fedora", "fedora"),
)


def parse_redhat_release(text: str) -> tuple[str, str | None, str]:
    """'CentOS release 6.10 (Final)' -> ('centos', '6.10', 'CentOS release 6.10 (Final)')."""
    line = next((raw.strip() for raw in text.splitlines() if raw.strip()), "")
    distro = next((d for pattern, d in _RELEASE_NAMES if re.match(pattern, line)), "rhel")
    match = re.search(r"\brelease\s+(\d+(?:\.\d+)*)", line)
    return distro, match.group(1) if match else None, line


_RHEL_IDS = {"rhel", "centos", "fedora", "rocky", "almalinux", "ol", "scientific", "cloudlinux", "eurolinux", "amzn"}
_DEBIAN_IDS = {"debian", "ubuntu", "linuxmint", "raspbian", "devuan", "pop", "kali"}


def family_of(distro: str, id_like: Sequence[str]) -> Family:
    for name in (distro, *id_like):
        if name in _RHEL_IDS:
            return "rhel"
        if name in _DEBIAN_IDS:
            return "debian"
    return "unknown"


def parse_modules_builtin(text: str) -> set[str]:
    """modules.builtin lines ('kernel/drivers/block/virtio_blk.ko') -> module names."""
    names: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if line:
            names.add(_module_name(line))
    return names


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, str]:
    """modules.dep -> {module name: path relative to the modules directory}."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        path, sep, _ = line.partition(":")
        if sep and path.strip():
            found.setdefault(_module_name(path.strip()), path.strip())
    return found


def parse_kernel_config(text: str) -> dict[str, str]:
    """/boot/config-<kver> -> {'CONFIG_VIRTIO_BLK': 'm', ...}; '# CONFIG_X is not set' -> 'n'."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2).strip('"')
            continue
        match = re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$", line)
        if match:
            values[match.group(1)] = "n"
    return values


def virtio_state(
    module: str,
    *,
    builtin: set[str] | None,
    module_files: set[str],
    config: Mapping[str, str] | None,
) -> VirtioState:
    """Decide one driver from what the kernel's files say.

    `builtin` is modules.builtin (None when the file is missing), `module_files`
    the module names that have a .ko* file, `config` the kernel config (None
    when missing).
    """
    if builtin is not None and module in builtin:
        return "builtin"
    if module in module_files:
        return "module"
    symbol = VIRTIO_DRIVERS[module][0]
    setting = config.get(symbol) if config is not None else None
    if setting == "y" and builtin is None:
        return "builtin"  # old kernels have no modules.builtin
    if builtin is None and not module_files and config is None:
        return "unknown"
    return "missing"


def is_debug_kernel(kver: str) -> bool:
    """RHEL 6/7 '...x86_64.debug', RHEL 8+ '...x86_64+debug', kernel-debug style '-debug'."""
    return kver.endswith((".debug", "+debug")) or "-debug" in kver


def parse_selinux_config(text: str) -> tuple[SELinuxMode, str | None]:
    values, _ = parse_shell_vars(text)
    mode = values.get("SELINUX", "disabled").strip().lower()
    kind = values.get("SELINUXTYPE") or None
    if mode not in ("enforcing", "permissive", "disabled"):
        mode = "disabled"
    return typing.cast(SELinuxMode, mode), kind


def parse_hostname(text: str) -> str | None:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line
    return None


# --- grub ---------------------------------------------------------------------


def parse_grubenv(text: str) -> dict[str, str]:
    """grubenv: 'key=value' lines, '#' comments and the '#' padding block."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def expand_grub_vars(args: Sequence[str], env: Mapping[str, str]) -> tuple[str, ...]:
    """Expand $var / ${var} as grub does: from `env`, an unset variable is empty."""

    def expand(word: str) -> str:
        return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), word)

    out: list[str] = []
    for arg in args:
        out.extend(expand(arg).split())
    return tuple(out)


def _kver_from_kernel_path(path: str | None) -> str | None:
    if not path:
        return None
    base = path.rsplit("/", 1)[-1]
    for prefix in ("vmlinuz-", "vmlinux-", "kernel-"):
        if base.startswith(prefix) and len(base) > len(prefix):
            return base[len(prefix) :]
    return None


@dataclass(frozen=True)
class GrubLegacyConfig:
    default: str | None
    entries: tuple[BootEntry, ...]


def parse_grub_legacy(text: str, source: str) -> tuple[GrubLegacyConfig, list[str]]:
    """grub.conf / menu.lst: global 'default=0', then 'title' stanzas."""
    default: str | None = None
    entries: list[BootEntry] = []
    problems: list[str] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            entries.append(
                BootEntry(
                    title=current["title"],
                    id=None,
                    kernel=current.get("kernel"),
                    kernel_version=_kver_from_kernel_path(current.get("kernel")),
                    initrd=current.get("initrd"),
                    args=tuple(current.get("args", ())),
                    grub_root=current.get("root"),
                    source=source,
                )
            )

    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^([A-Za-z_]+)\s*(?:=\s*|\s+|$)(.*)$", stripped)
        if not match:
            problems.append(f"line {number}: cannot parse: {stripped[:80]!r}")
            continue
        keyword, rest = match.group(1).lower(), match.group(2).strip()
        if keyword == "title":
            close()
            current = {"title": rest}
        elif current is None:
            if keyword == "default":
                default = rest
        elif keyword == "kernel":
            words = rest.split()
            # 'kernel --type=netbsd /path' options come before the path
            while words and words[0].startswith("--"):
                words.pop(0)
            if words:
                current["kernel"] = words[0]
                current["args"] = words[1:]
        elif keyword == "initrd":
            if rest:
                current["initrd"] = rest.split()[0]
        elif keyword in ("root", "rootnoverify"):
            current["root"] = rest
    close()
    return GrubLegacyConfig(default=default, entries=tuple(entries)), problems


@dataclass(frozen=True)
class Grub2Config:
    entries: tuple[BootEntry, ...]
    top_level: tuple[int, ...]  # index into entries of each top-level item (a submenu: its first entry)
    defaults: tuple[str, ...]  # every 'set default=' value, in order
    uses_blscfg: bool
    blscfg_at: int | None  # where blscfg inserts the BLS entries: (index into entries)
    blscfg_top: int | None  # ... and into top_level
    stub: bool  # an EFI stub that only loads another grub.cfg ('configfile')


_MENU_TITLE = re.compile(r"""^(menuentry|submenu)\s+(?:'([^']*)'|"([^"]*)"|(\S+))(.*)$""")
_MENU_ID = re.compile(r"""\$menuentry_id_option\s+(?:'([^']*)'|"([^"]*)"|(\S+))""")


def parse_grub2_cfg(text: str, source: str) -> tuple[Grub2Config, list[str]]:
    """grub.cfg as grub-mkconfig writes it: menuentry/submenu blocks with linux/initrd lines.

    Entries inside a submenu are listed too, titled "Submenu>Entry". `top_level`
    maps grub's numeric default (which counts a submenu as one item) to entries.
    """
    entries: list[BootEntry] = []
    top_level: list[int] = []
    defaults: list[str] = []
    problems: list[str] = []
    # open blocks: (kind, title, data); kind is menuentry, submenu or block (function ... {)
    stack: list[tuple[str, str, dict[str, Any]]] = []
    awaiting_top = False  # a top-level item is open and has no entry yet

    def close_block() -> None:
        nonlocal awaiting_top
        kind, title, data = stack.pop()
        if kind != "menuentry":
            return
        path = ">".join([t for k, t, _ in stack if k == "submenu"] + [title])
        entries.append(
            BootEntry(
                title=path,
                id=data.get("id"),
                kernel=data.get("kernel"),
                kernel_version=_kver_from_kernel_path(data.get("kernel")),
                initrd=data.get("initrd"),
                args=tuple(data.get("args", ())),
                grub_root=data.get("root"),
                source=source,
            )
        )
        if awaiting_top:
            top_level.append(len(entries) - 1)
            awaiting_top = False

    uses_blscfg = False
    blscfg_at: int | None = None
    blscfg_top: int | None = None
    has_configfile = False

    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _MENU_TITLE.match(stripped)
        if match:
            kind = match.group(1)
            title = next(g for g in match.group(2, 3, 4) if g is not None)
            ident = _MENU_ID.search(match.group(5))
            ident_value = next((g for g in ident.groups() if g is not None), None) if ident else None
            if not any(k != "block" for k, _, _ in stack):
                if awaiting_top:
                    top_level.append(-1)  # an empty submenu still counts
                awaiting_top = True
            stack.append((kind, title, {"id": ident_value}))
            if not stripped.endswith("{"):
                problems.append(f"line {number}: {kind} without an opening brace on the line")
            continue
        if stripped.startswith("}"):
            if not stack:
                problems.append(f"line {number}: unbalanced '}}'")
                continue
            close_block()
            continue
        if stripped.endswith("{"):
            stack.append(("block", "", {}))
            continue
        words = stripped.split()
        command = words[0]
        if command == "blscfg":
            uses_blscfg = True
            if blscfg_at is None:
                blscfg_at, blscfg_top = len(entries), len(top_level)
        elif command == "configfile":
            has_configfile = True
        elif command == "set" and len(words) > 1 and words[1].startswith("default="):
            defaults.append(stripped.split("=", 1)[1].strip().strip("'\""))
        entry = next((d for k, _, d in reversed(stack) if k == "menuentry"), None)
        if entry is None:
            continue
        if command in ("linux", "linux16", "linuxefi", "kernel") and len(words) > 1:
            entry["kernel"] = words[1]
            entry["args"] = words[2:]
        elif command in ("initrd", "initrd16", "initrdefi") and len(words) > 1:
            entry["initrd"] = words[1]
        elif command == "set" and len(words) > 1 and words[1].startswith("root="):
            entry["root"] = words[1].split("=", 1)[1].strip("'\"")
    if stack:
        problems.append("unbalanced braces: a block is never closed")
        while stack:  # keep what the unclosed entries say
            close_block()
    if awaiting_top:
        top_level.append(-1)
    stub = has_configfile and not entries and not uses_blscfg
    return (
        Grub2Config(
            entries=tuple(entries),
            top_level=tuple(top_level),
            defaults=tuple(defaults),
            uses_blscfg=uses_blscfg,
            blscfg_at=blscfg_at,
            blscfg_top=blscfg_top,
            stub=stub,
        ),
        problems,
    )


def parse_bls_entry(text: str) -> dict[str, list[str]]:
    """A Boot Loader Specification entry: 'key value' lines; keys may repeat (initrd)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, _, value = stripped.partition(" ")
        values.setdefault(key, []).append(value.strip())
    return values


def bls_entry(text: str, source: str) -> BootEntry:
    values = parse_bls_entry(text)
    stem = source.rsplit("/", 1)[-1].removesuffix(".conf")
    kernel = values.get("linux", [None])[0]
    initrds = [word for value in values.get("initrd", []) for word in value.split() if not word.startswith("$")]
    args = [word for value in values.get("options", []) for word in value.split()]
    version = values.get("version", [None])[0] or _kver_from_kernel_path(kernel)
    return BootEntry(
        title=values.get("title", [stem])[0],
        id=stem,
        kernel=kernel,
        kernel_version=version,
        initrd=initrds[0] if initrds else None,
        args=tuple(args),
        grub_root=None,
        source=source,
    )


def resolve_default(default: str | None, entries: Sequence[BootEntry], top_level: Sequence[int]) -> int | None:
    """Which entry a grub default ('0', a title, an id, 'Submenu>Entry') selects."""
    if default is None:
        return 0 if entries else None
    value = default.strip()
    if value == "":
        return 0 if entries else None
    if value.isdigit():
        number = int(value)
        if number < len(top_level) and top_level[number] >= 0:
            return top_level[number]
        return None
    for index, entry in enumerate(entries):
        if value in (entry.title, entry.id):
            return index
    last = value.rsplit(">", 1)[-1]
    for index, entry in enumerate(entries):
        if last in (entry.title.rsplit(">", 1)[-1], entry.id):
            return index
    return None


# --- network ------------------------------------------------------------------


def normalize_mac(text: str) -> str | None:
    """'52:54:00:AB:CD:EF', '52-54-00-ab-cd-ef' or NetworkManager's old '82;84;0;171;205;239;'."""
    value = text.strip().strip("\"'")
    if ";" in value:
        parts = [p for p in value.split(";") if p != ""]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            return None
        if len(numbers) in (6, 8, 20) and all(0 <= n < 256 for n in numbers):
            return ":".join(f"{n:02x}" for n in numbers)
        return None
    parts = re.split(r"[:-]", value)
    if len(parts) in (6, 8, 20) and all(re.fullmatch(r"[0-9A-Fa-f]{1,2}", p) for p in parts):
        return ":".join(p.lower().zfill(2) for p in parts)
    return None


def netmask_to_prefix(netmask: str) -> int | None:
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        return None


def _classful_prefix(address: str) -> int:
    first = int(address.split(".", 1)[0]) if address.split(".", 1)[0].isdigit() else 0
    return 8 if first < 128 else 16 if first < 192 else 24


def normalize_destination(text: str, gateway: str | None = None) -> str:
    """'default' -> '0.0.0.0/0' (or '::/0'), '10.0.0.0/255.0.0.0' -> '10.0.0.0/8', a host -> /32."""
    if text in ("default", "0/0", "0.0.0.0", "0.0.0.0/0"):  # noqa: S104 (a route, not a bind)
        return "::/0" if gateway and ":" in gateway else "0.0.0.0/0"
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return text


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1", "y"):
        return True
    if lowered in ("no", "false", "off", "0", "n"):
        return False
    return None


@dataclass
class _Draft:
    """An interface while it is being put together (then frozen into an Interface)."""

    name: str
    style: NetStyle
    file: str
    kind: InterfaceKind = "ethernet"
    method: IPMethod = "none"
    addresses: list[str] = field(default_factory=list)
    gateway: str | None = None
    routes: list[Route] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    onboot: bool | None = None
    master: str | None = None
    members: list[str] = field(default_factory=list)
    bond_mode: str | None = None
    bond_options: list[str] = field(default_factory=list)
    vlan_id: int | None = None
    vlan_parent: str | None = None
    profile: str | None = None
    carried_vlans: list[str] = field(default_factory=list)  # networkd: [Network] VLAN=

    def freeze(self) -> Interface:
        return Interface(
            name=self.name,
            style=self.style,
            file=self.file,
            kind=self.kind,
            method=self.method,
            addresses=tuple(dict.fromkeys(self.addresses)),
            gateway=self.gateway,
            routes=tuple(self.routes),
            dns=tuple(dict.fromkeys(self.dns)),
            onboot=self.onboot,
            master=self.master,
            members=tuple(sorted(set(self.members))),
            bond_mode=self.bond_mode,
            bond_options=tuple(self.bond_options),
            vlan_id=self.vlan_id,
            vlan_parent=self.vlan_parent,
            profile=self.profile,
        )


def _link_members(drafts: Sequence[_Draft]) -> None:
    """A slave names its master; give the master its members."""
    by_name = {d.name: d for d in drafts}
    for draft in drafts:
        if draft.master and draft.master in by_name:
            master = by_name[draft.master]
            if draft.name not in master.members:
                master.members.append(draft.name)


def _set_vlan_from_name(draft: _Draft) -> None:
    """'bond0.100' -> parent bond0, id 100; 'vlan100' -> id 100 (the parent is named elsewhere)."""
    dotted = re.match(r"^(.+)\.(\d+)$", draft.name)
    if dotted:
        draft.vlan_parent = draft.vlan_parent or dotted.group(1)
        if draft.vlan_id is None:
            draft.vlan_id = int(dotted.group(2))
        return
    plain = re.match(r"^vlan0*(\d+)$", draft.name)
    if plain and draft.vlan_id is None:
        draft.vlan_id = int(plain.group(1))


def _cidr(address: str, prefix: int | str | None) -> str:
    return f"{address}/{prefix}" if prefix is not None and prefix != "" else address


def _bond_options(text: str) -> tuple[str | None, list[str]]:
    options = [word for word in text.split() if word]
    mode = next((w.split("=", 1)[1] for w in options if w.startswith("mode=")), None)
    return mode, options


# ifcfg (RHEL family) -------------------------------------------------------

_IGNORED_SUFFIXES = ("~", ".bak", ".old", ".orig", ".rpmnew", ".rpmorig", ".rpmsave", ".swp", ".dpkg-old", ".dpkg-dist")


def parse_ifcfg(text: str, path: str) -> tuple[Interface | None, list[MacBinding], list[str]]:
    """One ifcfg-<name> file -> the interface it configures and the MACs it binds.

    Returns no interface for the loopback.
    """
    values, problems = parse_shell_vars(text)
    suffix = path.rsplit("/", 1)[-1].removeprefix("ifcfg-")
    name = values.get("DEVICE") or suffix
    if name == "lo":
        return None, [], problems
    draft = _Draft(name=name, style="ifcfg", file=path, profile=values.get("NAME") or None)
    kind = values.get("TYPE", "").lower()
    if kind == "bond" or "BONDING_OPTS" in values or _bool(values.get("BONDING_MASTER")):
        draft.kind = "bond"
    elif kind == "vlan" or _bool(values.get("VLAN")):
        draft.kind = "vlan"
    elif kind == "bridge":
        draft.kind = "bridge"
    elif kind == "team":
        draft.kind = "team"
    elif kind not in ("", "ethernet", "teamport"):
        draft.kind = "other"
    if draft.kind == "bond":
        draft.bond_mode, draft.bond_options = _bond_options(values.get("BONDING_OPTS", ""))
    if draft.kind == "vlan":
        if values.get("VLAN_ID", "").isdigit():
            draft.vlan_id = int(values["VLAN_ID"])
        draft.vlan_parent = values.get("PHYSDEV") or None
        _set_vlan_from_name(draft)

    def numbered(prefix: str) -> list[tuple[str, str]]:
        """PREFIX, then PREFIX0, PREFIX1, ... in numeric order: (suffix, value)."""
        found = [("", values[prefix])] if values.get(prefix) else []
        extra = sorted(
            ((k[len(prefix) :], v) for k, v in values.items() if re.fullmatch(rf"{prefix}\d+", k) and v),
            key=lambda kv: int(kv[0]),
        )
        return found + extra

    for index, address in numbered("IPADDR"):
        prefix: int | str | None = values.get(f"PREFIX{index}")
        if not prefix and values.get(f"NETMASK{index}"):
            prefix = netmask_to_prefix(values[f"NETMASK{index}"])
            if prefix is None:
                problems.append(f"NETMASK{index}={values[f'NETMASK{index}']}: not a netmask")
        if not prefix:
            prefix = _classful_prefix(address)
        draft.addresses.append(_cidr(address, prefix))
    for key in ("IPV6ADDR", "IPV6ADDR_SECONDARIES"):
        draft.addresses.extend(values.get(key, "").split())
    gateways = numbered("GATEWAY")
    draft.gateway = gateways[0][1] if gateways else None
    draft.dns = [v for _, v in numbered("DNS")]
    bootproto = values.get("BOOTPROTO", "none").lower()
    if bootproto in ("dhcp", "bootp"):
        draft.method = "dhcp"
    elif draft.addresses:
        draft.method = "static"
    draft.onboot = _bool(values.get("ONBOOT"))
    draft.master = values.get("MASTER") or values.get("TEAM_MASTER") or values.get("BRIDGE") or None

    bindings: list[MacBinding] = []
    wanted: tuple[tuple[BindingKind, BindingAction], ...] = (("HWADDR", "match"), ("MACADDR", "set"))
    for key, action in wanted:
        if values.get(key):
            mac = normalize_mac(values[key])
            if mac is None:
                problems.append(f"{key}={values[key]}: not a MAC address")
            else:
                bindings.append(MacBinding(path, mac, name, key, action))
    return draft.freeze(), bindings, problems


def parse_route_file(text: str) -> tuple[list[Route], list[str]]:
    """route-<iface>: either ADDRESSn/NETMASKn/GATEWAYn or 'ip route' argument lines."""
    problems: list[str] = []
    routes: list[Route] = []
    if re.search(r"^\s*ADDRESS\d+=", text, re.MULTILINE):
        values, problems = parse_shell_vars(text)
        numbers = sorted(int(k[7:]) for k in values if re.fullmatch(r"ADDRESS\d+", k))
        for n in numbers:
            prefix = netmask_to_prefix(values.get(f"NETMASK{n}", "255.255.255.255"))
            destination = normalize_destination(_cidr(values[f"ADDRESS{n}"], prefix))
            metric = values.get(f"METRIC{n}")
            routes.append(
                Route(
                    destination,
                    values.get(f"GATEWAY{n}") or None,
                    int(metric) if metric and metric.isdigit() else None,
                )
            )
        return routes, problems
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        route = parse_ip_route_words(words)
        if route is None:
            problems.append(f"line {number}: not a route: {line.strip()[:80]!r}")
        else:
            routes.append(route)
    return routes, problems


def parse_ip_route_words(words: Sequence[str]) -> Route | None:
    """'10.0.0.0/8 via 192.0.2.1 dev eth0 metric 100' (the arguments of 'ip route add')."""
    words = list(words)
    if words and words[0] in ("to", "unicast"):
        words = words[1:]
    if not words:
        return None
    destination = words[0]
    options = dict(zip(words[1::2], words[2::2], strict=False))
    gateway = options.get("via")
    if destination != "default" and not re.match(r"^[0-9a-fA-F:.]+(/\d+)?$", destination):
        return None
    metric = options.get("metric")
    return Route(
        normalize_destination(destination, gateway), gateway, int(metric) if metric and metric.isdigit() else None
    )


_UDEV_PAIR = re.compile(r'([A-Za-z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"')


def parse_udev_net_rules(text: str, path: str) -> list[MacBinding]:
    """70-persistent-net.rules style lines: ATTR{address}=="..." ... NAME="eth0"."""
    bindings: list[MacBinding] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pairs = _UDEV_PAIR.findall(stripped)
        keys = {(key, op): value for key, op, value in pairs}
        subsystem = keys.get(("SUBSYSTEM", "=="))
        if subsystem not in (None, "net"):
            continue
        address = keys.get(("ATTR{address}", "==")) or keys.get(("ATTRS{address}", "=="))
        if not address:
            continue
        mac = normalize_mac(address)
        if mac is None:
            continue
        name = keys.get(("NAME", "=")) or keys.get(("NAME", ":="))
        bindings.append(MacBinding(path, mac, name, "udev-rule", "match"))
    return bindings


# ini-style (NetworkManager keyfiles, systemd-networkd) ------------------------


def parse_ini(text: str, *, comments: str = "#;") -> tuple[list[tuple[str, list[tuple[str, str]]]], list[str]]:
    """'[Section]' and 'key=value' lines -> [(section, [(key, value), ...]), ...] in file order.

    A section that appears twice (systemd's [Route], [Address]) stays two
    sections; keys may repeat inside one.
    """
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    problems: list[str] = []
    current: list[tuple[str, str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in comments:
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]"):
                problems.append(f"line {number}: bad section header {stripped[:80]!r}")
                current = None
                continue
            current = []
            sections.append((stripped[1:-1].strip(), current))
            continue
        key, sep, value = stripped.partition("=")
        if not sep:
            problems.append(f"line {number}: not key=value: {stripped[:80]!r}")
            continue
        if current is None:
            problems.append(f"line {number}: key outside a section: {stripped[:80]!r}")
            continue
        current.append((key.strip(), value.strip()))
    return sections, problems


def _keyfile_sections(text: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    parsed, problems = parse_ini(text, comments="#")
    sections: dict[str, dict[str, str]] = {}
    for section, pairs in parsed:
        for key, value in pairs:
            sections.setdefault(section, {})[key] = value.replace("\\s", " ").replace("\\t", "\t")
    return sections, problems


_NM_TYPES: Mapping[str, InterfaceKind] = {
    "ethernet": "ethernet",
    "802-3-ethernet": "ethernet",
    "bond": "bond",
    "vlan": "vlan",
    "bridge": "bridge",
    "team": "team",
}


def _nm_addresses(section: Mapping[str, str]) -> tuple[list[str], str | None]:
    """address1=ip/prefix[,gw] (several may be joined by ';'), or the old addresses1=ip;prefix;gw;."""
    found: list[tuple[int, str]] = []
    gateway: str | None = None
    for key, value in section.items():
        match = re.fullmatch(r"address(?:es)?(\d*)", key)
        if not match:
            continue
        order = int(match.group(1) or 0)
        if "/" in value:
            for part in (p.strip() for p in value.split(";")):
                if not part:
                    continue
                address, _, gw = part.partition(",")
                found.append((order, address.strip()))
                if gw.strip() and gateway is None:
                    gateway = gw.strip()
        else:
            words = [w.strip() for w in value.split(";") if w.strip()]
            if len(words) >= 2:
                found.append((order, f"{words[0]}/{words[1]}"))
                if len(words) >= 3 and gateway is None and words[2] not in ("0.0.0.0", "::"):  # noqa: S104
                    gateway = words[2]
    found.sort(key=lambda item: item[0])
    return [a for _, a in found], gateway


def _nm_routes(section: Mapping[str, str]) -> list[Route]:
    routes: list[tuple[int, Route]] = []
    for key, value in section.items():
        match = re.fullmatch(r"routes?(\d*)", key)
        if not match:
            continue
        parts = [p.strip() for p in value.split(",")]
        gateway = parts[1] if len(parts) > 1 and parts[1] else None
        metric = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
        routes.append((int(match.group(1) or 0), Route(normalize_destination(parts[0], gateway), gateway, metric)))
    routes.sort(key=lambda item: item[0])
    return [r for _, r in routes]


@dataclass(frozen=True)
class _NMProfile:
    draft: _Draft
    uuid: str | None
    bindings: tuple[MacBinding, ...]


def parse_nm_keyfile(text: str, path: str) -> tuple[_NMProfile | None, list[str]]:
    sections, problems = _keyfile_sections(text)
    connection = sections.get("connection", {})
    if not connection:
        problems.append("no [connection] section")
        return None, problems
    ident = connection.get("id") or path.rsplit("/", 1)[-1].removesuffix(".nmconnection")
    name = connection.get("interface-name") or ident
    kind = _NM_TYPES.get(connection.get("type", ""), "other")
    draft = _Draft(name=name, style="NetworkManager", file=path, kind=kind, profile=ident)
    draft.onboot = _bool(connection.get("autoconnect", "true"))
    draft.master = connection.get("master") or connection.get("controller") or None

    ipv4 = sections.get("ipv4", {})
    ipv6 = sections.get("ipv6", {})
    v4, gw4 = _nm_addresses(ipv4)
    v6, _ = _nm_addresses(ipv6)
    draft.addresses = v4 + v6
    draft.gateway = ipv4.get("gateway") or gw4
    draft.routes = _nm_routes(ipv4) + _nm_routes(ipv6)
    draft.dns = [d for d in (ipv4.get("dns", "") + ";" + ipv6.get("dns", "")).split(";") if d.strip()]
    method = ipv4.get("method", "disabled" if draft.master else "auto")
    draft.method = "dhcp" if method == "auto" else "static" if method == "manual" else "none"

    vlan = sections.get("vlan", {})
    if kind == "vlan":
        if vlan.get("id", "").isdigit():
            draft.vlan_id = int(vlan["id"])
        draft.vlan_parent = vlan.get("parent") or None
        _set_vlan_from_name(draft)
    bond = sections.get("bond", {})
    if kind == "bond":
        draft.bond_mode = bond.get("mode")
        draft.bond_options = [f"{k}={v}" for k, v in bond.items()]

    bindings: list[MacBinding] = []
    for section_name, section in sections.items():
        for key in ("mac-address", "cloned-mac-address"):
            if key not in section:
                continue
            mac = normalize_mac(section[key])
            if mac is None:
                if key == "mac-address":
                    problems.append(f"[{section_name}] {key}={section[key]}: not a MAC address")
                continue  # cloned-mac-address=preserve|permanent|random|stable
            matching = key == "mac-address" and section_name in (
                "ethernet",
                "802-3-ethernet",
                "wifi",
                "802-11-wireless",
                "infiniband",
            )
            bindings.append(
                MacBinding(
                    path,
                    mac,
                    name,
                    "nm-mac-address" if key == "mac-address" else "nm-cloned-mac-address",
                    "match" if matching else "set",
                )
            )
    return _NMProfile(draft, connection.get("uuid"), tuple(bindings)), problems


# netplan -----------------------------------------------------------------------


def parse_netplan_yaml(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Load one netplan file with every scalar as a string.

    The plain YAML 1.1 loader turns an unquoted MAC such as 52:54:00:12:34:56
    into a sexagesimal integer; netplan itself reads scalars as strings.
    """
    try:
        data = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 (BaseLoader builds no objects)
    except yaml.YAMLError as exc:
        return None, [f"not valid YAML: {str(exc).splitlines()[0]}"]
    if data is None or data == "":
        return {}, []
    if not isinstance(data, dict):
        return None, ["top level is not a mapping"]
    return data, []


def merge_netplan(documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Later files add new keys and override scalars and sequences (netplan's rule)."""

    def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    result: dict[str, Any] = {}
    for document in documents:
        result = merge(result, document)
    return result


_NETPLAN_KINDS: Mapping[str, InterfaceKind] = {
    "ethernets": "ethernet",
    "bonds": "bond",
    "bridges": "bridge",
    "vlans": "vlan",
}


def _as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def netplan_names(document: Mapping[str, Any]) -> dict[str, str]:
    """netplan id -> interface name (set-name, else the id)."""
    network = _as_map(document.get("network"))
    names: dict[str, str] = {}
    for section in _NETPLAN_KINDS:
        for ident, config in _as_map(network.get(section)).items():
            names[ident] = str(_as_map(config).get("set-name") or ident)
    return names


def netplan_bindings(document: Mapping[str, Any], path: str) -> list[MacBinding]:
    network = _as_map(document.get("network"))
    names = netplan_names(document)
    bindings: list[MacBinding] = []
    for section in (*_NETPLAN_KINDS, "wifis"):
        for ident, config in _as_map(network.get(section)).items():
            config = _as_map(config)
            name = names.get(ident, ident)
            match_mac = _as_map(config.get("match")).get("macaddress")
            if isinstance(match_mac, str) and normalize_mac(match_mac):
                bindings.append(MacBinding(path, normalize_mac(match_mac) or "", name, "netplan-match", "match"))
            set_mac = config.get("macaddress")
            if isinstance(set_mac, str) and normalize_mac(set_mac):
                bindings.append(MacBinding(path, normalize_mac(set_mac) or "", name, "netplan-macaddress", "set"))
    return bindings


def netplan_interfaces(document: Mapping[str, Any], files: Mapping[str, str]) -> tuple[list[Interface], list[str]]:
    """Interfaces from a merged netplan document; `files` maps a netplan id to its file."""
    network = _as_map(document.get("network"))
    names = netplan_names(document)
    problems: list[str] = []
    drafts: list[_Draft] = []
    for section, kind in _NETPLAN_KINDS.items():
        for ident, raw in _as_map(network.get(section)).items():
            config = _as_map(raw)
            draft = _Draft(
                name=names.get(ident, ident), style="netplan", file=files.get(ident, ""), kind=kind, profile=ident
            )
            for item in _as_list(config.get("addresses")):
                if isinstance(item, str):
                    draft.addresses.append(item)
                elif isinstance(item, dict):
                    draft.addresses.extend(str(k) for k in item)
            draft.gateway = config.get("gateway4") or None
            for route in _as_list(config.get("routes")):
                route = _as_map(route)
                to, via = route.get("to"), route.get("via")
                if not isinstance(to, str):
                    problems.append(f"{ident}: a route without 'to'")
                    continue
                metric = route.get("metric")
                destination = normalize_destination(to, via if isinstance(via, str) else None)
                if destination in ("0.0.0.0/0",) and draft.gateway is None and isinstance(via, str):
                    draft.gateway = via
                draft.routes.append(
                    Route(
                        destination,
                        via if isinstance(via, str) else None,
                        int(metric) if isinstance(metric, str) and metric.isdigit() else None,
                    )
                )
            draft.dns = [str(a) for a in _as_list(_as_map(config.get("nameservers")).get("addresses"))]
            if _bool(str(config.get("dhcp4", "false"))):
                draft.method = "dhcp"
            elif any(":" not in a for a in draft.addresses):
                draft.method = "static"
            if kind == "vlan":
                if str(config.get("id", "")).isdigit():
                    draft.vlan_id = int(config["id"])
                link = config.get("link")
                draft.vlan_parent = names.get(link, link) if isinstance(link, str) else None
            if kind in ("bond", "bridge"):
                members = [names.get(m, m) for m in _as_list(config.get("interfaces")) if isinstance(m, str)]
                draft.members = members
                params = _as_map(config.get("parameters"))
                if kind == "bond":
                    draft.bond_mode = params.get("mode") if isinstance(params.get("mode"), str) else None
                    draft.bond_options = [f"{k}={v}" for k, v in sorted(params.items()) if isinstance(v, str)]
            drafts.append(draft)
    by_name = {d.name: d for d in drafts}
    for draft in drafts:
        for member in draft.members:
            if member in by_name:
                by_name[member].master = draft.name
    return [d.freeze() for d in drafts], problems


# systemd-networkd ------------------------------------------------------------


def parse_networkd(text: str, path: str) -> tuple[_Draft | None, list[MacBinding], list[str]]:
    """A systemd-networkd .network, .netdev or .link file."""
    sections, problems = parse_ini(text)
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    suffix = path.rsplit(".", 1)[-1]

    def get(section: str, key: str) -> list[str]:
        return [v for name, pairs in sections if name == section for k, v in pairs if k == key]

    def last(section: str, key: str) -> str | None:
        values = get(section, key)
        return values[-1] if values else None

    match_names = [n for v in get("Match", "Name") for n in v.split()]
    if suffix == "link":
        name = last("Link", "Name")
    elif suffix == "netdev":
        name = last("NetDev", "Name")
    else:
        name = match_names[0] if match_names else None
    bindings: list[MacBinding] = []
    match_kind: BindingKind = "networkd-link-match" if suffix == "link" else "networkd-match"
    for value in get("Match", "MACAddress") + get("Match", "PermanentMACAddress"):
        for word in value.split():
            mac = normalize_mac(word)
            if mac is None:
                problems.append(f"[Match] MACAddress={word}: not a MAC address")
                continue
            bindings.append(MacBinding(path, mac, name, match_kind, "match"))
    for section in ("Link", "NetDev"):
        for value in get(section, "MACAddress"):
            mac = normalize_mac(value)
            if mac is not None:
                bindings.append(MacBinding(path, mac, name, "networkd-macaddress", "set"))
    if suffix == "link":
        return None, bindings, problems

    draft = _Draft(name=name or stem, style="systemd-networkd", file=path)
    if suffix == "netdev":
        netdev_kind = last("NetDev", "Kind") or ""
        if netdev_kind in ("bond", "vlan", "bridge"):
            draft.kind = typing.cast(InterfaceKind, netdev_kind)
        else:
            draft.kind = "other"
        vid = last("VLAN", "Id")
        if netdev_kind == "vlan" and vid and vid.isdigit():
            draft.vlan_id = int(vid)
        if netdev_kind == "bond":
            draft.bond_mode = last("Bond", "Mode")
            draft.bond_options = [f"{k}={v}" for n, pairs in sections if n == "Bond" for k, v in pairs]
        return draft, bindings, problems

    draft.addresses = get("Network", "Address") + get("Address", "Address")
    gateways = get("Network", "Gateway")
    draft.gateway = gateways[0] if gateways else None
    draft.dns = [d for v in get("Network", "DNS") for d in v.split()]
    dhcp = (last("Network", "DHCP") or "no").lower()
    if dhcp in ("yes", "ipv4", "true", "both", "v4"):
        draft.method = "dhcp"
    elif any(":" not in a for a in draft.addresses):
        draft.method = "static"
    draft.master = last("Network", "Bond") or last("Network", "Bridge")
    for section, pairs in sections:
        if section != "Route":
            continue
        route = dict(pairs)
        gateway = route.get("Gateway")
        metric = route.get("Metric")
        draft.routes.append(
            Route(
                normalize_destination(route.get("Destination", "default"), gateway),
                gateway,
                int(metric) if metric and metric.isdigit() else None,
            )
        )
    draft.carried_vlans = [n for v in get("Network", "VLAN") for n in v.split()]
    return draft, bindings, problems


# ifupdown ----------------------------------------------------------------------


@dataclass(frozen=True)
class IfupdownStanza:
    keyword: str  # iface, auto, allow-hotplug, source, source-directory, mapping, ...
    args: tuple[str, ...]
    options: tuple[tuple[str, str], ...]  # for iface: ('address', '192.0.2.10/24'), ...
    line: int


_IFUPDOWN_KEYWORDS = {
    "iface",
    "mapping",
    "auto",
    "source",
    "source-directory",
    "source-dir",
    "no-auto-down",
    "no-scripts",
    "rename",
}


def parse_interfaces(text: str) -> list[IfupdownStanza]:
    """/etc/network/interfaces (and its included files) -> stanzas in order."""
    joined = re.sub(r"\\\n", " ", text)
    stanzas: list[IfupdownStanza] = []
    current: tuple[str, tuple[str, ...], list[tuple[str, str]], int] | None = None

    def close() -> None:
        if current is not None:
            stanzas.append(IfupdownStanza(current[0], current[1], tuple(current[2]), current[3]))

    for number, line in enumerate(joined.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        words = stripped.split()
        keyword = words[0]
        if keyword in _IFUPDOWN_KEYWORDS or keyword.startswith("allow-"):
            close()
            current = (keyword, tuple(words[1:]), [], number)
            if keyword not in ("iface", "mapping"):
                close()
                current = None
            continue
        if current is not None:
            current[2].append((keyword, stripped[len(keyword) :].strip()))
    close()
    return stanzas


def ifupdown_interfaces(
    stanzas: Sequence[tuple[str, IfupdownStanza]],
) -> tuple[list[Interface], list[MacBinding], list[str]]:
    """(file, stanza) pairs from every included file -> interfaces and MAC bindings."""
    drafts: dict[str, _Draft] = {}
    bindings: list[MacBinding] = []
    problems: list[str] = []
    auto: set[str] = set()
    for path, stanza in stanzas:
        if stanza.keyword == "auto" or stanza.keyword.startswith("allow-"):
            auto.update(stanza.args)
            continue
        if stanza.keyword != "iface":
            continue
        if len(stanza.args) < 3:
            problems.append(f"{path}: line {stanza.line}: iface needs a name, a family and a method")
            continue
        name, family, method = stanza.args[:3]
        if method == "loopback" or name == "lo":
            continue
        draft = drafts.get(name)
        if draft is None:
            draft = drafts[name] = _Draft(name=name, style="ifupdown", file=path)
        options: dict[str, str] = {}
        for key, value in stanza.options:
            key = key.replace("_", "-")
            options.setdefault(key, value)
            if key in ("up", "post-up", "pre-up"):
                words = value.split()
                if words[:3] == ["ip", "route", "add"] or words[:4] == ["ip", "-6", "route", "add"]:
                    route = parse_ip_route_words(words[3:] if words[1] == "route" else words[4:])
                    if route is not None:
                        draft.routes.append(route)
            elif key == "hwaddress":
                words = value.split()
                mac = normalize_mac(words[-1]) if words else None
                if mac is None:
                    problems.append(f"{path}: line {stanza.line}: hwaddress {value}: not a MAC address")
                else:
                    bindings.append(MacBinding(path, mac, name, "hwaddress", "set"))
        if family == "inet":
            draft.method = "dhcp" if method == "dhcp" else "static" if method == "static" else "none"
        elif draft.method == "none" and family == "inet6" and method == "static":
            draft.method = "static"
        address = options.get("address")
        if address:
            prefix: int | str | None = None
            if "/" not in address and options.get("netmask"):
                netmask = options["netmask"]
                prefix = netmask if netmask.isdigit() else netmask_to_prefix(netmask)
            draft.addresses.append(_cidr(address, prefix))
        if options.get("gateway") and (family == "inet" or draft.gateway is None):
            draft.gateway = options["gateway"]
        draft.dns.extend(options.get("dns-nameservers", "").split())
        if options.get("bond-slaves") or options.get("bond-mode"):
            draft.kind = "bond"
            slaves = options.get("bond-slaves", "")
            if slaves != "none":
                draft.members.extend(slaves.split())
            draft.bond_mode = options.get("bond-mode")
            draft.bond_options = [
                f"{k.removeprefix('bond-')}={v}"
                for k, v in stanza.options
                if k.replace("_", "-").startswith("bond-") and k.replace("_", "-") != "bond-slaves"
            ]
        if options.get("bond-master"):
            draft.master = options["bond-master"]
        if options.get("bridge-ports"):
            draft.kind = "bridge"
            ports = options["bridge-ports"]
            if ports != "none":
                draft.members.extend(ports.split())
        if options.get("vlan-raw-device") or re.match(r"^.+\.\d+$", name):
            draft.kind = "vlan"
            draft.vlan_parent = options.get("vlan-raw-device") or draft.vlan_parent
            if options.get("vlan-id", "").isdigit():
                draft.vlan_id = int(options["vlan-id"])
            _set_vlan_from_name(draft)
    for draft in drafts.values():
        draft.onboot = draft.name in auto
        if draft.kind == "bridge":
            for port in draft.members:
                if port in drafts and drafts[port].master is None:
                    drafts[port].master = draft.name
    _link_members(list(drafts.values()))
    return [d.freeze() for d in drafts.values()], bindings, problems


# ---------------------------------------------------------------------------
# Describing each part of the tree
# ---------------------------------------------------------------------------


def describe_os(tree: SourceTree) -> OSIdentity:
    sources: list[str] = []
    os_release: dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = tree.read_text(path)
        if text is not None:
            os_release = parse_os_release(text)
            sources.append(path)
            break
    release: tuple[str, str | None, str] | None = None
    for path in (
        "/etc/centos-release",
        "/etc/rocky-release",
        "/etc/almalinux-release",
        "/etc/oracle-release",
        "/etc/redhat-release",
    ):
        text = tree.read_text(path)
        if text is not None and text.strip():
            release = parse_redhat_release(text)
            sources.append(path)
            break
    debian_version = (tree.read_text("/etc/debian_version") or "").strip() or None
    if debian_version:
        sources.append("/etc/debian_version")
    lsb: dict[str, str] = {}
    lsb_text = tree.read_text("/etc/lsb-release")
    if lsb_text is not None:
        lsb, _ = parse_shell_vars(lsb_text)
        if lsb:
            sources.append("/etc/lsb-release")

    id_like = tuple(os_release.get("ID_LIKE", "").split())
    distro = os_release.get("ID", "").lower()
    version = os_release.get("VERSION_ID") or None
    pretty = os_release.get("PRETTY_NAME") or None
    codename = os_release.get("VERSION_CODENAME") or os_release.get("UBUNTU_CODENAME") or None
    if not distro:
        if release is not None:
            distro, version, pretty = release[0], release[1], release[2]
        elif lsb.get("DISTRIB_ID"):
            distro = lsb["DISTRIB_ID"].lower()
            version = lsb.get("DISTRIB_RELEASE") or None
            pretty = lsb.get("DISTRIB_DESCRIPTION") or None
        elif debian_version:
            distro = "debian"
            version = debian_version if debian_version[:1].isdigit() else None
            pretty = f"Debian GNU/Linux {debian_version}"
    elif release is not None and release[1] and family_of(distro, id_like) == "rhel":
        # os-release says "7"; centos-release says "7.9.2009".
        if version is None or release[1].split(".")[0] == version.split(".")[0]:
            version = release[1]
    elif distro == "debian" and debian_version and version and debian_version.startswith(version + "."):
        version = debian_version
    if not codename and lsb.get("DISTRIB_CODENAME"):
        codename = lsb["DISTRIB_CODENAME"]
    family = family_of(distro, id_like)
    if family == "unknown":
        if release is not None:
            family = "rhel"
        elif debian_version:
            family = "debian"
    if not distro:
        tree.warn("no os-release, redhat-release, lsb-release or debian_version: distribution unknown")
        distro = "unknown"
    text, major, minor = major_minor(version)
    return OSIdentity(
        family=family,
        id=distro,
        version=text,
        major=major,
        minor=minor,
        pretty_name=pretty,
        codename=codename,
        id_like=id_like,
        sources=tuple(sources),
    )


def _module_files(tree: SourceTree, modules_dir: str, names: Iterable[str]) -> set[str]:
    """Which of `names` have a module file (known path first, then modules.dep)."""
    found: set[str] = set()
    missing = []
    for name in names:
        directory = VIRTIO_DRIVERS[name][1]
        if any(tree.is_file(f"{modules_dir}/kernel/{directory}/{name}{ext}") for ext in MODULE_SUFFIXES):
            found.add(name)
        else:
            missing.append(name)
    if missing:
        dep = tree.read_text(f"{modules_dir}/modules.dep")
        if dep:
            listed = parse_modules_dep(dep)
            for name in missing:
                if name in listed and tree.is_file(f"{modules_dir}/{listed[name]}"):
                    found.add(name)
    return found


def describe_kernel(tree: SourceTree, kver: str) -> Kernel:
    modules_dir = tree.resolve(f"/lib/modules/{kver}")
    if modules_dir is not None and not tree.is_dir(modules_dir):
        modules_dir = None
    config_path = tree.first_file([f"/boot/config-{kver}"] + ([f"{modules_dir}/config"] if modules_dir else []))
    config: dict[str, str] | None = None
    if config_path:
        config = parse_kernel_config(tree.read_text(config_path) or "")
    builtin: set[str] | None = None
    module_files: set[str] = set()
    if modules_dir:
        text = tree.read_text(f"{modules_dir}/modules.builtin")
        builtin = parse_modules_builtin(text) if text is not None else None
        module_files = _module_files(tree, modules_dir, VIRTIO_DRIVERS)
    states = {
        name: virtio_state(name, builtin=builtin, module_files=module_files, config=config) for name in VIRTIO_DRIVERS
    }
    if config is not None:
        for name, state in states.items():
            if config.get(VIRTIO_DRIVERS[name][0]) == "m" and state == "missing" and modules_dir:
                tree.warn(f"kernel {kver}: {name} is configured as a module but its file is missing")
    initrd = tree.first_file(
        [f"/boot/initramfs-{kver}.img", f"/boot/initrd.img-{kver}", f"/boot/initrd-{kver}.img", f"/boot/initrd-{kver}"]
    )
    return Kernel(
        version=kver,
        vmlinuz=f"/boot/vmlinuz-{kver}",
        initrd=initrd,
        config=config_path,
        modules_dir=modules_dir,
        debug=is_debug_kernel(kver),
        rescue=kver.startswith("0-rescue-"),
        virtio=VirtioSupport(**states),
    )


def describe_kernels(tree: SourceTree) -> tuple[Kernel, ...]:
    versions = [
        name.removeprefix("vmlinuz-")
        for name in tree.listdir("/boot")
        if name.startswith("vmlinuz-")
        and len(name) > 8
        and not name.endswith(".hmac")
        and tree.is_file(f"/boot/{name}")
    ]
    if not versions:
        tree.warn("/boot holds no vmlinuz-<version>: no kernel found")
    kernels = [describe_kernel(tree, kver) for kver in versions]
    return tuple(sorted(kernels, key=lambda k: version_key(k.version), reverse=True))


_INITRD_TOOL_PATHS: Mapping[InitrdToolName, tuple[str, ...]] = {
    "dracut": ("/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut"),
    "initramfs-tools": ("/usr/sbin/mkinitramfs", "/usr/sbin/update-initramfs", "/etc/initramfs-tools"),
    "mkinitrd": ("/sbin/mkinitrd", "/usr/sbin/mkinitrd", "/usr/bin/mkinitrd"),
}


def _dracut_conf_files(tree: SourceTree) -> list[str]:
    """dracut.conf, then conf.d files from /usr/lib and /etc by name (/etc wins)."""
    by_name: dict[str, str] = {}
    for directory in ("/usr/lib/dracut/dracut.conf.d", "/etc/dracut.conf.d"):
        for path in tree.files(directory, "*.conf"):
            by_name[path.rsplit("/", 1)[-1]] = path
    head = ["/etc/dracut.conf"] if tree.is_file("/etc/dracut.conf") else []
    return head + [by_name[name] for name in sorted(by_name)]


def preferred_kernel(kernels: Sequence[Kernel]) -> Kernel | None:
    """The kernel to boot on KVM (virt-v2v's rule): virtio disk support first, then
    not debug, not rescue, then the newest."""
    candidates = [k for k in kernels if not k.rescue]
    if not candidates:
        return None
    return max(candidates, key=lambda k: (k.virtio.disk_ready, not k.debug, version_key(k.version)))


def describe_initrd_tooling(tree: SourceTree) -> InitrdTooling:
    tools: list[InitrdToolName] = []
    paths: list[str] = []
    for tool, candidates in _INITRD_TOOL_PATHS.items():
        hit = next((p for p in candidates if tree.exists(p)), None)
        if hit:
            tools.append(tool)
            paths.append(tree.resolve(hit) or hit)
    chosen = tools[0] if tools else None
    if chosen is None:
        tree.warn("no initrd tool found (dracut, initramfs-tools or mkinitrd)")
    version = None
    hostonly: bool | None = None
    if "dracut" in tools:
        for path in ("/usr/lib/dracut/dracut-version.sh", "/usr/share/dracut/dracut-version.sh"):
            text = tree.read_text(path)
            if text is not None:
                version = parse_shell_vars(text)[0].get("DRACUT_VERSION") or None
                break
        for path in _dracut_conf_files(tree):
            values, problems = parse_shell_vars(tree.read_text(path) or "")
            for problem in problems:
                tree.warn(f"{path}: {problem}")
            if "hostonly" in values:
                hostonly = _bool(values["hostonly"])
    modules = None
    if "initramfs-tools" in tools:
        for path in ["/etc/initramfs-tools/initramfs.conf", *tree.files("/etc/initramfs-tools/conf.d")]:
            values, _ = parse_shell_vars(tree.read_text(path) or "")
            modules = values.get("MODULES", modules)
    return InitrdTooling(
        tool=chosen,
        tools=tuple(sorted(tools)),
        paths=tuple(sorted(paths)),
        version=version,
        dracut_hostonly=hostonly,
        initramfs_modules=modules,
    )


_EFI_LOADERS = re.compile(r"^(grub.*|shim.*|boot(x64|ia32|aa64)|elilo)\.efi$", re.IGNORECASE)


def describe_bootloader(tree: SourceTree, mountpoints: Sequence[str]) -> Bootloader:
    """grub2, grub legacy or extlinux; `mountpoints` are the fstab's (for the ESP)."""
    efi_binaries: list[str] = []
    efi_configs: list[str] = []
    for vendor in tree.listdir("/boot/efi/EFI"):
        directory = f"/boot/efi/EFI/{vendor}"
        for name in tree.listdir(directory):
            if _EFI_LOADERS.match(name) and tree.is_file(f"{directory}/{name}"):
                efi_binaries.append(f"{directory}/{name}")
            if name in ("grub.cfg", "grub.conf") and tree.is_file(f"{directory}/{name}"):
                efi_configs.append(f"{directory}/{name}")
    esp_mountpoint = next((m for m in mountpoints if m.rstrip("/") in ("/boot/efi", "/efi")), None)
    firmware: Firmware = "uefi" if efi_binaries or esp_mountpoint else "bios"

    # grub2 configurations: parse all, pick the one grub reads.
    grub2: dict[str, Grub2Config] = {}
    bios_paths = ("/boot/grub2/grub.cfg", "/boot/grub/grub.cfg")
    for path in (*bios_paths, *(p for p in efi_configs if p.endswith(".cfg"))):
        text = tree.read_text(path)
        if text is None:
            continue
        parsed, problems = parse_grub2_cfg(text, path)
        for problem in problems:
            tree.warn(f"{path}: {problem}")
        grub2[path] = parsed
    real = [p for p, c in grub2.items() if not c.stub]
    efi_real = [p for p in real if p.startswith("/boot/efi/")]
    grub2_main = (efi_real[0] if firmware == "uefi" and efi_real else None) or next(iter(real), None)

    legacy_path = tree.first_file(
        ["/boot/grub/grub.conf", "/boot/grub/menu.lst", *(p for p in efi_configs if p.endswith(".conf"))]
    )
    if legacy_path and firmware == "uefi":
        efi_legacy = [p for p in efi_configs if p.endswith(".conf")]
        legacy_path = efi_legacy[0] if efi_legacy else legacy_path

    defaults_file = "/etc/default/grub" if tree.is_file("/etc/default/grub") else None
    defaults: dict[str, str] = {}
    if defaults_file:
        values, problems = parse_shell_vars(tree.read_text(defaults_file) or "")
        for problem in problems:
            tree.warn(f"{defaults_file}: {problem}")
        defaults = {k: v for k, v in values.items() if k.startswith("GRUB_")}

    grubenv_file = next(
        (
            p
            for p in (
                "/boot/grub2/grubenv",
                "/boot/grub/grubenv",
                *(c.rsplit("/", 1)[0] + "/grubenv" for c in efi_configs),
            )
            if tree.is_file(p)
        ),
        None,
    )
    grubenv = parse_grubenv(tree.read_text(grubenv_file) or "") if grubenv_file else {}
    kernel_cmdline_text = tree.read_text("/etc/kernel/cmdline")
    kernel_cmdline = tuple(kernel_cmdline_text.split()) if kernel_cmdline_text is not None else None

    kind: BootloaderKind = "unknown"
    config: str | None = None
    entries: tuple[BootEntry, ...] = ()
    default: str | None = None
    default_index: int | None = None
    bls = False
    if grub2_main is not None:
        kind, config = "grub2", grub2_main
        if legacy_path:
            tree.warn(f"both grub2 ({grub2_main}) and grub legacy ({legacy_path}) configs: using grub2")
        parsed = grub2[grub2_main]
        entries, top_level = parsed.entries, parsed.top_level
        bls = parsed.uses_blscfg or _bool(defaults.get("GRUB_ENABLE_BLSCFG")) is True
        if bls:
            bls_entries = [bls_entry(tree.read_text(p) or "", p) for p in tree.files("/boot/loader/entries", "*.conf")]
            # grub2's blscfg lists the newest version first, where the blscfg command is.
            bls_entries.sort(key=lambda e: version_key(e.kernel_version or e.id or ""), reverse=True)
            at = parsed.blscfg_at if parsed.blscfg_at is not None else len(entries)
            top = parsed.blscfg_top if parsed.blscfg_top is not None else len(top_level)
            count = len(bls_entries)
            entries = (*entries[:at], *bls_entries, *entries[at:])
            top_level = (
                *top_level[:top],
                *range(at, at + count),
                *(i + count if i >= at else i for i in top_level[top:]),
            )
        candidates = [d for d in parsed.defaults if "next_entry" not in d]
        default = candidates[-1] if candidates else None
        if default in ("${saved_entry}", "$saved_entry"):
            default = grubenv.get("saved_entry") or None
        default_index = resolve_default(default, entries, top_level)
    elif legacy_path is not None:
        kind, config = "grub-legacy", legacy_path
        legacy, problems = parse_grub_legacy(tree.read_text(legacy_path) or "", legacy_path)
        for problem in problems:
            tree.warn(f"{legacy_path}: {problem}")
        entries, default = legacy.entries, legacy.default
        default_index = resolve_default(default, entries, range(len(entries))) if default != "saved" else None
    elif tree.first_file(["/boot/extlinux/extlinux.conf", "/boot/extlinux.conf", "/boot/syslinux/syslinux.cfg"]):
        kind = "extlinux"
        config = tree.first_file(["/boot/extlinux/extlinux.conf", "/boot/extlinux.conf", "/boot/syslinux/syslinux.cfg"])
        tree.warn(f"bootloader extlinux ({config}) is not supported: entries not read")
    else:
        tree.warn("no bootloader configuration found (grub.cfg, grub.conf, menu.lst)")

    configs = sorted({*grub2, *([legacy_path] if legacy_path else []), *efi_configs, *([config] if config else [])})
    links = []
    for path in (
        "/etc/grub.conf",
        "/boot/grub/menu.lst",
        "/boot/grub/grub.conf",
        "/etc/grub2.cfg",
        "/etc/grub2-efi.cfg",
        "/etc/sysconfig/grub",
        "/boot/grub2/grubenv",
    ):
        if tree.is_symlink(path):
            target = tree.resolve(path)
            if target is not None:
                links.append(Link(path, target))
            else:
                tree.warn(f"{path}: dangling symbolic link")
    return Bootloader(
        kind=kind,
        firmware=firmware,
        config_path=config,
        configs=tuple(configs),
        efi_binaries=tuple(sorted(efi_binaries)),
        esp_mountpoint=esp_mountpoint,
        bls=bls,
        entries=entries,
        default=default,
        default_index=default_index,
        defaults_file=defaults_file,
        defaults=dict(sorted(defaults.items())),
        cmdline_linux=tuple(defaults.get("GRUB_CMDLINE_LINUX", "").split()),
        cmdline_linux_default=tuple(defaults.get("GRUB_CMDLINE_LINUX_DEFAULT", "").split()),
        kernel_cmdline=kernel_cmdline,
        grubenv_file=grubenv_file,
        grubenv=dict(sorted(grubenv.items())),
        links=tuple(links),
    )


def guess_boot_sector(data: bytes) -> Literal["grub", "lilo"] | None:
    """What the first sectors of a disk say (ReaR's guess: 'GRUB' or 'LILO' in the first 2 KiB)."""
    head = data[:2048]
    if b"GRUB" in head:
        return "grub"
    if b"LILO" in head:
        return "lilo"
    return None


def combine_bootloader(tree_guess: Bootloader, sector: Literal["grub", "lilo"] | None) -> tuple[str, list[str]]:
    """Combine the tree's bootloader with the disk's boot sector guess: (kind, warnings).

    The boot sector cannot tell grub legacy from grub2 (both stage 1 images say
    "GRUB"); the tree can. The boot sector tells whether the disk really boots
    with it.
    """
    warnings: list[str] = []
    if sector == "lilo":
        warnings.append("the disk boots with LILO, which p2v does not convert; grub will be installed instead")
        return "lilo", warnings
    if sector == "grub":
        if tree_guess.kind == "unknown":
            warnings.append("the disk has GRUB boot code but the tree has no grub configuration")
        return tree_guess.kind, warnings
    if tree_guess.firmware == "bios":
        warnings.append(
            "no GRUB boot code in the first 2 KiB of the disk: the server may boot from another disk "
            "or from a partition boot record"
        )
    return tree_guess.kind, warnings


def describe_network(tree: SourceTree) -> NetworkConfig:
    styles: set[NetStyle] = set()
    interfaces: list[Interface] = []
    bindings: list[MacBinding] = []
    files: list[str] = []

    def warn_all(path: str, problems: Iterable[str]) -> None:
        for problem in problems:
            tree.warn(f"{path}: {problem}")

    def ignored(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return name.startswith(".") or name.endswith(_IGNORED_SUFFIXES)

    # ifcfg
    scripts = "/etc/sysconfig/network-scripts"
    ifcfg_drafts: list[Interface] = []
    for path in tree.files(scripts, "ifcfg-*"):
        if ignored(path):
            continue
        text = tree.read_text(path)
        if text is None:
            continue
        files.append(path)
        styles.add("ifcfg")
        iface, found, problems = parse_ifcfg(text, path)
        warn_all(path, problems)
        bindings.extend(found)
        if iface is None:
            continue
        routes: list[Route] = list(iface.routes)
        for prefix in ("route", "route6"):
            route_path = f"{scripts}/{prefix}-{iface.name}"
            route_text = tree.read_text(route_path)
            if route_text is not None:
                files.append(route_path)
                parsed, problems = parse_route_file(route_text)
                warn_all(route_path, problems)
                routes.extend(parsed)
        ifcfg_drafts.append(_replace_routes(iface, routes))
    interfaces.extend(_with_members(ifcfg_drafts))
    gateway = None
    network_text = tree.read_text("/etc/sysconfig/network")
    if network_text is not None:
        files.append("/etc/sysconfig/network")
        values, problems = parse_shell_vars(network_text)
        warn_all("/etc/sysconfig/network", problems)
        gateway = values.get("GATEWAY") or None

    # udev
    for path in tree.files("/etc/udev/rules.d", "*.rules"):
        text = tree.read_text(path)
        if text is None or "address" not in text:
            continue
        found_rules = parse_udev_net_rules(text, path)
        if found_rules:
            files.append(path)
            bindings.extend(found_rules)

    # NetworkManager keyfiles
    profiles: list[_NMProfile] = []
    for directory in ("/etc/NetworkManager/system-connections", "/usr/lib/NetworkManager/system-connections"):
        for path in tree.files(directory):
            if ignored(path):
                continue
            text = tree.read_text(path)
            if text is None:
                continue
            files.append(path)
            styles.add("NetworkManager")
            profile, problems = parse_nm_keyfile(text, path)
            warn_all(path, problems)
            if profile is not None:
                profiles.append(profile)
                bindings.extend(profile.bindings)
    interfaces.extend(_nm_interfaces(profiles))

    # netplan
    netplan_files: dict[str, str] = {}
    for directory in ("/lib/netplan", "/etc/netplan"):  # /etc shadows /lib by name
        for path in tree.files(directory, "*.yaml"):
            netplan_files[path.rsplit("/", 1)[-1]] = path
    documents: list[dict[str, Any]] = []
    owners: dict[str, str] = {}
    for name in sorted(netplan_files):
        path = netplan_files[name]
        text = tree.read_text(path)
        if text is None:
            continue
        files.append(path)
        styles.add("netplan")
        document, problems = parse_netplan_yaml(text)
        warn_all(path, problems)
        if document is None:
            continue
        documents.append(document)
        bindings.extend(netplan_bindings(document, path))
        for ident in netplan_names(document):
            owners.setdefault(ident, path)
    if documents:
        merged = merge_netplan(documents)
        found_ifaces, problems = netplan_interfaces(merged, owners)
        warn_all("netplan", problems)
        interfaces.extend(found_ifaces)

    # systemd-networkd (admin configuration only: /usr/lib's defaults bind nothing)
    networkd: list[_Draft] = []
    for pattern in ("*.network", "*.netdev", "*.link"):
        for path in tree.files("/etc/systemd/network", pattern):
            text = tree.read_text(path)
            if text is None:
                continue
            files.append(path)
            draft, found, problems = parse_networkd(text, path)
            warn_all(path, problems)
            bindings.extend(found)
            if draft is not None:  # .link files are udev's, not networkd's
                styles.add("systemd-networkd")
                networkd.append(draft)
    interfaces.extend(_networkd_interfaces(networkd))

    # ifupdown
    stanzas: list[tuple[str, IfupdownStanza]] = []
    if tree.is_file("/etc/network/interfaces"):
        styles.add("ifupdown")
        _read_ifupdown(tree, "/etc/network/interfaces", stanzas, files, depth=0)
    if stanzas:
        found_ifaces, found, problems = ifupdown_interfaces(stanzas)
        warn_all("/etc/network/interfaces", problems)
        bindings.extend(found)
        interfaces.extend(found_ifaces)

    return NetworkConfig(
        styles=tuple(sorted(styles)),
        interfaces=tuple(sorted(interfaces, key=lambda i: (i.style, i.name, i.file))),
        mac_bindings=tuple(sorted(set(bindings), key=lambda b: (b.file, b.interface or "", b.kind, b.mac))),
        gateway=gateway,
        files=tuple(sorted(set(files))),
    )


def _replace_routes(iface: Interface, routes: Sequence[Route]) -> Interface:
    return Interface(**{**{f.name: getattr(iface, f.name) for f in fields(iface)}, "routes": tuple(routes)})


def _thaw(iface: Interface) -> _Draft:
    values: dict[str, Any] = {f.name: getattr(iface, f.name) for f in fields(iface)}
    for key in ("addresses", "routes", "dns", "members", "bond_options"):
        values[key] = list(values[key])
    return _Draft(**values)


def _with_members(interfaces: Sequence[Interface]) -> list[Interface]:
    drafts = [_thaw(i) for i in interfaces]
    _link_members(drafts)
    return [d.freeze() for d in drafts]


def _nm_interfaces(profiles: Sequence[_NMProfile]) -> list[Interface]:
    """Resolve master= and vlan parent= that name a profile (uuid or id) to its device."""
    names: dict[str, str] = {}
    for profile in profiles:
        if profile.uuid:
            names[profile.uuid] = profile.draft.name
        if profile.draft.profile:
            names.setdefault(profile.draft.profile, profile.draft.name)
    drafts = [profile.draft for profile in profiles]
    for draft in drafts:
        if draft.master:
            draft.master = names.get(draft.master, draft.master)
        if draft.vlan_parent:
            draft.vlan_parent = names.get(draft.vlan_parent, draft.vlan_parent)
    _link_members(drafts)
    return [d.freeze() for d in drafts]


def _networkd_interfaces(drafts: Sequence[_Draft]) -> list[Interface]:
    """Merge each .netdev with the .network that configures it; wire VLANs to their parent."""
    by_name: dict[str, _Draft] = {}
    ordered: list[_Draft] = []
    for draft in sorted(drafts, key=lambda d: d.file.endswith(".network")):
        existing = by_name.get(draft.name)
        if existing is None:
            by_name[draft.name] = draft
            ordered.append(draft)
            continue
        # a .network for a .netdev: keep the netdev's kind, add the addressing
        existing.addresses += draft.addresses
        existing.gateway = existing.gateway or draft.gateway
        existing.dns += draft.dns
        existing.routes += draft.routes
        existing.method = draft.method
        existing.master = existing.master or draft.master
        existing.carried_vlans += draft.carried_vlans
    for draft in ordered:
        for vlan in draft.carried_vlans:
            if vlan in by_name:
                by_name[vlan].vlan_parent = draft.name
    _link_members(ordered)
    return [d.freeze() for d in ordered]


_SOURCE_DIRECTORY_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")


def _read_ifupdown(
    tree: SourceTree, path: str, stanzas: list[tuple[str, IfupdownStanza]], files: list[str], depth: int
) -> None:
    if depth > 8:
        tree.warn(f"{path}: 'source' nested too deep (ignored)")
        return
    text = tree.read_text(path)
    if text is None:
        return
    files.append(path)
    directory = path.rsplit("/", 1)[0] or "/"
    for stanza in parse_interfaces(text):
        if stanza.keyword in ("source", "source-directory", "source-dir"):
            for pattern in stanza.args:
                target = pattern if pattern.startswith("/") else f"{directory}/{pattern}"
                if stanza.keyword == "source":
                    parent, _, glob = target.rpartition("/")
                    if any(c in parent for c in "*?["):
                        tree.warn(f"{path}: source {pattern}: wildcards in directories are not followed")
                        continue
                    included = tree.files(parent or "/", glob) if any(c in glob for c in "*?[") else [target]
                else:
                    included = [p for p in tree.files(target) if _SOURCE_DIRECTORY_NAME.match(p.rsplit("/", 1)[-1])]
                for include in included:
                    _read_ifupdown(tree, include, stanzas, files, depth + 1)
            continue
        stanzas.append((path, stanza))


def describe_hostname(tree: SourceTree) -> str | None:
    text = tree.read_text("/etc/hostname")
    if text is not None and parse_hostname(text):
        return parse_hostname(text)
    network = tree.read_text("/etc/sysconfig/network")
    if network is not None:
        name = parse_shell_vars(network)[0].get("HOSTNAME")
        if name:
            return name
    text = tree.read_text("/etc/HOSTNAME")
    return parse_hostname(text) if text is not None else None


def describe_cloud_init(tree: SourceTree) -> CloudInit:
    installed = tree.exists("/usr/bin/cloud-init") or tree.is_file("/etc/cloud/cloud.cfg")
    disabled = False
    datasources: tuple[str, ...] | None = None
    for path in ["/etc/cloud/cloud.cfg", *tree.files("/etc/cloud/cloud.cfg.d", "*.cfg")]:
        text = tree.read_text(path)
        if text is None:
            continue
        document, problems = parse_netplan_yaml(text)  # same loader: plain strings
        for problem in problems:
            tree.warn(f"{path}: {problem}")
        if not document:
            continue
        network = _as_map(document.get("network"))
        if "config" in network:
            disabled = network.get("config") == "disabled"
        if "datasource_list" in document:
            datasources = tuple(str(d) for d in _as_list(document["datasource_list"]))
    return CloudInit(installed=installed, network_disabled=disabled, datasources=datasources)


def describe_package_manager(tree: SourceTree) -> PackageManager | None:
    for path, name in (
        ("/usr/bin/dnf", "dnf"),
        ("/usr/bin/dnf-3", "dnf"),
        ("/usr/bin/yum", "yum"),
        ("/usr/bin/apt-get", "apt"),
        ("/usr/bin/zypper", "zypper"),
    ):
        if tree.exists(path):
            return typing.cast(PackageManager, name)
    return None


def describe_machine_id(tree: SourceTree) -> MachineIdState:
    text = tree.read_text("/etc/machine-id")
    if text is None:
        return "missing"
    value = text.strip()
    if not value:
        return "empty"
    if value == "uninitialized":
        return "uninitialized"
    return "present"


def describe_system(root: Path) -> SystemDescription:
    """Describe the OS installed in the tree at `root` (read-only)."""
    tree = SourceTree(root)
    os_identity = describe_os(tree)
    # fstab itself is inspect's (tasks/lib/fstab.py); here it only shows an ESP.
    mountpoints: list[str] = []
    fstab_text = tree.read_text("/etc/fstab")
    if fstab_text is None:
        tree.warn("/etc/fstab is missing")
    else:
        mountpoints = [entry.file for entry in parse_fstab(fstab_text)[0]]
    selinux_text = tree.read_text("/etc/selinux/config")
    selinux, selinux_type = parse_selinux_config(selinux_text) if selinux_text is not None else ("disabled", None)
    description = SystemDescription(
        os=os_identity,
        hostname=describe_hostname(tree),
        kernels=describe_kernels(tree),
        initrd=describe_initrd_tooling(tree),
        bootloader=describe_bootloader(tree, mountpoints),
        network=describe_network(tree),
        selinux=selinux,
        selinux_type=selinux_type,
        package_manager=describe_package_manager(tree),
        cloud_init=describe_cloud_init(tree),
        qemu_guest_agent=tree.exists("/usr/bin/qemu-ga"),
        machine_id=describe_machine_id(tree),
        merged_usr=tree.is_symlink("/lib") and tree.resolve("/lib") == "/usr/lib",
        warnings=(),
    )
    return _with_warnings(description, tree.warnings)


def _with_warnings(description: SystemDescription, warnings: Sequence[str]) -> SystemDescription:
    values = {f.name: getattr(description, f.name) for f in fields(description)}
    values["warnings"] = tuple(sorted(set(warnings)))
    return SystemDescription(**values)


# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------


def to_json(value: object) -> Any:
    """Plain data (dicts, lists, str, int, bool, None) with sorted keys."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in sorted(fields(value), key=lambda f: f.name)}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in sorted(value.items())}
    return value


T = TypeVar("T")


def from_json(cls: type[T], data: Any) -> T:
    """Rebuild a dataclass (e.g. SystemDescription) from `to_json` output."""
    return typing.cast(T, _from_json(cls, data, "$"))


def _from_json(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}")
        hints = typing.get_type_hints(tp)
        values = {}
        for f in fields(tp):
            if f.name not in data:
                raise ValueError(f"{where}.{f.name}: missing")
            values[f.name] = _from_json(hints[f.name], data[f.name], f"{where}.{f.name}")
        return tp(**values)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_json(arg, data, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or f"{where}: unexpected null")
    if origin is Literal:
        if data not in typing.get_args(tp):
            raise ValueError(f"{where}: {data!r} is not one of {typing.get_args(tp)}")
        return data
    if origin is tuple:
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list")
        item = typing.get_args(tp)[0]
        return tuple(_from_json(item, v, f"{where}[{i}]") for i, v in enumerate(data))
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object")
        value_type = typing.get_args(tp)[1]
        return {str(k): _from_json(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if tp is bool:
        if not isinstance(data, bool):
            raise ValueError(f"{where}: expected true or false")
        return data
    if tp is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise ValueError(f"{where}: expected an integer")
        return data
    if tp is str:
        if not isinstance(data, str):
            raise ValueError(f"{where}: expected a string")
        return data
    raise ValueError(f"{where}: cannot read type {tp!r}")
