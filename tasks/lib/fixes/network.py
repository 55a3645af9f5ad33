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
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from tasks.lib.fixes.model import Changes, TreeReader
from tasks.lib.fixes.text import remove_shell_var, with_newline
from tasks.lib.formats.netfields import normalize_mac
from tasks.lib.formats.netplan import parse_netplan_yaml
from tasks.lib.source.model import MacBinding, NetworkConfig, SystemDescription
from tasks.lib.spec import FixPolicy

KERNEL_STYLE = re.compile(r"^eth\d+$")
SCRIPTS = "/etc/sysconfig/network-scripts"
NM_CONNECTIONS = "/etc/NetworkManager/system-connections"
LINK_DIR = "/etc/systemd/network"


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
    if tree.exists("/usr/lib/systemd/systemd") or tree.exists("/lib/systemd/systemd"):
        return True
    major = system.os.major or 0
    return (system.os.family == "rhel" and major >= 7) or (system.os.id == "debian" and major >= 8) or \
        (system.os.id == "ubuntu" and major >= 16)


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


def drop_ifcfg_macs(text: str) -> str:
    return remove_shell_var(remove_shell_var(text, "HWADDR"), "MACADDR")


_UDEV_ADDRESS = re.compile(r'ATTRS?\{address\}\s*==\s*"([^"]*)"')


def drop_udev_rules(text: str, macs: set[str]) -> str | None:
    """The rules without those that match `macs`; None when no rule is left (delete the file)."""
    lines = text.splitlines()
    kept: list[str] = []
    for line in lines:
        found = _UDEV_ADDRESS.search(line)
        if found and not line.lstrip().startswith("#") and normalize_mac(found.group(1)) in macs:
            if kept and kept[-1].startswith("# PCI device"):
                kept.pop()  # write_net_rules' comment for the rule
            continue
        kept.append(line)
    if not any(line.strip() and not line.lstrip().startswith("#") for line in kept):
        return None
    return text if len(kept) == len(lines) else with_newline(kept)


_KEYFILE_MAC = re.compile(r"^\s*(?:cloned-)?mac-address\s*=\s*(.*)$")


def drop_keyfile_macs(text: str) -> str:
    """NetworkManager keyfile: mac-address / cloned-mac-address that name a MAC (not 'preserve' etc.)."""
    lines = text.splitlines()
    kept = [line for line in lines if not ((m := _KEYFILE_MAC.match(line)) and normalize_mac(m.group(1)))]
    return text if len(kept) == len(lines) else with_newline(kept)


_HWADDRESS = re.compile(r"^\s*hwaddress\s+(?:ether\s+)?(\S+)\s*$")


def drop_hwaddress(text: str, macs: set[str]) -> str:
    lines = text.splitlines()
    kept = [line for line in lines if not ((m := _HWADDRESS.match(line)) and normalize_mac(m.group(1)) in macs)]
    return text if len(kept) == len(lines) else with_newline(kept)


_INI_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_INI_KEY = re.compile(r"^\s*([A-Za-z]+)\s*=")


def drop_networkd_macs(text: str, is_link: bool, name: str | None) -> tuple[str | None, str | None]:
    """A networkd .network/.netdev or udev .link file without MACs: (text or None to delete, finding).

    A [Match] on MACAddress becomes a [Match] on Name= (the interface the
    binding named). A .link file that matched only by MAC existed to name
    that NIC: it goes, and `decide_naming` takes over its job.
    """
    lines = text.splitlines()
    section = ""
    match_keys: list[str] = []
    has_name = False
    for line in lines:
        header = _INI_SECTION.match(line)
        if header:
            section = header.group(1).strip()
            continue
        found = _INI_KEY.match(line)
        if found and section == "Match":
            match_keys.append(found.group(1))
            has_name = has_name or found.group(1) == "Name"
    mac_keys = {"MACAddress", "PermanentMACAddress"}
    if is_link and match_keys and set(match_keys) <= mac_keys:
        return None, None
    finding = None
    out: list[str] = []
    section = ""
    for line in lines:
        header = _INI_SECTION.match(line)
        if header:
            section = header.group(1).strip()
        found = _INI_KEY.match(line)
        key = found.group(1) if found else None
        if key in mac_keys and section == "Match":
            if not has_name and not is_link and set(match_keys) <= mac_keys:
                if name:
                    out.append(f"Name={name}")
                else:
                    out.append("Type=ether")
                    finding = "matched its NIC by MAC only and names none: it now applies to every Ethernet NIC"
                has_name = True
            continue
        if key == "MACAddress" and section in ("Link", "NetDev"):
            continue
        out.append(line)
    return (text if out == lines else with_newline(out)), finding


