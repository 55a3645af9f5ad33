"""The source server's storage: attach it read-only, discover it, reach its volumes.

Block devices get stable names that do not depend on which loop device the
kernel hands out this time, so that layout.json is the same bytes for the same
source: `disk1`, `disk1p2`, `lv:<vg>/<lv>`, `md:<name>`. A `DeviceMap` ties
those names to the device nodes of the current run.

Without device-mapper or md in the kernel (this project's CI, and containers)
LVM and md are reached read-only through loop devices: a linear LV at its
offset on its PV, a RAID1 array through one member at its data offset.
Anything else is a clear error that names what is missing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib import journal

# Moved to fsfacts.py; the names callers know stay here too.
from tasks.lib.fsfacts import UnknownFeatures as UnknownFeatures
from tasks.lib.fsfacts import ext_features as ext_features
from tasks.lib.fsfacts import ext_needs_recovery as ext_needs_recovery
from tasks.lib.fsfacts import fs_features as fs_features
from tasks.lib.fsfacts import tune2fs_fields as tune2fs_fields
from tasks.lib.fsfacts import unreplayed_journal as unreplayed_journal
from tasks.lib.fsfacts import xfs_features as xfs_features
from tasks.lib.fsfacts import xfs_log_is_clean as xfs_log_is_clean
from tasks.lib.fsfacts import xfs_log_state as xfs_log_state
from tasks.lib.machine_names import lv_dm_uuids, md_node, refuse_taken_dm_names, vg_names_locked
from tasks.lib.resources import loop_device, set_block_device_read_only, source_in_use
from tasks.lib.runner import CommandError, P2VError, output, run
from tasks.lib.spec import Source

log = logging.getLogger("p2v.storage")

SECTOR = 512


@dataclass
class DeviceMap:
    """Stable device name -> device node for this run (mutable while attaching)."""

    nodes: dict[str, str] = field(default_factory=dict)

    def node(self, name: str) -> str:
        try:
            return self.nodes[name]
        except KeyError:
            raise P2VError(f"device {name} is not attached in this run") from None

    def name_of(self, node: str) -> str | None:
        real = os.path.realpath(node)
        for name, path in self.nodes.items():
            if os.path.realpath(path) == real:
                return name
        return None


# ---------------------------------------------------------------- attaching


@dataclass(frozen=True)
class AttachedDisk:
    name: str  # disk1, disk2, ... in spec order
    source: str  # image file or /dev/sdX as the spec names it
    node: str  # device node in this run
    size: int


def _partition_nodes(disk_node: str) -> dict[int, str]:
    """Partition number -> node, from sysfs (works for loop and real disks)."""
    base = os.path.basename(os.path.realpath(disk_node))
    found: dict[int, str] = {}
    sys_dir = Path("/sys/class/block") / base
    if not sys_dir.exists():
        return found
    for child in sys_dir.iterdir():
        number_file = child / "partition"
        if number_file.exists():
            found[int(number_file.read_text())] = f"/dev/{child.name}"
    return found


def block_size(node: str) -> int:
    return int(output(["blockdev", "--getsize64", node]))


@contextlib.contextmanager
def attached_source(source: Source) -> Iterator[tuple[list[AttachedDisk], DeviceMap]]:
    """The spec's disks, read-only: loop devices for images, --setro for devices."""
    devices = DeviceMap()
    disks: list[AttachedDisk] = []
    with contextlib.ExitStack() as stack:
        for index, disk_source in enumerate(source.disks, start=1):
            name = f"disk{index}"
            if not source.live or stat.S_ISBLK(os.stat(disk_source).st_mode):
                check_disk(name, disk_source)
            if source.live:
                mode = os.stat(disk_source).st_mode
                if not stat.S_ISBLK(mode):
                    raise P2VError(f"source device {disk_source} is not a block device")
                set_block_device_read_only(disk_source)
                node = disk_source
                for partition_node in _partition_nodes(node).values():
                    set_block_device_read_only(partition_node)
            else:
                stack.enter_context(source_in_use(disk_source))
                loop = stack.enter_context(loop_device(disk_source, read_only=True, partitions=True))
                node = loop.path
            devices.nodes[name] = node
            for number, partition_node in _partition_nodes(node).items():
                devices.nodes[f"{name}p{number}"] = partition_node
            disks.append(AttachedDisk(name=name, source=disk_source, node=node, size=block_size(node)))
        yield disks, devices


