"""`describe_system`: the whole description of a tree, and the small describers
(hostname, SELinux, cloud-init, package manager, machine-id).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from tasks.lib.formats.netplan import as_list, as_map, parse_netplan_yaml
from tasks.lib.formats.shellvars import parse_shell_vars
from tasks.lib.fstab import parse_fstab
from tasks.lib.source.boot import describe_bootloader
from tasks.lib.source.kernels import describe_initrd_tooling, describe_kernels
from tasks.lib.source.model import CloudInit, MachineIdState, PackageManager, SELinuxMode, SystemDescription
from tasks.lib.source.network import describe_network
from tasks.lib.source.os import describe_os
from tasks.lib.source.tree import SourceTree


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
        network = as_map(document.get("network"))
        if "config" in network:
            disabled = network.get("config") == "disabled"
        if "datasource_list" in document:
            datasources = tuple(str(d) for d in as_list(document["datasource_list"]))
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
