"""RHEL's network-scripts: ifcfg-<name> and route-<name> files."""

from __future__ import annotations

import re

from tasks.lib.formats.netfields import (
    InterfaceDraft,
    bond_options,
    cidr,
    classful_prefix,
    netmask_to_prefix,
    normalize_destination,
    normalize_mac,
    parse_bool,
    parse_ip_route_words,
    set_vlan_from_name,
)
from tasks.lib.formats.shellvars import load as load
from tasks.lib.formats.shellvars import parse_shell_vars, remove_shell_var
from tasks.lib.formats.shellvars import render as render
from tasks.lib.source.model import BindingAction, BindingKind, Interface, MacBinding, Route

IGNORED_SUFFIXES = ("~", ".bak", ".old", ".orig", ".rpmnew", ".rpmorig", ".rpmsave", ".swp", ".dpkg-old", ".dpkg-dist")


def parse_ifcfg(text: str, path: str) -> tuple[Interface | None, list[MacBinding], list[str]]:
    """One ifcfg-<name> file -> the interface it configures and the MACs it binds.

    Returns no interface for the loopback.
    """
    values, problems = parse_shell_vars(text)
    suffix = path.rsplit("/", 1)[-1].removeprefix("ifcfg-")
    name = values.get("DEVICE") or suffix
    if name == "lo":
        return None, [], problems
    draft = InterfaceDraft(name=name, style="ifcfg", file=path, profile=values.get("NAME") or None)
    kind = values.get("TYPE", "").lower()
    if kind == "bond" or "BONDING_OPTS" in values or parse_bool(values.get("BONDING_MASTER")):
        draft.kind = "bond"
    elif kind == "vlan" or parse_bool(values.get("VLAN")):
        draft.kind = "vlan"
    elif kind == "bridge":
        draft.kind = "bridge"
    elif kind == "team":
        draft.kind = "team"
    elif kind not in ("", "ethernet", "teamport"):
        draft.kind = "other"
    if draft.kind == "bond":
        draft.bond_mode, draft.bond_options = bond_options(values.get("BONDING_OPTS", ""))
    if draft.kind == "vlan":
        if values.get("VLAN_ID", "").isdigit():
            draft.vlan_id = int(values["VLAN_ID"])
        draft.vlan_parent = values.get("PHYSDEV") or None
        set_vlan_from_name(draft)

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
            prefix = classful_prefix(address)
        draft.addresses.append(cidr(address, prefix))
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
    draft.onboot = parse_bool(values.get("ONBOOT"))
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
            destination = normalize_destination(cidr(values[f"ADDRESS{n}"], prefix))
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


# ---------------------------------------------------------------- rewriting


def drop_ifcfg_macs(text: str) -> str:
    return remove_shell_var(remove_shell_var(text, "HWADDR"), "MACADDR")