# ---------------------------------------------------------------- discovery


def partition_table(node: str) -> dict[str, Any] | None:
    """sfdisk's view of the table, in bytes; None for a disk without one."""
    result = run(["sfdisk", "--json", node], check=False)
    if result.returncode != 0:
        if "does not contain a recognized partition table" in result.stderr:
            return None
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise P2VError(f"{node}: sfdisk cannot read the partition table: {reason}",
                       hint="check that the disk or image is whole and readable")
    for line in result.stderr.strip().splitlines():  # "The primary GPT table is corrupt, but the backup ..."
        log.warning("%s: sfdisk: %s", node, line)
    table = json.loads(result.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    partitions = []
    for entry in table.get("partitions", []):
        number = int(re.search(r"(\d+)$", entry["node"]).group(1))  # type: ignore[union-attr]
        partitions.append({
            "number": number,
            "start": int(entry["start"]) * sector,
            "size": int(entry["size"]) * sector,
            "type": str(entry["type"]).lower(),
            "bootable": bool(entry.get("bootable", False)),
            **({"uuid": entry["uuid"].lower()} if "uuid" in entry else {}),
            **({"name": entry["name"]} if entry.get("name") else {}),
        })
    label = table["label"]
    return {
        "type": "msdos" if label == "dos" else label,
        "id": str(table.get("id", "")).lower(),
        "sector_size": sector,
        "partitions": sorted(partitions, key=lambda p: p["number"]),
    }


# msdos partition types that only hold others (the extended partition and its kin).
_CONTAINER_TYPES = {"5", "f", "85"}
_GPT_SIGNATURE = b"EFI PART"


def table_problem(name: str, table: Mapping[str, Any] | None, disk_size: int,
                  gpt_at_4096: bool = False, gpt_disk_size: int | None = None) -> P2VError | None:
    """What makes a partition table unsafe to read, as the error to raise; None when it is sound (pure).

    A protective MBR alone (type ee in an msdos table) means the GPT was not
    readable: either a 4096-byte-sector disk read with 512-byte sectors
    (`gpt_at_4096`: its GPT header is at byte 4096), or a GPT whose primary
    and backup headers are both damaged. A partition past the end of the disk,
    or two that overlap, mean a cut-short image or a broken table: which bytes
    belong to which filesystem is then a guess. `gpt_disk_size`: the disk size
    the primary GPT header records (its backup header's place), if there is one.
    """
    if gpt_disk_size is not None and gpt_disk_size > disk_size:
        return P2VError(f"{name} is cut short: its GPT says the disk has {gpt_disk_size} bytes, but it has "
                        f"{disk_size}", hint="the image is incomplete: copy the whole disk again")
    if table is None:
        return None
    partitions = table["partitions"]
    if table["type"] == "msdos" and any(p["type"] == "ee" for p in partitions):
        if gpt_at_4096:
            return P2VError(f"{name} has 4096-byte sectors (its GPT header is at byte 4096); p2v reads image files "
                            "as disks of 512-byte sectors",
                            hint="convert this server from its live system (source.devices), where the kernel "
                                 "reads the disk with its own sector size")
        return P2VError(f"{name}: its GPT is damaged: neither the primary nor the backup GPT header is valid, and "
                        "only its protective MBR is readable",
                        hint="repair the GPT on the server (gdisk's recovery menu), or check that the image is a "
                             "complete copy of the disk")
    for part in partitions:
        end = part["start"] + part["size"]
        if end > disk_size:
            return P2VError(f"{name}: partition {part['number']} ends at byte {end}, past the end of the disk "
                            f"({disk_size} bytes)",
                            hint="the image is incomplete (cut short while copied) or the table is wrong: copy the "
                                 "whole disk again")
    data = sorted((p for p in partitions if p["type"] not in _CONTAINER_TYPES), key=lambda p: p["start"])
    for first, second in itertools.pairwise(data):
        if second["start"] < first["start"] + first["size"]:
            low, high = sorted((first["number"], second["number"]))
            return P2VError(f"{name}: partitions {low} and {high} overlap (bytes {second['start']} to "
                            f"{min(first['start'] + first['size'], second['start'] + second['size'])})",
                            hint="repair the partition table on the server: p2v does not guess which partition "
                                 "holds the data")
    return None


def gpt_recorded_size(node: str) -> int | None:
    """The disk size a primary GPT header (512-byte sectors) records: its backup header is on the last sector."""
    with open(node, "rb") as handle:
        handle.seek(SECTOR)
        header = handle.read(40)
    if header[:len(_GPT_SIGNATURE)] != _GPT_SIGNATURE:
        return None
    (backup_lba,) = struct.unpack_from("<Q", header, 32)
    return int(backup_lba + 1) * SECTOR


def gpt_header_at_4096(node: str) -> bool:
    """Whether the GPT signature sits where a 4096-byte-sector disk has it (LBA 1)."""
    with open(node, "rb") as handle:
        handle.seek(4096)
        return handle.read(len(_GPT_SIGNATURE)) == _GPT_SIGNATURE


def check_disk(name: str, source: str) -> None:
    """Refuse a disk whose table cannot be read safely, before the kernel is asked to read it.

    Runs on the image file or device node itself (read-only), so that a
    partition past the end never reaches partx, which would refuse it with a
    less telling message.
    """
    size = os.path.getsize(source) if os.path.isfile(source) else block_size(source)
    if size == 0:
        raise P2VError(f"{name} ({source}) is empty (0 bytes)",
                       hint="check source.devices/source.images in the spec names the server's system disks")
    table = partition_table(source)
    problem = table_problem(name, table, size, gpt_at_4096=bool(table) and gpt_header_at_4096(source),
                            gpt_disk_size=gpt_recorded_size(source))
    if problem is not None:
        raise problem


def boot_sector(node: str) -> bytes:
    """The first 2 KiB of a disk: MBR boot code and what follows it."""
    with open(node, "rb") as handle:
        return handle.read(2048)


def probe(node: str) -> dict[str, str]:
    """blkid's low-level probe of one device (no cache): TYPE, UUID, LABEL, ..."""
    result = run(["blkid", "-p", "-o", "export", node], check=False)
    if result.returncode == 2:  # nothing found on the device
        return {}
    if result.returncode != 0:
        raise CommandError(result.argv, result.returncode, result.stdout + result.stderr)
    values = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def lsblk_tree(nodes: Sequence[str]) -> list[dict[str, Any]]:
    text = output(["lsblk", "--json", "--bytes", "-o", "NAME,PATH,TYPE,SIZE,PKNAME,RO", *nodes])
    devices: list[dict[str, Any]] = json.loads(text)["blockdevices"]
    return devices


# ---------------------------------------------------------------- LVM


def lvm_env(config_dir: Path) -> dict[str, str]:
    return {"LVM_SYSTEM_DIR": str(config_dir), "LVM_SUPPRESS_FD_WARNINGS": "1"}


# Ignore the inspecting machine's LVM configuration: our own, no devices file,
# no udev, and never touch anything but the devices we name with --devices.
_LVM_CONF = """\
devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 read_only_volume_list = [ "@*", "*" ] }
global { event_activation = 0 }
"""


@contextlib.contextmanager
def lvm_config() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="p2v-lvm-") as directory:
        Path(directory, "lvm.conf").write_text(_LVM_CONF)
        yield Path(directory)


