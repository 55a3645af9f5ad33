"""The network configuration of a tree: every style's files, interfaces and MAC bindings."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tasks.lib.formats.ifcfg import IGNORED_SUFFIXES, parse_ifcfg, parse_route_file
from tasks.lib.formats.ifupdown import IfupdownStanza, ifupdown_interfaces, parse_interfaces
from tasks.lib.formats.netfields import InterfaceDraft, link_members
from tasks.lib.formats.netplan import (
    merge_netplan,
    netplan_bindings,
    netplan_interfaces,
    netplan_names,
    parse_netplan_yaml,
)
from tasks.lib.formats.networkd import parse_networkd
from tasks.lib.formats.nm_keyfile import NMProfile, parse_nm_keyfile
from tasks.lib.formats.shellvars import parse_shell_vars
from tasks.lib.formats.udev import parse_udev_net_rules
from tasks.lib.source.model import Interface, MacBinding, NetStyle, NetworkConfig, Route
from tasks.lib.source.tree import SourceTree


@dataclass
class _Found:
    """What the readers of each network style found so far (one per `describe_network`)."""

    tree: SourceTree
    styles: set[NetStyle] = field(default_factory=set)
    interfaces: list[Interface] = field(default_factory=list)
    bindings: list[MacBinding] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    gateway: str | None = None

    def warn_all(self, path: str, problems: Iterable[str]) -> None:
        for problem in problems:
            self.tree.warn(f"{path}: {problem}")


def _ignored(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def describe_network(tree: SourceTree) -> NetworkConfig:
    found = _Found(tree)
    _read_ifcfg(found)
    _read_udev(found)
    _read_nm_keyfiles(found)
    _read_netplan(found)
    _read_networkd(found)
    _read_ifupdown_config(found)
    return NetworkConfig(
        styles=tuple(sorted(found.styles)),
        interfaces=tuple(sorted(found.interfaces, key=lambda i: (i.style, i.name, i.file))),
        mac_bindings=tuple(sorted(set(found.bindings), key=lambda b: (b.file, b.interface or "", b.kind, b.mac))),
        gateway=found.gateway,
        files=tuple(sorted(set(found.files))),
    )


def _read_ifcfg(found: _Found) -> None:
    tree = found.tree
    scripts = "/etc/sysconfig/network-scripts"
    ifcfg_drafts: list[Interface] = []
    for path in tree.files(scripts, "ifcfg-*"):
        if _ignored(path):
            continue
        text = tree.read_text(path)
        if text is None:
            continue
        found.files.append(path)
        found.styles.add("ifcfg")
        iface, bound, problems = parse_ifcfg(text, path)
        found.warn_all(path, problems)
        found.bindings.extend(bound)
        if iface is None:
            continue
        routes: list[Route] = list(iface.routes)
        for prefix in ("route", "route6"):
            route_path = f"{scripts}/{prefix}-{iface.name}"
            route_text = tree.read_text(route_path)
            if route_text is not None:
                found.files.append(route_path)
                parsed, problems = parse_route_file(route_text)
                found.warn_all(route_path, problems)
                routes.extend(parsed)
        ifcfg_drafts.append(_replace_routes(iface, routes))
    found.interfaces.extend(_with_members(ifcfg_drafts))
    network_text = tree.read_text("/etc/sysconfig/network")
    if network_text is not None:
        found.files.append("/etc/sysconfig/network")
        values, problems = parse_shell_vars(network_text)
        found.warn_all("/etc/sysconfig/network", problems)
        found.gateway = values.get("GATEWAY") or None


def _read_udev(found: _Found) -> None:
    tree = found.tree
    for path in tree.files("/etc/udev/rules.d", "*.rules"):
        text = tree.read_text(path)
        if text is None or "address" not in text:
            continue
        found_rules = parse_udev_net_rules(text, path)
        if found_rules:
            found.files.append(path)
            found.bindings.extend(found_rules)


def _read_nm_keyfiles(found: _Found) -> None:
    tree = found.tree
    profiles: list[NMProfile] = []
    for directory in ("/etc/NetworkManager/system-connections", "/usr/lib/NetworkManager/system-connections"):
        for path in tree.files(directory):
            if _ignored(path):
                continue
            text = tree.read_text(path)
            if text is None:
                continue
            found.files.append(path)
            found.styles.add("NetworkManager")
            profile, problems = parse_nm_keyfile(text, path)
            found.warn_all(path, problems)
            if profile is not None:
                profiles.append(profile)
                found.bindings.extend(profile.bindings)
    found.interfaces.extend(_nm_interfaces(profiles))


def _read_netplan(found: _Found) -> None:
    tree = found.tree
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
        found.files.append(path)
        found.styles.add("netplan")
        document, problems = parse_netplan_yaml(text)
        found.warn_all(path, problems)
        if document is None:
            continue
        documents.append(document)
        found.bindings.extend(netplan_bindings(document, path))
        for ident in netplan_names(document):
            owners.setdefault(ident, path)
    if documents:
        merged = merge_netplan(documents)
        found_ifaces, problems = netplan_interfaces(merged, owners)
        found.warn_all("netplan", problems)
        found.interfaces.extend(found_ifaces)


def _read_networkd(found: _Found) -> None:
    """Admin configuration only: /usr/lib's defaults bind nothing."""
    tree = found.tree
    networkd: list[InterfaceDraft] = []
    for pattern in ("*.network", "*.netdev", "*.link"):
        for path in tree.files("/etc/systemd/network", pattern):
            text = tree.read_text(path)
            if text is None:
                continue
            found.files.append(path)
            draft, bound, problems = parse_networkd(text, path)
            found.warn_all(path, problems)
            found.bindings.extend(bound)
            if draft is not None:  # .link files are udev's, not networkd's
                found.styles.add("systemd-networkd")
                networkd.append(draft)
    found.interfaces.extend(_networkd_interfaces(networkd))


def _read_ifupdown_config(found: _Found) -> None:
    tree = found.tree
    stanzas: list[tuple[str, IfupdownStanza]] = []
    if tree.is_file("/etc/network/interfaces"):
        found.styles.add("ifupdown")
        _read_ifupdown(tree, "/etc/network/interfaces", stanzas, found.files, depth=0)
    if stanzas:
        found_ifaces, bound, problems = ifupdown_interfaces(stanzas)
        found.warn_all("/etc/network/interfaces", problems)
        found.bindings.extend(bound)
        found.interfaces.extend(found_ifaces)


def _replace_routes(iface: Interface, routes: Sequence[Route]) -> Interface:
    return Interface(**{**{f.name: getattr(iface, f.name) for f in fields(iface)}, "routes": tuple(routes)})


def _thaw(iface: Interface) -> InterfaceDraft:
    values: dict[str, Any] = {f.name: getattr(iface, f.name) for f in fields(iface)}
    for key in ("addresses", "routes", "dns", "members", "bond_options"):
        values[key] = list(values[key])
    return InterfaceDraft(**values)


def _with_members(interfaces: Sequence[Interface]) -> list[Interface]:
    drafts = [_thaw(i) for i in interfaces]
    link_members(drafts)
    return [d.freeze() for d in drafts]


def _nm_interfaces(profiles: Sequence[NMProfile]) -> list[Interface]:
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
    link_members(drafts)
    return [d.freeze() for d in drafts]


def _networkd_interfaces(drafts: Sequence[InterfaceDraft]) -> list[Interface]:
    """Merge each .netdev with the .network that configures it; wire VLANs to their parent."""
    by_name: dict[str, InterfaceDraft] = {}
    ordered: list[InterfaceDraft] = []
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
    link_members(ordered)
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
