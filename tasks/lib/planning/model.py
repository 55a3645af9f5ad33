"""The disk plan's data: DiskPlan and its parts (frozen dataclasses), their JSON form
(disk-plan.json), the units and the partition type ids.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tasks.lib.fstab import mount_order, source_kind
from tasks.lib.runner import P2VError

PLAN_FORMAT = "p2v-disk-plan"


PLAN_VERSION = 1


MiB = 1 << 20


GiB = 1 << 30


BIOS_BOOT_SIZE = 1 * MiB


FIRST_PARTITION_START = 1 * MiB


EBR_GAP = 1 * MiB  # before each msdos logical partition: its extended boot record


GPT_TAIL = 1 * MiB  # room for the backup GPT at the end of the disk


SWAP_FILE_PATH = "/swapfile"


EXT_TYPES = ("ext2", "ext3", "ext4")


SUPPORTED_TYPES = (*EXT_TYPES, "xfs", "vfat")


ESP_MOUNTPOINTS = ("/boot/efi", "/efi")


# Partition type ids, as sfdisk shows them.
MSDOS_TYPES = {"filesystem": "83", "swap": "82", "esp": "ef", "extended": "05"}


GPT_TYPES = {
    "filesystem": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "bios_boot": "21686148-6449-6E6F-744E-656564454649",
}


Role = Literal["bios_boot", "filesystem", "swap", "extended"]


@dataclass(frozen=True)
class SourceMount:
    """One source filesystem as fstab mounted it."""

    mountpoint: str
    device: str
    fstype: str
    used_bytes: int
    used_inodes: int
    uuid: str
    label: str


@dataclass(frozen=True)
class FilesystemPlan:
    mountpoint: str
    fstype: str
    label: str
    uuid: str | None  # None until mkfs made it, unless the source's is kept
    keep_uuid: bool
    features: tuple[str, ...]  # ext: the exact feature set; xfs: "name=value" for every flag
    features_off: tuple[str, ...]  # ext: newer mke2fs defaults switched off by name
    features_from: str  # where the features come from, for the reader
    block_size: int | None
    inode_size: int | None
    inodes: int | None  # ext: inode count (-N)
    mkfs: tuple[str, ...]  # the command, without the device the stage appends
    sources: tuple[SourceMount, ...]  # the source mounts this filesystem receives
    used_bytes: int
    headroom: int
    overhead: int  # estimated metadata overhead of the new filesystem

    @property
    def esp(self) -> bool:
        return self.fstype == "vfat" and self.mountpoint in ESP_MOUNTPOINTS


@dataclass(frozen=True)
class SwapPlan:
    label: str
    uuid: str | None
    keep_uuid: bool
    mkswap: tuple[str, ...]
    sources: tuple[str, ...]  # source swap devices


@dataclass(frozen=True)
class PartitionPlan:
    number: int
    start: int  # bytes, a MiB multiple
    size: int  # bytes, a MiB multiple
    role: Role
    kind: Literal["primary", "extended", "logical"]
    type_id: str  # msdos type (83, 82, ef, 05) or GPT type GUID, as sfdisk shows it
    flags: tuple[str, ...]  # parted flags: boot, bios_grub, esp
    filesystem: FilesystemPlan | None = None
    swap: SwapPlan | None = None

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class SwapFilePlan:
    path: str
    size: int
    filesystem: str  # the mountpoint of the filesystem that holds it
    sources: tuple[str, ...] = ()  # the source swap (files, devices) it stands for


@dataclass(frozen=True)
class CopyPlan:
    """What the sync stage copies where: a source mount into the target tree."""

    source_mountpoint: str
    source_device: str
    target_mountpoint: str  # the target filesystem that receives it (same path in the tree)
    # "blocks": the target filesystem is this source filesystem's used blocks, resized (tasks/lib/copy/blocks.py);
    # "files": copied file by file into it. Chosen by tasks/lib/planning/copy_method.py.
    method: Literal["blocks", "files"] = "files"
    why: str = ""
    resize: Literal["grow", "shrink", "none"] = "none"  # blocks: to the partition's size, shrink in a scratch copy


@dataclass(frozen=True)
class FstabChange:
    """What the fix stage does with one line of the source's fstab."""

    line: int
    spec: str
    file: str
    vfstype: str
    action: Literal["replace", "remove", "keep"]
    target: str | None  # target mountpoint, "swap", or the swap file path
    new_spec: str | None  # None until the UUID is known (completed plan)
    new_vfstype: str | None
    new_options: tuple[str, ...]
    new_passno: int | None
    dropped_options: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class PlanPolicy:
    layout: str
    root_fs: str
    label: str
    swap: str
    size: str
    headroom_percent: int
    min_headroom: int
    keep_uuids: bool
    copy: str = "auto"