def _lvm_report(command: str, pv_nodes: Sequence[str], fields: str, config_dir: Path,
                extra: Sequence[str] = ()) -> list[dict[str, str]]:
    argv = [command, "--readonly", "--reportformat", "json", "--units", "b", "--nosuffix",
            "--devices", ",".join(pv_nodes), "-o", fields, *extra]
    report = json.loads(run(argv, env=lvm_env(config_dir)).stdout)["report"]
    rows: list[dict[str, str]] = []
    for block in report:
        for value in block.values():
            rows.extend(value)
    return rows


def discover_lvm(pv_nodes: Mapping[str, str], config_dir: Path) -> dict[str, Any]:
    """PVs, VGs and LVs with segment maps, from metadata only (no activation)."""
    if not pv_nodes:
        return {"pvs": [], "vgs": [], "lvs": []}
    nodes = list(pv_nodes.values())
    name_of = {os.path.realpath(node): name for name, node in pv_nodes.items()}
    pvs = _lvm_report("pvs", nodes, "pv_name,pv_uuid,vg_name,pe_start,pv_size", config_dir)
    vgs = _lvm_report("vgs", nodes, "vg_name,vg_uuid,vg_extent_size,vg_size,vg_free", config_dir)
    segments = _lvm_report(
        "lvs", nodes, "vg_name,lv_name,lv_uuid,lv_size,segtype,seg_start_pe,seg_size_pe,seg_pe_ranges,stripes",
        config_dir, extra=["--segments", "--all"],
    )
    lvs: dict[tuple[str, str], dict[str, Any]] = {}
    for row in segments:
        key = (row["vg_name"], row["lv_name"])
        lv = lvs.setdefault(key, {
            "vg": row["vg_name"], "name": row["lv_name"], "uuid": row["lv_uuid"], "size": int(row["lv_size"]),
            "device": f"lv:{row['vg_name']}/{row['lv_name']}", "segments": [],
        })
        ranges = []
        for pe_range in row["seg_pe_ranges"].split():
            node, _, span = pe_range.rpartition(":")
            first, _, last = span.partition("-")
            ranges.append({"pv": name_of.get(os.path.realpath(node), node), "first_extent": int(first),
                           "last_extent": int(last)})
        lv["segments"].append({
            "type": row["segtype"], "start_extent": int(row["seg_start_pe"]), "extents": int(row["seg_size_pe"]),
            "stripes": int(row.get("stripes") or 1), "pv_ranges": ranges,
        })
    return {
        "pvs": sorted(({"device": name_of.get(os.path.realpath(p["pv_name"]), p["pv_name"]), "uuid": p["pv_uuid"],
                        "vg": p["vg_name"], "pe_start": int(p["pe_start"]), "size": int(p["pv_size"])} for p in pvs),
                      key=lambda p: p["device"]),
        "vgs": sorted(({"name": v["vg_name"], "uuid": v["vg_uuid"], "extent_size": int(v["vg_extent_size"]),
                        "size": int(v["vg_size"]), "free": int(v["vg_free"])} for v in vgs), key=lambda v: v["name"]),
        "lvs": [lvs[key] for key in sorted(lvs)],
    }


