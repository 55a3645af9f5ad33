"""netplan YAML: loading, merging the files as netplan does, interfaces and MAC bindings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.lines import with_newline
from tasks.lib.formats.netfields import InterfaceDraft, normalize_destination, normalize_mac, parse_bool
from tasks.lib.source.model import Interface, InterfaceKind, MacBinding, Route


def parse_netplan_yaml(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Load one netplan file with every scalar as a string.

    The plain YAML 1.1 loader turns an unquoted MAC such as 52:54:00:12:34:56
    into a sexagesimal integer; netplan itself reads scalars as strings.
    """
    try:
        data = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 (BaseLoader builds no objects)
    except yaml.YAMLError as exc:
        return None, [f"not valid YAML: {str(exc).splitlines()[0]}"]
    if data is None or data == "":
        return {}, []
    if not isinstance(data, dict):
        return None, ["top level is not a mapping"]
    return data, []


def merge_netplan(documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Later files add new keys and override scalars and sequences (netplan's rule)."""

    def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    result: dict[str, Any] = {}
    for document in documents:
        result = merge(result, document)
    return result


_NETPLAN_KINDS: Mapping[str, InterfaceKind] = {
    "ethernets": "ethernet",
    "bonds": "bond",
    "bridges": "bridge",
    "vlans": "vlan",
}


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def netplan_names(document: Mapping[str, Any]) -> dict[str, str]:
    """netplan id -> interface name (set-name, else the id)."""
    network = as_map(document.get("network"))
    names: dict[str, str] = {}
    for section in _NETPLAN_KINDS:
        for ident, config in as_map(network.get(section)).items():
            names[ident] = str(as_map(config).get("set-name") or ident)
    return names


def netplan_bindings(document: Mapping[str, Any], path: str) -> list[MacBinding]:
    network = as_map(document.get("network"))
    names = netplan_names(document)
    bindings: list[MacBinding] = []
    for section in (*_NETPLAN_KINDS, "wifis"):
        for ident, config in as_map(network.get(section)).items():
            config = as_map(config)
            name = names.get(ident, ident)
            match_mac = as_map(config.get("match")).get("macaddress")
            if isinstance(match_mac, str) and normalize_mac(match_mac):
                bindings.append(MacBinding(path, normalize_mac(match_mac) or "", name, "netplan-match", "match"))
            set_mac = config.get("macaddress")
            if isinstance(set_mac, str) and normalize_mac(set_mac):
                bindings.append(MacBinding(path, normalize_mac(set_mac) or "", name, "netplan-macaddress", "set"))
    return bindings


def netplan_interfaces(document: Mapping[str, Any], files: Mapping[str, str]) -> tuple[list[Interface], list[str]]:
    """Interfaces from a merged netplan document; `files` maps a netplan id to its file."""
    network = as_map(document.get("network"))
    names = netplan_names(document)
    problems: list[str] = []
    drafts: list[InterfaceDraft] = []
    for section, kind in _NETPLAN_KINDS.items():
        for ident, raw in as_map(network.get(section)).items():
            config = as_map(raw)
            draft = InterfaceDraft(
                name=names.get(ident, ident), style="netplan", file=files.get(ident, ""), kind=kind, profile=ident
            )
            for item in as_list(config.get("addresses")):
                if isinstance(item, str):
                    draft.addresses.append(item)
                elif isinstance(item, dict):
                    draft.addresses.extend(str(k) for k in item)
            draft.gateway = config.get("gateway4") or None
            for route in as_list(config.get("routes")):
                route = as_map(route)
                to, via = route.get("to"), route.get("via")
                if not isinstance(to, str):
                    problems.append(f"{ident}: a route without 'to'")
                    continue
                metric = route.get("metric")
                destination = normalize_destination(to, via if isinstance(via, str) else None)
                if destination in ("0.0.0.0/0",) and draft.gateway is None and isinstance(via, str):
                    draft.gateway = via
                draft.routes.append(
                    Route(
                        destination,
                        via if isinstance(via, str) else None,
                        int(metric) if isinstance(metric, str) and metric.isdigit() else None,
                    )
                )
            draft.dns = [str(a) for a in as_list(as_map(config.get("nameservers")).get("addresses"))]
            if parse_bool(str(config.get("dhcp4", "false"))):
                draft.method = "dhcp"
            elif any(":" not in a for a in draft.addresses):
                draft.method = "static"
            if kind == "vlan":
                if str(config.get("id", "")).isdigit():
                    draft.vlan_id = int(config["id"])
                link = config.get("link")
                draft.vlan_parent = names.get(link, link) if isinstance(link, str) else None
            if kind in ("bond", "bridge"):
                members = [names.get(m, m) for m in as_list(config.get("interfaces")) if isinstance(m, str)]
                draft.members = members
                params = as_map(config.get("parameters"))
                if kind == "bond":
                    draft.bond_mode = params.get("mode") if isinstance(params.get("mode"), str) else None
                    draft.bond_options = [f"{k}={v}" for k, v in sorted(params.items()) if isinstance(v, str)]
            drafts.append(draft)
    by_name = {d.name: d for d in drafts}
    for draft in drafts:
        for member in draft.members:
            if member in by_name:
                by_name[member].master = draft.name
    return [d.freeze() for d in drafts], problems


# ---------------------------------------------------------------- rewriting


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
