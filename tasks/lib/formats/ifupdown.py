"""Debian's ifupdown: /etc/network/interfaces and the files it sources."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.lines import with_newline
from tasks.lib.formats.netfields import (
    InterfaceDraft,
    cidr,
    link_members,
    netmask_to_prefix,
    normalize_mac,
    parse_ip_route_words,
    set_vlan_from_name,
)
from tasks.lib.source.model import Interface, MacBinding


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
    drafts: dict[str, InterfaceDraft] = {}
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
            draft = drafts[name] = InterfaceDraft(name=name, style="ifupdown", file=path)
        options = _read_options(draft, path, stanza, bindings, problems)
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
            draft.addresses.append(cidr(address, prefix))
        if options.get("gateway") and (family == "inet" or draft.gateway is None):
            draft.gateway = options["gateway"]
        draft.dns.extend(options.get("dns-nameservers", "").split())
        _set_kind(draft, options, stanza)
    for draft in drafts.values():
        draft.onboot = draft.name in auto
        if draft.kind == "bridge":
            for port in draft.members:
                if port in drafts and drafts[port].master is None:
                    drafts[port].master = draft.name
    link_members(list(drafts.values()))
    return [d.freeze() for d in drafts.values()], bindings, problems


def _read_options(draft: InterfaceDraft, path: str, stanza: IfupdownStanza, bindings: list[MacBinding],
                  problems: list[str]) -> dict[str, str]:
    """An iface stanza's options (the first of each, `_` read as `-`); its routes and hwaddress on the way."""
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
                bindings.append(MacBinding(path, mac, draft.name, "hwaddress", "set"))
    return options


def _set_kind(draft: InterfaceDraft, options: Mapping[str, str], stanza: IfupdownStanza) -> None:
    """Bond, bridge or VLAN, from the stanza's bond-*, bridge-ports and vlan-* options (or a dotted name)."""
    name = draft.name
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
        set_vlan_from_name(draft)


# ---------------------------------------------------------------- rewriting


_HWADDRESS = re.compile(r"^\s*hwaddress\s+(?:ether\s+)?(\S+)\s*$")


def drop_hwaddress(text: str, macs: set[str]) -> str:
    lines = text.splitlines()
    kept = [line for line in lines if not ((m := _HWADDRESS.match(line)) and normalize_mac(m.group(1)) in macs)]
    return text if len(kept) == len(lines) else with_newline(kept)