def _load_module(module: str) -> None:
    """modprobe, where there is one: a Debian kernel (the live system's) builds dm and md as
    modules that nothing loads before p2v needs them, and /proc/mdstat exists only once md_mod is in."""
    try:
        run(["modprobe", "-q", module], check=False)
    except P2VError:  # no modprobe (a container): the kernel has what it has
        pass


def kernel_has_device_mapper() -> bool:
    _load_module("dm_mod")
    if not Path("/dev/mapper/control").exists():
        return False
    return run(["dmsetup", "version"], check=False).returncode == 0


def kernel_has_md() -> bool:
    _load_module("md_mod")
    return Path("/proc/mdstat").exists()


def block_device_is_read_only(node: str) -> bool:
    return output(["blockdev", "--getro", node]).strip() == "1"


def read_only_activation_config(vg_names: Sequence[str]) -> str:
    """`--config` for vgchange: every LV of these VGs activated read-only (lvm.conf(5),
    activation/read_only_volume_list; an entry is a VG name, VG/LV or @tag)."""
    listed = ", ".join(f'"{name}"' for name in vg_names)
    return f"activation {{ read_only_volume_list = [ {listed} ] }}"


def linear_lv_extent(lv: Mapping[str, Any], lvm: Mapping[str, Any]) -> tuple[str, int, int]:
    """(pv device name, byte offset on the PV device, byte size) of a one-segment linear LV.

    Raises P2VError for anything the loop-device fallback cannot represent.
    """
    name = f"{lv['vg']}/{lv['name']}"
    segments = lv["segments"]
    kinds = sorted({s["type"] for s in segments})
    if kinds != ["linear"]:
        raise P2VError(
            f"LV {name} has segment type {', '.join(kinds)}; reading it needs device-mapper, which this "
            "kernel lacks (only linear LVs have a read-only fallback)",
            hint="run p2v from the live system, whose kernel has device-mapper",
        )
    if len(segments) != 1 or len(segments[0]["pv_ranges"]) != 1:
        raise P2VError(
            f"LV {name} is spread over {sum(len(s['pv_ranges']) for s in segments)} extent ranges; the read-only "
            "fallback without device-mapper handles one contiguous range",
            hint="run p2v from the live system, whose kernel has device-mapper",
        )
    pv_range = segments[0]["pv_ranges"][0]
    pv = next(p for p in lvm["pvs"] if p["device"] == pv_range["pv"])
    extent_size = next(v["extent_size"] for v in lvm["vgs"] if v["name"] == lv["vg"])
    offset = pv["pe_start"] + pv_range["first_extent"] * extent_size
    size = segments[0]["extents"] * extent_size
    return pv["device"], offset, size


