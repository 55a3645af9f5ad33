"""Which filesystem is the source's root, and which device an fstab line means: inspect's
decisions about what it found on the disks (pure, but for looks_like_root's look into a tree)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.lib.fstab import FstabEntry, source_kind
from tasks.lib.paths import resolve_in_root
from tasks.lib.runner import P2VError

OS_RELEASE_FILES = ("etc/os-release", "usr/lib/os-release", "etc/redhat-release", "etc/debian_version")
# What this machine's kernel mounts read-only for p2v to look into; anything else
# (reiserfs, jfs, a ZFS pool member, ...) is recorded as found but never mounted.
MOUNTABLE_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")
# What p2v reads otherwise: swap, and the layers it opens itself (LVM, md); LUKS it cannot open.
LAYER_TYPES = ("swap", "LVM2_member", "linux_raid_member", "crypto_LUKS")
CONVERTS = "ext2, ext3, ext4, xfs and vfat"

@dataclass(frozen=True)
class Resolution:
    device: str | None  # stable device name, or None
    how: str  # what matched, for the record


def resolve_fstab_source(entry: FstabEntry, devices: Mapping[str, Mapping[str, Any]],
                         disk_sources: Sequence[str], lvs: Sequence[Mapping[str, Any]],
                         md_arrays: Sequence[Mapping[str, Any]]) -> Resolution:
    """Which discovered device an fstab source names (pure; unit-tested).

    `devices` maps stable names to their probe (TYPE, UUID, LABEL, PARTUUID...).
    """
    kind, value = source_kind(entry.spec)
    if kind in ("uuid", "label", "partuuid", "partlabel"):
        key = {"uuid": "UUID", "label": "LABEL", "partuuid": "PART_ENTRY_UUID", "partlabel": "PART_ENTRY_NAME"}[kind]
        matches = sorted(name for name, info in devices.items() if info.get(key, "").lower() == value.lower()
                         and not info.get("TYPE", "").endswith("_member"))
        if len(matches) > 1:
            raise P2VError(f"fstab line {entry.line}: {entry.spec} matches several devices: {', '.join(matches)}")
        return Resolution(matches[0] if matches else None, kind)
    path = value
    for lv in lvs:
        vg, name = lv["vg"], lv["name"]
        mapper = f"/dev/mapper/{vg.replace('-', '--')}-{name.replace('-', '--')}"
        if path in (mapper, f"/dev/{vg}/{name}"):
            return Resolution(lv["device"], "lvm path")
    for index, array in enumerate(md_arrays):
        if path in (f"/dev/md{index}", f"/dev/md/{array['name']}", f"/dev/md/{index}"):
            return Resolution(array["device"], "md path")
    # /dev/sdb2 on a live system is the spec's /dev/sdb, partition 2. Offline,
    # the old name is a guess from the disk order (sda = disk1), said so.
    for index, source in enumerate(disk_sources, start=1):
        if path.startswith(source) and path[len(source):].lstrip("p").isdigit():
            return Resolution(f"disk{index}p{path[len(source):].lstrip('p')}", "device path")
    legacy = _legacy_disk_name(path)
    if legacy is not None:
        disk_index, part = legacy
        name = f"disk{disk_index}" + (f"p{part}" if part else "")
        if name in devices:
            return Resolution(name, "device path (guessed from disk order)")
    return Resolution(None, kind)


def _legacy_disk_name(path: str) -> tuple[int, int] | None:
    """/dev/sdb2 -> (2, 2); /dev/hda1, /dev/vda1, /dev/xvda1 alike; cciss c0d1p2 -> (2, 2)."""
    import re

    match = re.fullmatch(r"/dev/(?:s|h|v|xv)d([a-z])(\d*)", path)
    if match:
        return ord(match.group(1)) - ord("a") + 1, int(match.group(2) or 0)
    match = re.fullmatch(r"/dev/(?:cciss|ida)/c\d+d(\d+)(?:p(\d+))?", path)
    if match:
        return int(match.group(1)) + 1, int(match.group(2) or 0)
    return None


def looks_like_root(tree: Path) -> bool:
    """etc/fstab and an OS release file, both looked up as the server sees them: an absolute
    symlink (/etc -> /usr/local/etc) leads into the tree, never into this machine's /."""
    def present(path: str) -> bool:
        try:
            return os.path.lexists(resolve_in_root(tree, path, follow_last=False))
        except P2VError:  # a symlink loop on the way
            return False

    return present("/etc/fstab") and any(present(f"/{name}") for name in OS_RELEASE_FILES)


def found_on_disks(devices: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What each disk, partition or volume holds, for a message that says why no root was found."""
    found = []
    for name, info in sorted(devices.items()):
        kind = info.get("TYPE", "")
        if not kind:
            if ":" not in name and "p" not in name.removeprefix("disk"):
                found.append(f"{name} holds nothing p2v recognises")
            continue
        if kind == "crypto_LUKS":
            found.append(f"{name} crypto_LUKS (encrypted)")
        elif kind not in MOUNTABLE_TYPES and kind not in LAYER_TYPES:
            found.append(f"{name} {kind} (p2v cannot read it)")
        else:
            found.append(f"{name} {kind}")
    return found


def _no_root_hint(devices: Mapping[str, Mapping[str, Any]]) -> str:
    types = {info.get("TYPE", "") for info in devices.values()}
    if "crypto_LUKS" in types:
        return ("p2v cannot read encrypted volumes: decrypt the server's disks first (cryptsetup reencrypt "
                "--decrypt), or convert it another way")
    if types - {""} - set(MOUNTABLE_TYPES) - set(LAYER_TYPES):
        return f"p2v converts {CONVERTS}: a root on another filesystem must move to ext4 or xfs first"
    return "check source.devices/source.images in the spec names the server's system disks"


def choose_root(candidates: Sequence[str], devices: Mapping[str, Mapping[str, Any]], wanted: str | None,
                spec_file: str) -> str:
    if wanted:
        kind, value = source_kind(wanted)
        for name in candidates:
            info = devices[name]
            if (kind == "uuid" and info.get("UUID", "").lower() == value.lower()) or \
               (kind == "label" and info.get("LABEL") == value) or (kind == "path" and value == name):
                return name
        raise P2VError(f"{spec_file}: source.root: {wanted} is not one of the root candidates "
                       f"({', '.join(_describe_candidates(candidates, devices)) or 'none'})")
    if not candidates:
        found = "; ".join(found_on_disks(devices)) or "nothing on the source disks"
        raise P2VError(f"no root filesystem found: {found}; none holds etc/fstab and an OS release file",
                       hint=_no_root_hint(devices))
    if len(candidates) > 1:
        raise P2VError(
            f"several root filesystems found: {', '.join(_describe_candidates(candidates, devices))}",
            hint=f"pick one in {spec_file} with source.root: UUID=<uuid>",
        )
    return candidates[0]


def _describe_candidates(candidates: Sequence[str], devices: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [f"{name} (UUID={devices[name].get('UUID', '?')})" for name in candidates]