class _TextDumper(yaml.SafeDumper):
    """Writes every scalar as the text it is: netplan reads scalars as strings (see parse_netplan_yaml)."""


_TextDumper.yaml_implicit_resolvers = {}

_NETPLAN_SECTIONS = ("ethernets", "bonds", "bridges", "vlans", "wifis")


def drop_netplan_macs(text: str) -> tuple[str, list[str]]:
    """netplan without MACs: (new text, findings); the text is unchanged when there is none.

    `match: {macaddress: M}` with `set-name: N` becomes the plain id N (netplan
    configures the interface of that name), and every reference to the old id
    (bond and bridge members, VLAN links) follows. Without set-name the id
    keeps configuring whatever interface has its name, which a finding says.
    """
    document, problems = parse_netplan_yaml(text)
    if document is None:
        return text, [f"not rewritten: {p}" for p in problems]
    network = document.get("network")
    if not isinstance(network, dict):
        return text, []
    findings: list[str] = []
    renames: dict[str, str] = {}
    changed = False
    for section in _NETPLAN_SECTIONS:
        configs = network.get(section)
        if not isinstance(configs, dict):
            continue
        for ident, config in configs.items():
            if not isinstance(config, dict):
                continue
            if "macaddress" in config:
                del config["macaddress"]
                changed = True
            match = config.get("match")
            if not (isinstance(match, dict) and "macaddress" in match):
                continue
            del match["macaddress"]
            changed = True
            if match:
                continue  # still matched by driver or name: set-name stays valid
            del config["match"]
            new_name = config.pop("set-name", None)
            if isinstance(new_name, str) and new_name != ident:
                if new_name in configs:
                    findings.append(f"{ident}: set-name {new_name} is also an id; left under the id {ident}")
                else:
                    renames[ident] = new_name
            elif new_name is None:
                findings.append(f"{ident} matched its NIC by MAC without set-name: it now configures the "
                                f"interface named {ident}")
        if renames:
            network[section] = {renames.get(k, k): v for k, v in configs.items()}
    if not changed:
        return text, findings
    for section in _NETPLAN_SECTIONS:
        for config in (network.get(section) or {}).values():
            if not isinstance(config, dict):
                continue
            if isinstance(config.get("interfaces"), list):
                config["interfaces"] = [renames.get(m, m) for m in config["interfaces"]]
            if isinstance(config.get("link"), str):
                config["link"] = renames.get(config["link"], config["link"])
    head = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    head.append("# p2v: MAC matches removed for the virtio NICs of OpenStack")
    body = yaml.dump(document, Dumper=_TextDumper, default_flow_style=False, sort_keys=False, indent=2)
    return with_newline(head) + body, findings


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
    """The distribution's own way to configure eth0, from what the source uses."""
    styles = system.network.styles
    for style in ("netplan", "NetworkManager", "ifcfg", "systemd-networkd", "ifupdown"):
        if style in styles:
            return style
    if system.os.family == "rhel":
        return "NetworkManager" if (system.os.major or 0) >= 9 else "ifcfg"
    return "ifupdown"


def _dhcp_config(style: str, host: str) -> tuple[str, str, int]:
    """(path, text, mode) of DHCP on eth0 in `style`."""
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


def _interface_configs(files: Iterable[str]) -> list[str]:
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


def _write_dhcp(changes: Changes, tree: TreeReader, system: SystemDescription, host: str) -> set[str]:
    style = dhcp_style(system)
    path, text, mode = _dhcp_config(style, host)
    replaced = set(_interface_configs(system.network.files))
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