def vgchange(pv_nodes: Sequence[str], config_dir: Path, arguments: Sequence[str]) -> None:
    """vgchange that sees exactly these PVs, with p2v's own LVM configuration (lvm_config)."""
    run(["vgchange", "--devices", ",".join(pv_nodes), *arguments], env=lvm_env(config_dir))


@contextlib.contextmanager
def activated_lvs(lvm: Mapping[str, Any], devices: DeviceMap, config_dir: Path) -> Iterator[None]:
    """Make every LV reachable read-only; add `lv:<vg>/<lv>` to the device map.

    With device-mapper: `vgchange -ay` restricted to our PVs, with every LV
    activated read-only, and deactivated afterwards. Without: loop devices at
    the LV's offset on its PV.
    """
    if not lvm["lvs"]:
        yield
        return
    pv_nodes = [devices.node(pv["device"]) for pv in lvm["pvs"]]
    added: list[str] = []
    with contextlib.ExitStack() as stack:
        if kernel_has_device_mapper():
            vg_names = sorted({lv["vg"] for lv in lvm["lvs"]})
            stack.enter_context(vg_names_locked(vg_names))
            refuse_taken_dm_names(lvm["lvs"])
            activate = ["--config", read_only_activation_config(vg_names), "-ay", *vg_names]
            stack.enter_context(journal.resource(
                "lvm", lambda: vgchange(pv_nodes, config_dir, activate),
                lambda _: vgchange(pv_nodes, config_dir, ["-an", *vg_names]),
                {"vgs": vg_names, "devices": pv_nodes, "dm_uuids": lv_dm_uuids(lvm)},
                # An activation that fails may have activated some LVs.
                halfway=lambda: vgchange(pv_nodes, config_dir, ["-an", *vg_names])))
            for lv in lvm["lvs"]:
                node = f"/dev/{lv['vg']}/{lv['name']}"
                if not block_device_is_read_only(node):
                    raise P2VError(f"LV {lv['vg']}/{lv['name']} came up writable after a read-only activation",
                                   hint="p2v stops rather than risk writing the source; check lvm.conf")
                log.info("LVM: %s/%s activated read-only with device-mapper (%s)", lv["vg"], lv["name"], node)
                devices.nodes[lv["device"]] = node
                added.append(lv["device"])
        else:
            for lv in lvm["lvs"]:
                pv_device, offset, size = linear_lv_extent(lv, lvm)
                loop = stack.enter_context(
                    loop_device(devices.node(pv_device), read_only=True, offset=offset, size=size)
                )
                log.info("LVM: %s/%s read through a read-only loop device at byte %d of %s (no device-mapper "
                         "in this kernel)", lv["vg"], lv["name"], offset, pv_device)
                devices.nodes[lv["device"]] = loop.path
                added.append(lv["device"])
        try:
            yield
        finally:
            for name in added:
                devices.nodes.pop(name, None)


# ---------------------------------------------------------------- md RAID


