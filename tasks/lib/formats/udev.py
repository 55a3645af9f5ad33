"""udev rules that name a NIC by its MAC (70-persistent-net.rules)."""

from __future__ import annotations

import re

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.lines import with_newline
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


# ---------------------------------------------------------------- rewriting


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