@dataclass(frozen=True)
class DiskPlan:
    host: str
    policy: PlanPolicy
    label: Literal["msdos", "gpt"]
    size: int
    bootloader: str
    firmware: str
    kernel: str | None  # the oldest installed kernel: the one features were chosen for
    partitions: tuple[PartitionPlan, ...]
    swap_file: SwapFilePlan | None
    copies: tuple[CopyPlan, ...]
    fstab: tuple[FstabChange, ...]
    notes: tuple[str, ...]
    complete: bool = False  # True once the disk stage filled in the UUIDs
    source_swap: int | None = None  # bytes of swap in the source's fstab (partitions, swap files); None: not known

    @property
    def swap_partition(self) -> PartitionPlan | None:
        return next((p for p in self.partitions if p.swap is not None), None)

    @property
    def filesystems(self) -> tuple[FilesystemPlan, ...]:
        return tuple(p.filesystem for p in self.partitions if p.filesystem is not None)

    def ends_the_disk(self, part: PartitionPlan) -> bool:
        """Nothing but a GPT's backup comes after `part` (a block copy can shrink there in place)."""
        return part.end >= max(p.end for p in self.partitions)

    def copy_of(self, mountpoint: str) -> CopyPlan:
        """The copy of the source filesystem mounted at `mountpoint`."""
        return next(c for c in self.copies if c.source_mountpoint == mountpoint)

    @property
    def block_copies(self) -> tuple[CopyPlan, ...]:
        return tuple(c for c in self.copies if c.method == "blocks")

    def filesystem(self, mountpoint: str) -> FilesystemPlan:
        for fs in self.filesystems:
            if fs.mountpoint == mountpoint:
                return fs
        raise KeyError(mountpoint)

    def partition_of(self, mountpoint: str) -> PartitionPlan:
        for part in self.partitions:
            if part.filesystem is not None and part.filesystem.mountpoint == mountpoint:
                return part
        raise KeyError(mountpoint)

    @property
    def mount_order(self) -> list[str]:
        """Target mountpoints, parents first: how a later stage mounts the tree."""
        return mount_order([fs.mountpoint for fs in self.filesystems])

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION}
        data.update(_encode(self))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DiskPlan:
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise P2VError(f"not a {PLAN_FORMAT} version {PLAN_VERSION} document "
                           f"(format {data.get('format')!r}, version {data.get('version')!r})")
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        plan: DiskPlan = _decode(cls, body)
        return plan

    def with_uuids(self, uuids: Mapping[int, str]) -> DiskPlan:
        """The completed plan: each partition's UUID as mkfs/mkswap made it.

        `uuids` maps partition numbers to what blkid read back. A kept UUID
        must come back unchanged.
        """
        partitions = []
        for part in self.partitions:
            uuid = uuids.get(part.number)
            if part.filesystem is not None:
                fs = part.filesystem
                if uuid is None:
                    raise P2VError(f"no UUID for partition {part.number} ({fs.mountpoint})")
                if fs.keep_uuid and fs.uuid and fs.uuid.lower() != uuid.lower():
                    raise P2VError(f"partition {part.number} ({fs.mountpoint}) has UUID {uuid}, not the kept {fs.uuid}")
                part = dataclasses.replace(part, filesystem=dataclasses.replace(fs, uuid=uuid))
            elif part.swap is not None:
                if uuid is None:
                    raise P2VError(f"no UUID for partition {part.number} (swap)")
                part = dataclasses.replace(part, swap=dataclasses.replace(part.swap, uuid=uuid))
            partitions.append(part)
        done = dataclasses.replace(self, partitions=tuple(partitions), complete=True)
        return dataclasses.replace(done, fstab=tuple(fill_new_spec(change, done) for change in done.fstab))


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    return value


def _decode(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner[0], value)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(tp)
        return tuple(_decode(item, v) for v in value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise P2VError(f"disk plan: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise P2VError(f"disk plan: unknown field(s) {', '.join(sorted(unknown))} in {tp.__name__}")
        return tp(**{name: _decode(hints[name], value[name]) for name in names if name in value})
    return value


def parse_size(text: str) -> int:
    """'20G' -> bytes (binary units: M, G, T)."""
    match = re.fullmatch(r"(\d+)([MGT])", text)
    if not match:
        raise P2VError(f"not a size: {text!r} (expected a number and M, G or T)")
    return int(match.group(1)) << {"M": 20, "G": 30, "T": 40}[match.group(2)]


def mib(value: int) -> int:
    """Bytes rounded up to whole MiB, in MiB."""
    return -(-value // MiB)


def round_up_mib(value: int) -> int:
    return mib(value) * MiB


def new_spec(old_spec: str, label: str, uuid: str | None) -> str | None:
    """The source's style where it still holds (LABEL= with a kept label), else UUID=."""
    kind, _ = source_kind(old_spec)
    if kind == "label" and label:
        return f"LABEL={label}"
    return f"UUID={uuid}" if uuid else None


def fill_new_spec(change: FstabChange, plan: DiskPlan) -> FstabChange:
    if change.action != "replace" or change.new_spec is not None:
        return change
    if change.target == "swap":
        swap = next(p.swap for p in plan.partitions if p.swap is not None)
        return dataclasses.replace(change, new_spec=new_spec(change.spec, swap.label, swap.uuid))
    fs = plan.filesystem(change.target or "")
    return dataclasses.replace(change, new_spec=new_spec(change.spec, fs.label, fs.uuid))
