"""Inspect stage: the source server, read-only, described in layout.json.

    inspect:<host>  ->  <workdir>/layout.json

Attach the disks read-only, discover partitions, filesystems, md and LVM,
read every filesystem that was not shut down cleanly through a throw-away
overlay with its journal replayed (tasks/lib/replay.py), find the root by
its /etc/fstab, mount the tree the way that fstab says,
describe the OS, and write a deterministic, versioned layout.json
(tasks/schemas/layout.schema.json) that every later stage plans from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib import esp, storage
from tasks.lib.fstab import FstabEntry, mount_order, parse_fstab, skip_reason
from tasks.lib.outputs import write_layout
from tasks.lib.paths import read_text_in_root, resolve_in_root
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.model import SUPPORTED_TYPES
from tasks.lib.replay import ReplayedFilesystem, replayed_journal
from tasks.lib.resources import host_device_tag, mounted, read_only_mount_options
from tasks.lib.runner import CommandError, P2VError
from tasks.lib.source.boot import combine_bootloader, guess_boot_sector
from tasks.lib.source.describe import describe_system
from tasks.lib.source.roots import (
    CONVERTS,
    MOUNTABLE_TYPES,
    choose_root,
    looks_like_root,
    resolve_fstab_source,
)
from tasks.lib.spec import Spec

log = logging.getLogger("p2v.inspect")

LAYOUT_FORMAT = "p2v-layout"
LAYOUT_VERSION = 2  # 2: filesystems[].needs_recovery


# ---------------------------------------------------------------- steps


@dataclass
class Discovery:
    disks: list[dict[str, Any]]
    probes: dict[str, dict[str, str]]  # stable device name -> blkid probe
    lvm: dict[str, Any]
    md_arrays: list[dict[str, Any]]
    # Filesystems read through a throw-away overlay with their journal replayed (tasks/lib/replay.py).
    replayed: dict[str, ReplayedFilesystem] = field(default_factory=dict)


def _scratch_dir(run_dir: Path, purpose: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{purpose}-", dir=run_dir))


@contextlib.contextmanager
def scratch_dir(run_dir: Path, purpose: str) -> Iterator[Path]:
    path = _scratch_dir(run_dir, purpose)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.contextmanager
def reachable_source(spec: Spec, *, replay: Mapping[str, str] | None = None
                     ) -> Iterator[tuple[Discovery, storage.DeviceMap]]:
    """Attach the spec's disks read-only and make every volume on them reachable.

    Each filesystem whose journal holds changes not yet in place (not shut
    down cleanly) is then reached through a throw-away overlay with the
    journal replayed: its DeviceMap node is the replayed view, so every mount
    of it sees what the source really holds. `replay` names the filesystems to
    check (device -> how messages call it, its mountpoint); None checks every
    filesystem found, {} none (sync's fingerprints read the real source).
    """
    with contextlib.ExitStack() as stack:
        attached, devices = stack.enter_context(storage.attached_source(spec.source))
        disks = []
        probes: dict[str, dict[str, str]] = {}
        for disk in attached:
            table = storage.partition_table(disk.node)
            disks.append({"name": disk.name, "source": disk.source, "size": disk.size, "table": table,
                          "boot_code": guess_boot_sector(storage.boot_sector(disk.node))})
            if table is None:
                probes[disk.name] = storage.probe(disk.node)
            for part in (table or {}).get("partitions", []):
                name = f"{disk.name}p{part['number']}"
                if name in devices.nodes:
                    probes[name] = storage.probe(devices.node(name))
        md_members = {name: storage.md_member_info(devices.node(name))
                      for name, info in probes.items() if info.get("TYPE") == "linux_raid_member"}
        md_arrays = storage.group_md_members(md_members)
        stack.enter_context(storage.assembled_md(md_arrays, devices, tag=host_device_tag(spec.host, spec.workdir)))
        for array in md_arrays:
            probes[array["device"]] = storage.probe(devices.node(array["device"]))
        config_dir = stack.enter_context(storage.lvm_config())
        pv_nodes = {name: devices.node(name) for name, info in probes.items() if info.get("TYPE") == "LVM2_member"}
        lvm = storage.discover_lvm(pv_nodes, config_dir)
        stack.enter_context(storage.activated_lvs(lvm, devices, config_dir))
        for lv in lvm["lvs"]:
            probes[lv["device"]] = storage.probe(devices.node(lv["device"]))
        discovery = Discovery(disks=disks, probes=probes, lvm=lvm, md_arrays=md_arrays)
        wanted = _filesystem_names(probes) if replay is None else sorted(set(replay) & set(_filesystem_names(probes)))
        for name in wanted:
            fstype = probes[name]["TYPE"]
            try:
                reason = storage.unreplayed_journal(fstype, devices.node(name))
            except storage.UnknownFeatures as error:
                raise P2VError(f"{name} ({fstype}) has {error.args[0]}", hint=error.hint) from None
            if reason is None:
                continue
            replayed = stack.enter_context(replayed_journal(
                name, fstype, devices.node(name), reason, scratch_dir=spec.scratch_dir, run_dir=spec.run_dir,
                called=(replay or {}).get(name, "")))
            devices.nodes[name] = replayed.view
            discovery.replayed[name] = replayed
            # A label or UUID set just before the cut may be in the journal only.
            probes[name] = storage.probe(replayed.view)
        yield discovery, devices


def _filesystem_names(probes: Mapping[str, Mapping[str, str]]) -> list[str]:
    return sorted(name for name, info in probes.items() if info.get("USAGE") == "filesystem")


@dataclass(frozen=True)
class Measured:
    records: dict[str, Any]  # filesystem name -> its layout.json record
    roots: list[str]  # the filesystems that look like a root
    unreadable: dict[str, str]  # filesystem name -> its type, one this machine does not mount
    damaged: dict[str, str]  # filesystem name -> why it needs fsck first


def measure_filesystems(spec: Spec, discovery: Discovery, devices: storage.DeviceMap) -> Measured:
    """Mount every filesystem read-only once: usage, features, and whether it is a root."""
    records: dict[str, Any] = {}
    roots: list[str] = []
    unreadable: dict[str, str] = {}
    damaged: dict[str, str] = {}
    with scratch_dir(spec.run_dir, "probe") as point:
        for name in _filesystem_names(discovery.probes):
            info = discovery.probes[name]
            fstype = info["TYPE"]
            node = devices.node(name)
            if fstype not in MOUNTABLE_TYPES:
                unreadable[name] = fstype
                continue
            if fstype in ("ext2", "ext3", "ext4"):
                state = storage.tune2fs_fields(node).get("Filesystem state", "")
                if "error" in state:
                    damaged[name] = f"its {fstype} records errors (state '{state}')"
            record: dict[str, Any] = {
                "device": name, "type": fstype, "uuid": info.get("UUID", "").lower(), "label": info.get("LABEL", ""),
                "size": storage.block_size(node), "needs_recovery": name in discovery.replayed,
                **storage.fs_features(fstype, node),
            }
            if fstype == "vfat":  # never mounted (this kernel may have no vfat): read by mtools
                record["fs_size"], record["used_bytes"] = esp.usage(node)
                record["inodes"], record["used_inodes"] = 0, len(esp.listing(node))
                records[name] = record
                continue
            with _mounted_to_measure(name, node, point, fstype):
                usage = os.statvfs(point)
                record["fs_size"] = usage.f_blocks * usage.f_frsize
                record["used_bytes"] = (usage.f_blocks - usage.f_bfree) * usage.f_frsize
                record["inodes"] = usage.f_files
                record["used_inodes"] = usage.f_files - usage.f_ffree
                if looks_like_root(point):
                    roots.append(name)
            records[name] = record
    return Measured(records, roots, unreadable, damaged)


@contextlib.contextmanager
def _mounted_to_measure(name: str, node: str, point: Path, fstype: str) -> Iterator[None]:
    """A read-only mount, or one line with the kernel's reason (mount's own message names no filesystem)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(mounted(node, point, fstype=fstype, options=read_only_mount_options(fstype)))
        except CommandError as error:
            reason = " ".join(error.output.split()).removeprefix(f"mount: {point}: ")
            raise P2VError(f"{name} ({fstype}) does not mount read-only on this machine: {reason}",
                           hint="check it with fsck on a copy of the image, or convert from the live system"
                           ) from None
        yield


