"""udev rules that name a NIC by its MAC (70-persistent-net.rules)."""

from __future__ import annotations

import re

from tasks.lib.formats.netfields import normalize_mac
from tasks.lib.source.model import MacBinding

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
