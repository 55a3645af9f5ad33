"""NetworkManager keyfiles (system-connections/*.nmconnection)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.lib.formats.ini import parse_ini
from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.lines import with_newline
from tasks.lib.formats.netfields import (
    InterfaceDraft,
    normalize_destination,
    normalize_mac,
    parse_bool,
    set_vlan_from_name,
)
from tasks.lib.source.model import InterfaceKind, MacBinding, Route


def keyfile_sections(text: str) -> tuple[dict[str, dict[str, str]], list[str]]:
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
class NMProfile:
    draft: InterfaceDraft
    uuid: str | None
    bindings: tuple[MacBinding, ...]


def parse_nm_keyfile(text: str, path: str) -> tuple[NMProfile | None, list[str]]:
    sections, problems = keyfile_sections(text)
    connection = sections.get("connection", {})
    if not connection:
        problems.append("no [connection] section")
        return None, problems
    ident = connection.get("id") or path.rsplit("/", 1)[-1].removesuffix(".nmconnection")
    name = connection.get("interface-name") or ident
    kind = _NM_TYPES.get(connection.get("type", ""), "other")
    draft = InterfaceDraft(name=name, style="NetworkManager", file=path, kind=kind, profile=ident)
    draft.onboot = parse_bool(connection.get("autoconnect", "true"))
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
        set_vlan_from_name(draft)
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
    return NMProfile(draft, connection.get("uuid"), tuple(bindings)), problems


# ---------------------------------------------------------------- rewriting


_KEYFILE_MAC = re.compile(r"^\s*(?:cloned-)?mac-address\s*=\s*(.*)$")


def drop_keyfile_macs(text: str) -> str:
    """NetworkManager keyfile: mac-address / cloned-mac-address that name a MAC (not 'preserve' etc.)."""
    lines = text.splitlines()
    kept = [line for line in lines if not ((m := _KEYFILE_MAC.match(line)) and normalize_mac(m.group(1)))]
    return text if len(kept) == len(lines) else with_newline(kept)
