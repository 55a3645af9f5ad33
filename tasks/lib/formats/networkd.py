"""systemd-networkd's .network, .netdev and .link files."""

from __future__ import annotations

import re
import typing

from tasks.lib.formats.ini import parse_ini
from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.lines import with_newline
from tasks.lib.formats.netfields import InterfaceDraft, normalize_destination, normalize_mac
from tasks.lib.source.model import BindingKind, InterfaceKind, MacBinding, Route


def parse_networkd(text: str, path: str) -> tuple[InterfaceDraft | None, list[MacBinding], list[str]]:
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

    draft = InterfaceDraft(name=name or stem, style="systemd-networkd", file=path)
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


# ---------------------------------------------------------------- rewriting


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
