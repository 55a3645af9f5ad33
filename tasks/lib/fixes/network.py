"""Network configuration on virtio: no MAC binding left, interface names kept.

On OpenStack the NIC is a virtio NIC with the Neutron port's MAC, so:

- Every binding inspect found goes, the ones that *match* a NIC by MAC (ifcfg
  HWADDR, udev persistent-net rules, NetworkManager `[ethernet] mac-address`,
  netplan `match: macaddress`, networkd `[Match] MACAddress=`) and the ones
  that *set* a MAC (ifcfg MACADDR, NetworkManager `cloned-mac-address`,
  netplan `macaddress`, networkd `MACAddress=` in [Link]/[NetDev], ifupdown
  `hwaddress`). A set MAC is removed too because Neutron's port security
  drops every frame whose source MAC is not the port's: a bond that forces
  the old server's MAC would be cut off. Without it, a bond takes its first
  port's MAC, which is the Neutron port's.
- Names stay what the configuration expects (see `decide_naming`).
- Addresses, routes, bonds and VLANs stay as they are (policy `keep`), or
  everything is replaced by DHCP on eth0 in the distribution's own style
  (policy `dhcp`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tasks.lib.distro import family_of_system
from tasks.lib.distro.base import LINK_DIR, NM_CONNECTIONS, SCRIPTS
from tasks.lib.fixes.model import Changes, TreeReader
from tasks.lib.formats.ifcfg import drop_ifcfg_macs
from tasks.lib.formats.ifupdown import drop_hwaddress
from tasks.lib.formats.netplan import drop_netplan_macs
from tasks.lib.formats.networkd import drop_networkd_macs
from tasks.lib.formats.nm_keyfile import drop_keyfile_macs
from tasks.lib.formats.shellvars import remove_shell_var
from tasks.lib.formats.udev import drop_udev_rules
from tasks.lib.source.model import MacBinding, NetworkConfig, SystemDescription
from tasks.lib.spec import FixPolicy

__all__ = ["LINK_DIR", "NM_CONNECTIONS", "SCRIPTS",
           "drop_hwaddress", "drop_ifcfg_macs", "drop_keyfile_macs", "drop_netplan_macs", "drop_networkd_macs",
           "drop_udev_rules"]  # their old home: tests import them from here

KERNEL_STYLE = re.compile(r"^eth\d+$")


@dataclass(frozen=True)
class Naming:
    """How the NIC names of the source stay valid on virtio."""

    pin_ifnames: bool  # net.ifnames=0 biosdevname=0 on the kernel command line
    link_name: str | None  # the one NIC's name, given to the virtio NIC by a systemd .link file
    nics: tuple[str, ...]  # the source's physical NIC names


def physical_nics(network: NetworkConfig) -> tuple[str, ...]:
    """Names of the source's Ethernet NICs: configured ones, and the ones bound by MAC."""
    names = {i.name for i in network.interfaces if i.kind == "ethernet"}
    names |= {b.interface for b in network.mac_bindings if b.action == "match" and b.interface}
    return tuple(sorted(n for n in names if n and " " not in n and n != "lo"))


def uses_systemd(tree: TreeReader, system: SystemDescription) -> bool:
    """systemd's binary in the tree, or else the distro family's word for the release."""
    if tree.exists("/usr/lib/systemd/systemd") or tree.exists("/lib/systemd/systemd"):
        return True
    return family_of_system(system).systemd_by_release()


def decide_naming(tree: TreeReader, system: SystemDescription, policy: FixPolicy) -> tuple[Naming, list[str]]:
    """(the naming, findings).

    - DHCP, or any kernel-style name (eth0): pin the kernel's names with
      net.ifnames=0 biosdevname=0. The virtio NICs are then eth0, eth1, ...
      in PCI order, which is what a configuration written for ethN expects.
    - One NIC with a predictable or custom name (ens192, enp3s0, lan0) on a
      systemd distribution: a .link file gives the virtio NIC that name.
    - Several NICs with such names: nothing can tell which virtio NIC was
      which (their PCI slots and MACs are new), so no guess: a finding says
      which configurations will not find their device.
    """
    nics = physical_nics(system.network)
    findings: list[str] = []
    if policy.network == "dhcp":
        return Naming(pin_ifnames=True, link_name=None, nics=nics), findings
    other = [n for n in nics if not KERNEL_STYLE.match(n)]
    pin = len(other) < len(nics)
    link_name = None
    if len(nics) == 1 and other:
        if uses_systemd(tree, system):
            link_name = other[0]
        else:
            findings.append(f"the NIC {other[0]} is not named by the kernel and this system has no systemd "
                            "to rename the virtio NIC: its configuration will not apply on KVM")
    elif other:
        findings.append(f"NICs {', '.join(nics)}: {', '.join(other)} cannot be mapped to virtio NICs (new PCI "
                        "slots and MACs); their configuration applies only if OpenStack's NIC gets that name"
                        + ("; kernel-style names are pinned with net.ifnames=0" if pin else ""))
    return Naming(pin_ifnames=pin, link_name=link_name, nics=nics), findings


