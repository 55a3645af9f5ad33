"""What the network formats share: MAC addresses, prefixes, routes, yes/no values,
and `InterfaceDraft`, an interface while a parser puts it together.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tasks.lib.source.model import Interface, InterfaceKind, IPMethod, NetStyle, Route


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


def classful_prefix(address: str) -> int:
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


def parse_bool(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on", "1", "y"):
        return True
    if lowered in ("no", "false", "off", "0", "n"):
        return False
    return None


@dataclass
class InterfaceDraft:
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


def link_members(drafts: Sequence[InterfaceDraft]) -> None:
    """A slave names its master; give the master its members."""
    by_name = {d.name: d for d in drafts}
    for draft in drafts:
        if draft.master and draft.master in by_name:
            master = by_name[draft.master]
            if draft.name not in master.members:
                master.members.append(draft.name)


def set_vlan_from_name(draft: InterfaceDraft) -> None:
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


def cidr(address: str, prefix: int | str | None) -> str:
    return f"{address}/{prefix}" if prefix is not None and prefix != "" else address


def bond_options(text: str) -> tuple[str | None, list[str]]:
    options = [word for word in text.split() if word]
    mode = next((w.split("=", 1)[1] for w in options if w.startswith("mode=")), None)
    return mode, options


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