def md_member_info(node: str) -> dict[str, Any]:
    """mdadm's view of one member: array UUID, level, name, data offset."""
    exported = output(["mdadm", "--examine", "--export", node])
    values = dict(line.split("=", 1) for line in exported.splitlines() if "=" in line)
    return {
        "uuid": values.get("MD_UUID", ""),
        "level": values.get("MD_LEVEL", ""),
        "name": values.get("MD_NAME", values.get("MD_UUID", "")).split(":")[-1],
        "devices": int(values.get("MD_DEVICES", "0") or 0),
        **md_examine_facts(output(["mdadm", "--examine", node])),
    }


def md_examine_facts(text: str) -> dict[str, Any]:
    """Metadata version, data offset and array size from `mdadm --examine` (its --export has no version)."""
    version_match = re.search(r"^\s*Version\s*:\s*(\S+)", text, re.M)
    offset_match = re.search(r"Data Offset\s*:\s*(\d+) sectors", text)
    size_match = re.search(r"Array Size\s*:\s*(\d+)(?: \(|\s*$| KiB)", text, re.M)
    return {
        "metadata": version_match.group(1) if version_match else "",
        "data_offset": int(offset_match.group(1)) * SECTOR if offset_match else 0,
        "array_size": int(size_match.group(1)) * 1024 if size_match else 0,
    }


def group_md_members(members: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    arrays: dict[str, dict[str, Any]] = {}
    for device, info in sorted(members.items()):
        array = arrays.setdefault(info["uuid"], {
            "uuid": info["uuid"], "name": info["name"], "level": info["level"], "metadata": info["metadata"],
            "device": f"md:{info['name'] or info['uuid']}", "members": [], "data_offset": info["data_offset"],
            "size": info["array_size"], "raid_devices": info["devices"],
        })
        array["members"].append(device)
    return [arrays[key] for key in sorted(arrays)]


def _md_assembly(node: str, uuid: str, members: Sequence[str]) -> contextlib.AbstractContextManager[Any]:
    """`mdadm --assemble --readonly` of one array, journaled, stopped on the way out."""
    return journal.resource("md", lambda: run(["mdadm", "--assemble", "--readonly", "--run", node, *members]),
                            lambda _: run(["mdadm", "--stop", node]),
                            {"node": node, "uuid": uuid, "members": list(members)})


@contextlib.contextmanager
def assembled_md(arrays: Sequence[Mapping[str, Any]], devices: DeviceMap, *, tag: str) -> Iterator[None]:
    """Reach every md array read-only; add `md:<name>` to the device map.

    `tag` (resources.host_device_tag) keeps the arrays of hosts converted in
    parallel apart: `/dev/md/p2v-<tag>-<index>`.
    """
    added: list[str] = []
    with contextlib.ExitStack() as stack:
        for index, array in enumerate(arrays):
            member_nodes = [devices.node(m) for m in array["members"]]
            if kernel_has_md():
                node = md_node(tag, index)
                stack.enter_context(_md_assembly(node, array["uuid"], member_nodes))
                if not block_device_is_read_only(node):
                    raise P2VError(f"md array {array['name']} came up writable after `mdadm --assemble --readonly`",
                                   hint="p2v stops rather than risk a resync writing the source")
                log.info("md: %s (%s) assembled read-only with the md driver from %s (%s)", array["device"],
                         array["level"], ", ".join(array["members"]), node)
            elif array["level"] == "raid1":
                loop = stack.enter_context(loop_device(
                    member_nodes[0], read_only=True, offset=array["data_offset"], size=array["size"] or None,
                ))
                node = loop.path
                log.info("md: %s (raid1) read through a read-only loop device over its member %s at byte %d "
                         "(no md driver in this kernel)", array["device"], array["members"][0],
                         array["data_offset"])
            else:
                raise P2VError(
                    f"md array {array['name']} is {array['level']}; reading it needs the md driver, which this "
                    "kernel lacks (only RAID1 has a read-only fallback, through one member)",
                    hint="run p2v from the live system, whose kernel has md",
                )
            devices.nodes[array["device"]] = node
            added.append(array["device"])
        try:
            yield
        finally:
            for name in added:
                devices.nodes.pop(name, None)