def _swaps(probes: Mapping[str, Mapping[str, str]], devices: storage.DeviceMap) -> list[dict[str, Any]]:
    return [{"device": name, "uuid": info.get("UUID", "").lower(), "label": info.get("LABEL", ""),
             "size": storage.block_size(devices.node(name))}
            for name, info in sorted(probes.items()) if info.get("TYPE") == "swap"]


def swap_file_size(tree: Path, path: str) -> tuple[int, str | None]:
    """(size in bytes, why there is none) of a swap file in the read-only mounted source tree."""
    try:
        info = os.stat(resolve_in_root(tree, path))
    except (OSError, P2VError):
        return 0, "no such file on the source"
    if not stat.S_ISREG(info.st_mode):
        return 0, "not a regular file on the source"
    return info.st_size, None


def plan_mounts(entries: Sequence[FstabEntry], discovery: Discovery, root: str,
                filesystems: Mapping[str, Any], unreadable: Mapping[str, str] | None = None,
                damaged: Mapping[str, str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Resolve each fstab entry; return (fstab records, mounts in mount order).

    `unreadable`: filesystems of a type this machine does not mount (name -> type);
    `damaged`: filesystems that need fsck first (name -> why). A mount of either is refused.
    """
    unreadable = unreadable or {}
    damaged = damaged or {}
    disk_sources = [d["source"] for d in discovery.disks]
    records = []
    mount_by_point: dict[str, dict[str, Any]] = {}
    for entry in entries:
        record: dict[str, Any] = entry.to_json()
        reason = skip_reason(entry)
        if reason:
            record.update(status="skipped", reason=reason)
            records.append(record)
            continue
        if entry.is_swap and entry.spec.startswith("/") and not entry.spec.startswith("/dev/"):
            # A swap file lives in a filesystem; sync leaves it out, fix plans swap anew.
            record.update(status="swapfile")
            records.append(record)
            continue
        resolution = resolve_fstab_source(entry, discovery.probes, disk_sources, discovery.lvm["lvs"],
                                          discovery.md_arrays)
        record["resolved_by"] = resolution.how
        if resolution.device is None:
            if entry.nofail:
                record.update(status="unresolved", reason="no such device on the source disks (nofail)")
                records.append(record)
                continue
            raise P2VError(
                f"fstab line {entry.line}: {entry.spec} ({entry.file}) matches no device on the source disks",
                hint="add the missing disk to the spec's source, or mark the entry nofail on the server",
            )
        record["device"] = resolution.device
        if entry.is_swap:
            record["status"] = "swap"
        elif resolution.device in unreadable or (entry.file == "/" and resolution.device in filesystems
                                                 and filesystems[resolution.device]["type"] not in SUPPORTED_TYPES):
            fstype = unreadable.get(resolution.device) or filesystems[resolution.device]["type"]
            raise P2VError(f"fstab line {entry.line}: {entry.file} is {resolution.device}, a {fstype} filesystem, "
                           f"which p2v does not convert (it converts {CONVERTS})",
                           hint=f"move {entry.file} to ext4 or xfs on the server first")
        elif resolution.device not in filesystems:
            raise P2VError(f"fstab line {entry.line}: {entry.spec} ({entry.file}) is {resolution.device}, "
                           "which holds no filesystem p2v can read")
        elif resolution.device in damaged:
            raise P2VError(f"fstab line {entry.line}: {entry.file} is {resolution.device}: "
                           f"{damaged[resolution.device]}; a copy would carry the damage",
                           hint="run e2fsck -f on it from a rescue system (or on a copy of the image), then "
                                "inspect again")
        elif entry.file in mount_by_point:
            raise P2VError(f"fstab line {entry.line}: {entry.file} is mounted twice",
                           hint="keep one line per mount point in the server's /etc/fstab (the second mount hides "
                                "the first)")
        else:
            record["status"] = "mounted"
            mount_by_point[entry.file] = {"mountpoint": entry.file, "device": resolution.device,
                                          "fstype": filesystems[resolution.device]["type"],
                                          "options": list(entry.options), "fstab_line": entry.line}
        records.append(record)
    if "/" not in mount_by_point:
        raise P2VError(f"the root's fstab has no entry for / (root filesystem is {root})")
    if mount_by_point["/"]["device"] != root:
        raise P2VError(f"fstab mounts {mount_by_point['/']['device']} on /, but the root found is {root}",
                       hint="set source.root in the spec to the root the server boots")
    mounts = [mount_by_point[point] for point in mount_order(list(mount_by_point))]
    return records, mounts


@contextlib.contextmanager
def mounted_tree(spec: Spec, mounts: Sequence[Mapping[str, Any]], devices: storage.DeviceMap, *,
                 esp_views: bool = True) -> Iterator[Path]:
    """The server's tree, read-only, mounted the way its fstab says.

    A vfat filesystem (the ESP) is never mounted: with `esp_views` its files
    are shown on a read-only tmpfs (esp.esp_view), else its mount point stays
    the plain directory it is on the parent filesystem (sync copies the ESP
    itself, by mtools).
    """
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(scratch_dir(spec.run_dir, "tree"))
        for mount in mounts:
            point = resolve_in_root(tree, mount["mountpoint"])
            if not point.is_dir():
                raise P2VError(f"mount point {mount['mountpoint']} does not exist on the source "
                               f"(needed for {mount['device']})")
            if mount["fstype"] == "vfat":
                if esp_views:
                    stack.enter_context(esp.esp_view(devices.node(mount["device"]), point))
                continue
            stack.enter_context(mounted(devices.node(mount["device"]), point, fstype=mount["fstype"],
                                        options=read_only_mount_options(mount["fstype"])))
        yield tree


@dataclass(frozen=True)
class SourceView:
    root: Path  # the server's tree, mounted read-only as its fstab says
    replayed: tuple[ReplayedFilesystem, ...]  # filesystems in it read with their journal replayed


@contextlib.contextmanager
def source_tree(spec: Spec, layout: Mapping[str, Any], *, esp_views: bool = True,
                devices_out: dict[str, str] | None = None) -> Iterator[SourceView]:
    """The source tree, read-only, as inspect found it (for sync and later stages).

    Refuses to go on if a filesystem is not the one layout.json recorded:
    the disks changed since inspect, and the layout must be made again. A
    filesystem that needs recovery now is read with its journal replayed,
    whatever inspect found: what counts is what the source holds now.
    `esp_views`: as in mounted_tree. `devices_out` receives each mount's
    (read-only) device node in this run, by mount point: the replayed view's
    where there is one.
    """
    recorded = {fs["device"]: fs for fs in layout["filesystems"]}
    mountpoints = {mount["device"]: mount["mountpoint"] for mount in layout["mounts"]}
    with reachable_source(spec, replay=mountpoints) as (discovery, devices):
        for device, point in sorted(mountpoints.items()):
            if recorded[device]["needs_recovery"] != (device in discovery.replayed):
                log.warning("%s (%s) %s", device, point,
                            "needs recovery now but did not when inspected: the source ran since"
                            if device in discovery.replayed
                            else "needed recovery when inspected but not now: it was mounted read-write since")
        for mount in layout["mounts"]:
            found = discovery.probes.get(mount["device"], {})
            want = recorded[mount["device"]]
            if found.get("UUID", "").lower() != want["uuid"] or found.get("TYPE") != want["type"]:
                raise P2VError(
                    f"{mount['device']} ({mount['mountpoint']}) is no longer the {want['type']} filesystem "
                    f"UUID={want['uuid']} that inspect recorded",
                    hint=f"the source changed since inspect: remove layout.json and run inspect:{spec.host} again",
                )
        if devices_out is not None:
            devices_out.update({m["mountpoint"]: devices.node(m["device"]) for m in layout["mounts"]})
        with mounted_tree(spec, layout["mounts"], devices, esp_views=esp_views) as tree:
            yield SourceView(root=tree, replayed=tuple(discovery.replayed[d] for d in sorted(discovery.replayed)))


def later_work(layout: Mapping[str, Any]) -> list[str]:
    """What fix and disk will have to handle, for the summary and the report."""
    notes = []
    for fs in layout["filesystems"]:
        if fs["needs_recovery"]:
            notes.append(f"{fs['device']} ({fs.get('mountpoint') or 'not mounted'}, {fs['type']}) was not shut down "
                         "cleanly: inspect read it with its journal replayed in a throw-away overlay")
    if layout["lvm"]["lvs"]:
        notes.append("LVM on the source: flatten drops it; rd.lvm.* arguments must go")
    if layout["md"]:
        notes.append("md RAID on the source: flatten drops it; rd.md.* arguments must go")
    system = layout["system"]
    bindings = system.get("network", {}).get("mac_bindings", [])
    if bindings:
        notes.append(f"{len(bindings)} MAC binding(s) to remove: " + ", ".join(sorted({b['file'] for b in bindings})))
    kernels = system.get("kernels", [])
    if kernels and not any(k.get("virtio", {}).get("virtio_blk") in ("module", "builtin") for k in kernels):
        notes.append("no kernel with virtio_blk: the image cannot boot on KVM without a new kernel")
    if any(d["table"] is None for d in layout["disks"]):
        notes.append("a disk without a partition table (whole-disk filesystem or PV)")
    for entry in layout["fstab"]:
        if entry.get("status") in ("skipped", "unresolved"):
            notes.append(f"fstab {entry['file']} ({entry['spec']}): {entry['status']}, {entry['reason']}")
    return notes


def build_layout(spec: Spec) -> dict[str, Any]:
    with reachable_source(spec) as (discovery, devices):
        measured = measure_filesystems(spec, discovery, devices)
        filesystems = measured.records
        root = choose_root(measured.roots, discovery.probes, spec.source.root, spec.file)
        with scratch_dir(spec.run_dir, "root") as point:
            fstype = filesystems[root]["type"]
            with mounted(devices.node(root), point, fstype=fstype, options=read_only_mount_options(fstype)):
                fstab_text = read_text_in_root(point, "/etc/fstab")
        if fstab_text is None:
            raise P2VError(f"the root's /etc/fstab cannot be read (root filesystem {root}): a dangling symlink or "
                           "a symlink loop", hint="make /etc/fstab on the server a file the server itself can read")
        entries, fstab_warnings = parse_fstab(fstab_text)
        fstab_records, mounts = plan_mounts(entries, discovery, root, filesystems, measured.unreadable,
                                            measured.damaged)
        for mount in mounts:
            filesystems[mount["device"]]["mountpoint"] = mount["mountpoint"]
        with mounted_tree(spec, mounts, devices) as tree:
            description = describe_system(tree)
            for record in fstab_records:
                if record.get("status") == "swapfile":
                    size, missing = swap_file_size(tree, record["spec"])
                    record["size"] = size
                    if missing:
                        record["reason"] = missing
        system = description.to_json()
        boot_disk = discovery.disks[0]
        bootloader, boot_warnings = combine_bootloader(description.bootloader, boot_disk["boot_code"])
        swaps = _swaps(discovery.probes, devices)
        swap_devices = {r["device"] for r in fstab_records if r.get("status") == "swap"}
        for swap in swaps:
            swap["in_fstab"] = swap["device"] in swap_devices
    layout: dict[str, Any] = {
        "format": LAYOUT_FORMAT,
        "version": LAYOUT_VERSION,
        "host": spec.host,
        "source": {"mode": "live" if spec.source.live else "offline"},
        "disks": discovery.disks,
        "md": discovery.md_arrays,
        "lvm": discovery.lvm,
        "filesystems": [filesystems[name] for name in sorted(filesystems)],
        "swaps": swaps,
        "root": root,
        "boot": {"disk": boot_disk["name"], "boot_code": boot_disk["boot_code"], "bootloader": bootloader,
                 "config_path": description.bootloader.config_path, "firmware": description.bootloader.firmware},
        "fstab": fstab_records,
        "mounts": mounts,
        "used_bytes": sum(filesystems[m["device"]]["used_bytes"] for m in mounts),
        "system": system,
        "warnings": sorted(fstab_warnings + boot_warnings + list(system.get("warnings", []))),
    }
    layout["later"] = later_work(layout)
    return layout


def summary(layout: Mapping[str, Any]) -> str:
    gib = 1 << 30
    lines = [f"{layout['host']}: {len(layout['disks'])} disk(s), root {layout['root']}, "
             f"{layout['used_bytes'] / gib:.2f} GiB used"]
    for disk in layout["disks"]:
        table = disk["table"]
        parts = len(table["partitions"]) if table else 0
        kind = table["type"] if table else "no partition table"
        lines.append(f"  {disk['name']}: {disk['source']} {disk['size'] / gib:.1f} GiB, {kind}, "
                     f"{parts} partition(s), boot code {disk['boot_code']}")
    by_device = {fs["device"]: fs for fs in layout["filesystems"]}
    for mount in layout["mounts"]:
        fs = by_device[mount["device"]]
        lines.append(f"  {mount['mountpoint']:<12} {mount['device']:<24} {fs['type']:<5} "
                     f"{fs['used_bytes'] / gib:6.2f} GiB used  UUID={fs['uuid']}")
    system = layout["system"]
    osinfo = system["os"]
    boot = layout["boot"]
    kernels = ", ".join(f"{k['version']} (virtio_blk {k['virtio']['virtio_blk']})" for k in system["kernels"])
    lines.append(f"  OS: {osinfo['pretty_name'] or osinfo['id']}; kernels: {kernels}")
    lines.append(f"  boot: {boot['bootloader']} ({boot['config_path']}) on {boot['disk']}, {boot['firmware']}; "
                 f"network: {', '.join(system['network']['styles']) or 'none found'}")
    for note in layout["later"]:
        lines.append(f"  later: {note}")
    return "\n".join(lines)


def inspect_host(run: StageRun) -> None:
    layout = build_layout(run.spec)
    write_layout(run.partial, layout)  # checked against tasks/schemas/layout.schema.json first
    log.info("%s", summary(layout))


STAGE = Stage(
    name="inspect",
    doc="inspect the source server read-only -> layout.json",
    target="layout.json",
    inputs=(),
    run=inspect_host,
    config=lambda spec: {"source": [spec.source.identity, spec.source.root], "layout_version": LAYOUT_VERSION},
)