# ---------------------------------------------------------------- MAC bindings, one format each
# Each format's module removes its own bindings; this step picks the module per file.


def _remove_bindings(changes: Changes, tree: TreeReader, network: NetworkConfig, naming: Naming,
                     skip: set[str]) -> None:
    by_file: dict[str, list[MacBinding]] = {}
    for binding in network.mac_bindings:
        by_file.setdefault(binding.file, []).append(binding)
    for path, bindings in sorted(by_file.items()):
        if path in skip:
            continue
        text = tree.read(path)
        if text is None:
            continue
        kinds = {b.kind for b in bindings}
        macs = {b.mac for b in bindings}
        shown = ", ".join(sorted(macs))
        new: str | None = text
        if kinds & {"HWADDR", "MACADDR"}:
            new = drop_ifcfg_macs(text)
        elif "udev-rule" in kinds:
            new = drop_udev_rules(text, macs)
        elif kinds & {"nm-mac-address", "nm-cloned-mac-address"}:
            new = drop_keyfile_macs(text)
        elif kinds & {"netplan-match", "netplan-macaddress"}:
            new, findings = drop_netplan_macs(text)
            for finding in findings:
                changes.note(f"{path}: {finding}")
        elif kinds & {"networkd-match", "networkd-link-match", "networkd-macaddress"}:
            names = {b.interface for b in bindings if b.interface}
            name = names.pop() if len(names) == 1 else (naming.nics[0] if len(naming.nics) == 1 else None)
            new, problem = drop_networkd_macs(text, path.endswith(".link"), name)
            if problem:
                changes.note(f"{path}: {problem}")
        elif "hwaddress" in kinds:
            new = drop_hwaddress(text, macs)
        if new is None:
            changes.delete(path, f"MAC binding ({shown}): the virtio NIC has the Neutron port's MAC")
        else:
            changes.write(path, new, f"MAC binding removed ({shown}): the virtio NIC has the Neutron port's MAC")


def link_file_text(name: str) -> str:
    # Driver= matches every virtio NIC: with a second NIC attached later, the
    # rename of the second one fails (the name is taken) and it keeps the
    # kernel's name, which is the best that can be done without a MAC.
    return (
        f"# Written by p2v: this server's only NIC was {name}. On OpenStack KVM it is a\n"
        f"# virtio NIC, which this names {name} again so that its configuration applies.\n"
        "[Match]\n"
        "Driver=virtio_net\n"
        "\n"
        "[Link]\n"
        f"Name={name}\n"
    )


def link_file_path(name: str) -> str:
    return f"{LINK_DIR}/10-p2v-{name}.link"


# ---------------------------------------------------------------- DHCP


def dhcp_style(system: SystemDescription) -> str:
    """The distribution's own way to configure eth0: what the source uses, else its family's default."""
    styles = system.network.styles
    for style in ("netplan", "NetworkManager", "ifcfg", "systemd-networkd", "ifupdown"):
        if style in styles:
            return style
    return family_of_system(system).default_network_style()


def _write_dhcp(changes: Changes, tree: TreeReader, system: SystemDescription, host: str) -> set[str]:
    family = family_of_system(system)
    style = dhcp_style(system)
    path, text, mode = family.dhcp_file(style, host)
    replaced = set(family.interface_files(system.network.files))
    for old in sorted(replaced - {path}):
        if old == "/etc/network/interfaces":
            changes.write(old, "# Written by p2v: see the network configuration of "
                          f"{style}\nauto lo\niface lo inet loopback\n", "network policy dhcp: loopback only")
        else:
            changes.delete(old, "network policy dhcp: replaced by DHCP on eth0")
    changes.write(path, text, f"network policy dhcp: DHCP on eth0 ({style})", mode)
    sysconfig = tree.read("/etc/sysconfig/network")
    if sysconfig is not None:
        changes.write("/etc/sysconfig/network", remove_shell_var(sysconfig, "GATEWAY"),
                      "network policy dhcp: the gateway comes from DHCP")
    return replaced | {path}


def fix_network(tree: TreeReader, system: SystemDescription, policy: FixPolicy, naming: Naming,
                host: str) -> Changes:
    changes = Changes(tree, "network")
    replaced: set[str] = set()
    if policy.network == "dhcp":
        replaced = _write_dhcp(changes, tree, system, host)
    _remove_bindings(changes, tree, system.network, naming, replaced)
    if naming.link_name is not None:
        changes.write(link_file_path(naming.link_name), link_file_text(naming.link_name),
                      f"the virtio NIC gets the name of the only source NIC, {naming.link_name}", 0o644)
    return changes

