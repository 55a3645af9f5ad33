"""The disk planner: layout.json + the spec's target policy -> DiskPlan (pure).

No I/O here: `plan_disk(layout, spec)` decides every partition, filesystem,
feature, size, label and UUID of the target disk, and how the source's fstab
maps onto it. The disk stage (tasks/disk.py) only carries the plan out, and
records the completed plan (with the UUIDs mkfs made) as disk-plan.json.

Decisions, and why:

Policy `flatten` (default): one disk, one root filesystem that receives every
source mount, plus swap. A source `/boot` stays a separate filesystem unless
the bootloader is already known to read a filesystem like the target root
(the *proven-readable* rule):

- the bootloader is grub2 (grub legacy's grub.conf and LILO name kernels
  relative to the /boot partition; merging would need their configuration
  rewritten, so their /boot is always kept), and
- the target root has the same filesystem type as the source /boot, and
- every on-disk feature of the target root that a bootloader must understand
  (ext: INCOMPAT features; xfs: v5/crc, ftype, sparse inodes, bigtime, nrext64)
  is also on the source /boot, which that bootloader reads today.

So plain Debian servers (ext4 /boot and ext4 root, same features) get one
root partition, while an xfs root next to an ext4 /boot (lvm-bookworm) keeps
its /boot: grub 2.06 on bookworm may not read every xfs feature (grub < 2.12
refuses nrext64, older ones bigtime), and nothing on the source proves it
does. An EFI system partition (/boot/efi, /efi) is always kept.

Policy `keep`: one partition per source mount, the mount structure as it was
(no LVM on the target).

Features: a filesystem gets exactly the source filesystem's features
(`mkfs.ext4 -O none,<source features>` plus an explicit `^f` for every
feature a newer e2fsprogs would add by default; `mkfs.xfs -m ...,-i ...`
with every feature flag spelled out), so the source's own kernel, e2fsck and
bootloader can read the target. When the spec changes the root's type, the
features are the ones every source filesystem of the new type shares (proven
on that server); with none of that type, a conservative baseline for the
oldest installed kernel (see `_era_ext_features`, `_era_xfs_features`).

Sizes: each filesystem gets its used bytes, plus headroom (the larger of
`headroom_percent` of the used bytes and `min_headroom`), plus an estimate of
the new filesystem's own overhead (journal or log, inode tables, reserved
blocks, allocation-group metadata), rounded up to whole MiB. Partitions start
at 1 MiB and are MiB-aligned. An explicit `size` must hold at least every
filesystem's data and overhead (without headroom); the rest goes first to the
other filesystems' headroom, then to the root.

Swap (`target.swap`): as much as the source had in its fstab, swap
partitions and swap files (inspect records each file's size) alike. `source`
(the default) keeps the kind: the source's swap partitions become one swap
partition, its swap files one swap file at the first one's path, which the
fix stage writes (zeros, not sparse) and mkswaps; `partition` and `file` put
all of it into one of that kind (a file at the source's swap file path, else
/swapfile), `none` drops it. Source swap files are not copied (their content
is worthless) and their space is not counted as data. Every source swap line
of fstab is either the line of a planned swap area or removed with a reason
that names what replaced it.

Partition table (target.label auto): msdos for a BIOS server, gpt for a UEFI
one. An ESP is always kept as its own vfat partition (written by mtools: see
tasks/lib/esp.py), sized like any kept filesystem.

Layout of the disk: [BIOS boot (gpt)] [/boot] [ESP] [swap] [other mounts] [/]:
the root comes last so that cloud-init's growpart can grow it into a larger
flavor's disk. With msdos and more than four partitions, the fourth is an
extended partition holding the rest as logical ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tasks.lib.fstab import mount_order, source_kind
from tasks.lib.runner import P2VError
from tasks.lib.spec import Spec, TargetPolicy

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

# ext features a bootloader must understand to read the filesystem (INCOMPAT).
EXT_INCOMPAT = frozenset({
    "filetype", "journal_dev", "meta_bg", "extent", "extents", "64bit", "mmp", "flex_bg", "ea_inode", "dirdata",
    "metadata_csum_seed", "large_dir", "inline_data", "encrypt", "casefold", "compression",
})
# Flags that describe a filesystem's state, not its format: never copied.
EXT_STATE_FLAGS = frozenset({"needs_recovery", "orphan_present", "journal_dev", "snapshot_bitmap"})
# What some e2fsprogs turns on by default (mke2fs.conf, 1.42 .. 1.47): each one
# the target does not get is switched off by name, so that the mkfs line says so.
EXT_NEWER_DEFAULTS = ("64bit", "metadata_csum", "metadata_csum_seed", "orphan_file", "extent", "flex_bg", "huge_file",
                      "dir_nlink", "extra_isize", "has_journal", "uninit_bg", "sparse_super", "large_file",
                      "resize_inode", "dir_index", "ext_attr", "filetype")
# xfs feature flags, each passed explicitly to mkfs.xfs; a newer default cannot slip in.
XFS_META_FLAGS = ("crc", "finobt", "rmapbt", "reflink", "inobtcount", "bigtime")
XFS_INODE_FLAGS = ("sparse", "nrext64")
XFS_FLAGS = (*XFS_META_FLAGS, *XFS_INODE_FLAGS, "ftype")
# xfs flags a bootloader must understand (incompat for grub's xfs driver).
XFS_BOOT_FLAGS = ("crc", "ftype", "sparse", "bigtime", "nrext64")

# Mount options every Linux filesystem takes; others are dropped when the type changes.
GENERIC_MOUNT_OPTIONS = frozenset({
    "defaults", "rw", "ro", "auto", "noauto", "nofail", "user", "nouser", "users", "owner", "group", "dev", "nodev",
    "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime", "sync", "async", "dirsync", "_netdev",
    "mand", "nomand", "silent", "loud", "iversion", "noiversion",
})

Role = Literal["bios_boot", "filesystem", "swap", "extended"]


# ---------------------------------------------------------------- the plan


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
        return dataclasses.replace(done, fstab=tuple(_fill_new_spec(change, done) for change in done.fstab))


def made_differences(part: PartitionPlan, probe: Mapping[str, str], found: Mapping[str, Any]) -> list[str]:
    """How what mkfs made differs from the plan (empty when it matches).

    `probe` is blkid's view of the partition (TYPE, LABEL, UUID), `found` the
    features read back (tasks/lib/storage.py fs_features).
    """
    problems: list[str] = []
    if part.swap is not None:
        expected: tuple[str, str, str | None] = ("swap", part.swap.label, part.swap.uuid)
    elif part.filesystem is not None:
        fs = part.filesystem
        expected = (fs.fstype, fs.label, fs.uuid)
    else:
        return problems
    fstype, label, uuid = expected
    if probe.get("TYPE") != fstype:
        problems.append(f"type {probe.get('TYPE')!r}, planned {fstype!r}")
    if probe.get("LABEL", "") != label:
        problems.append(f"label {probe.get('LABEL', '')!r}, planned {label!r}")
    if uuid and probe.get("UUID", "").lower() != uuid.lower():
        problems.append(f"UUID {probe.get('UUID')}, planned {uuid}")
    fs_plan = part.filesystem
    if fs_plan is None:
        return problems
    if fs_plan.fstype in EXT_TYPES:
        have = _ext_feature_set(found.get("features", []))
        want = set(fs_plan.features)
        if have != want:
            problems.append(f"features {', '.join(sorted(have - want)) or '-'} not planned, "
                            f"{', '.join(sorted(want - have)) or '-'} missing")
        for key in ("block_size", "inode_size"):
            if found.get(key) != getattr(fs_plan, key):
                problems.append(f"{key.replace('_', ' ')} {found.get(key)}, planned {getattr(fs_plan, key)}")
    elif fs_plan.fstype == "xfs":
        flags = _xfs_flags(found.get("features", {}))
        have_flags = tuple(f"{k}={flags[k]}" for k in XFS_FLAGS)
        wrong = [f"{h} (planned {w})" for h, w in zip(have_flags, fs_plan.features, strict=True) if h != w]
        if wrong:
            problems.append("xfs " + ", ".join(wrong))
        if found.get("features", {}).get("isize") != fs_plan.inode_size:
            problems.append(f"inode size {found.get('features', {}).get('isize')}, planned {fs_plan.inode_size}")
    return problems


# ---------------------------------------------------------------- JSON


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


# ---------------------------------------------------------------- small helpers


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


def kernel_version(text: str) -> tuple[int, int, int] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def oldest_kernel(layout: Mapping[str, Any]) -> str | None:
    """The oldest installed kernel: every feature chosen by era must suit it."""
    kernels = [k for k in layout["system"].get("kernels", []) if not k.get("rescue")] or \
        list(layout["system"].get("kernels", []))
    versioned = [(kernel_version(k["version"]), k["version"]) for k in kernels]
    known = sorted((v, name) for v, name in versioned if v is not None)
    return known[0][1] if known else None


def _ext_feature_set(features: Iterable[str]) -> set[str]:
    return {"extent" if f == "extents" else f for f in features} - EXT_STATE_FLAGS


def _xfs_flags(features: Mapping[str, Any]) -> dict[str, int]:
    return {flag: int(features.get(flag, 0) or 0) for flag in XFS_FLAGS}


# ---------------------------------------------------------------- features by kernel era


def _era_ext_features(fstype: str, kernel: str | None) -> tuple[set[str], str]:
    """A conservative ext feature set for a kernel, when no source filesystem proves more.

    ext4 as e2fsprogs 1.41/1.42 made it (RHEL 6, SLES 11/12, Ubuntu 16.04):
    no 64bit and no metadata_csum, because their e2fsck refuses those, and
    nothing newer (metadata_csum_seed, orphan_file) either.
    """
    version = kernel_version(kernel or "")
    where = f"kernel {kernel}" if kernel else "no kernel found; oldest baseline"
    ext2 = {"ext_attr", "resize_inode", "dir_index", "filetype", "sparse_super", "large_file"}
    if fstype == "ext2":
        return ext2, f"ext2 baseline ({where})"
    if fstype == "ext3":
        return ext2 | {"has_journal"}, f"ext3 baseline ({where})"
    if version is not None and version < (2, 6, 28):
        raise P2VError(f"ext4 needs a kernel of 2.6.28 or later; this server's oldest kernel is {kernel}",
                       hint="set target.root_fs to ext3, or to auto")
    ext4 = ext2 | {"has_journal", "extent", "flex_bg", "huge_file", "dir_nlink", "extra_isize", "uninit_bg"}
    return ext4, f"ext4 baseline of e2fsprogs 1.42 ({where})"


def _era_xfs_features(kernel: str | None) -> tuple[dict[str, int], int, str]:
    """Conservative xfs flags for a kernel: (flags, inode size, where from).

    v5 (crc) from 3.16, and on RHEL 7's 3.10 (which formats crc=1 itself);
    finobt, sparse inodes and reflink from 4.18 (what RHEL 8 formats). bigtime,
    inobtcount, rmapbt and nrext64 only where a source filesystem has them.
    """
    version = kernel_version(kernel or "") or (0, 0, 0)
    where = f"kernel {kernel}" if kernel else "no kernel found; oldest baseline"
    flags = dict.fromkeys(XFS_FLAGS, 0)
    el7 = bool(kernel and re.search(r"\.el7", kernel))
    if version >= (3, 16, 0) or el7:
        flags.update(crc=1, ftype=1)
    if version >= (4, 18, 0):
        flags.update(finobt=1, sparse=1, reflink=1)
    inode_size = 512 if flags["crc"] else 256
    return flags, inode_size, f"xfs baseline ({where})"


# ---------------------------------------------------------------- sizing estimates


def ext_journal_blocks(blocks: int) -> int:
    """e2fsprogs' default journal size (ext2fs_default_journal_size), in blocks."""
    if blocks < 2048:
        return 0
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if blocks < limit:
            return size
    return 262144


def ext_inode_ratio(size: int) -> int:
    """mke2fs.conf's bytes-per-inode: 'small' below 512 MiB, the default above."""
    return 4096 if size < 512 * MiB else 16384


def ext_overhead(size: int, block_size: int, inode_size: int, inodes: int, journal: bool) -> int:
    """Inode tables + journal + 5% reserved + bitmaps, descriptors, resize reserve.

    Measured with mke2fs 1.47 from 400 MiB to 200 GiB, this stays above what
    statvfs shows as unavailable to non-root users on the new filesystem.
    """
    count = max(inodes, size // ext_inode_ratio(size))
    journal_bytes = ext_journal_blocks(size // block_size) * block_size if journal else 0
    return count * inode_size + journal_bytes + size * 5 // 100 + size // 100 + 16 * MiB


def xfs_log_size(size: int) -> int:
    return min(2 * GiB, max(64 * MiB, size // 2048))


def xfs_overhead(size: int) -> int:
    """Log + AG headers, btrees and per-AG reservations (reflink, rmapbt, finobt).

    Measured with mkfs.xfs 6.1 (reflink and rmapbt on) from 400 MiB to 200 GiB.
    """
    return xfs_log_size(size) + size * 25 // 1000 + 32 * MiB


def vfat_overhead(size: int) -> int:
    return size // 100 + 2 * MiB


MIN_FS_SIZE = {"ext2": 16 * MiB, "ext3": 32 * MiB, "ext4": 32 * MiB, "xfs": 300 * MiB, "vfat": 64 * MiB}


@dataclass(frozen=True)
class _Draft:
    """A target filesystem before its size is final."""

    mountpoint: str
    fstype: str
    label: str
    uuid: str | None
    features: frozenset[str] | None  # ext
    xfs: Mapping[str, int] | None  # xfs flags
    features_from: str
    block_size: int | None
    inode_size: int | None
    naming_size: int | None
    projid32bit: int
    sources: tuple[SourceMount, ...]
    payload: int  # bytes of data to hold: used + allowance (+ a swap file)
    headroom: int
    inodes_needed: int

    def overhead(self, size: int) -> int:
        if self.fstype in EXT_TYPES:
            assert self.block_size and self.inode_size and self.features is not None
            return ext_overhead(size, self.block_size, self.inode_size, self.inodes_needed,
                                "has_journal" in self.features)
        if self.fstype == "xfs":
            return xfs_overhead(size)
        return vfat_overhead(size)

    def size_for(self, payload: int) -> int:
        """The smallest MiB-rounded size whose free space holds `payload`."""
        size = payload
        for _ in range(50):
            wanted = payload + self.overhead(size)
            if wanted <= size:
                break
            size = wanted
        return max(round_up_mib(size), MIN_FS_SIZE[self.fstype])

    @property
    def min_size(self) -> int:
        return self.size_for(self.payload)

    @property
    def auto_size(self) -> int:
        return self.size_for(self.payload + self.headroom)


@dataclass(frozen=True)
class _SwapChoice:
    """What becomes of the source's swap: sizes of the swap partition and file to make (0: none)."""

    partition: int
    file: int
    file_path: str
    partitions: tuple[Mapping[str, Any], ...]  # source swap partitions in fstab (layout "swaps")
    files: tuple[Mapping[str, Any], ...]  # source swap file lines (layout "fstab", status swapfile)
    total: int  # bytes of swap the source had


# ---------------------------------------------------------------- the planner


def plan_disk(layout: Mapping[str, Any], spec: Spec) -> DiskPlan:
    """Decide the target disk for one host (pure and deterministic)."""
    return _Planner(layout, spec.target, spec.host, spec.file).plan()


class _Planner:
    def __init__(self, layout: Mapping[str, Any], policy: TargetPolicy, host: str, spec_file: str):
        self.layout = layout
        self.policy = policy
        self.host = host
        self.spec_file = spec_file
        self.notes: list[str] = []
        self.swap_partition_sources: tuple[str, ...] = ()  # what the swap partition stands for
        self.by_device = {fs["device"]: fs for fs in layout["filesystems"]}
        self.bootloader: str = layout["boot"]["bootloader"]
        self.firmware: str = layout["boot"]["firmware"]
        self.kernel = oldest_kernel(layout)
        self.min_headroom = parse_size(policy.min_headroom)
        self.mounts = [self._source_mount(m) for m in layout["mounts"]]
        # Source swap files are left out of the copy: their space is no data to hold.
        self.left_out: dict[str, int] = {}
        for entry in layout["fstab"]:
            if entry.get("status") == "swapfile" and int(entry.get("size") or 0):
                holder = self._receiver(entry["spec"], [m.mountpoint for m in self.mounts])
                self.left_out[holder] = self.left_out.get(holder, 0) + int(entry["size"])

    def _source_mount(self, mount: Mapping[str, Any]) -> SourceMount:
        fs = self.by_device[mount["device"]]
        return SourceMount(mountpoint=mount["mountpoint"], device=mount["device"], fstype=fs["type"],
                           used_bytes=int(fs["used_bytes"]), used_inodes=int(fs.get("used_inodes", 0)),
                           uuid=fs.get("uuid", ""), label=fs.get("label", ""))

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- which target filesystems receive which source mounts

    def groups(self) -> list[tuple[SourceMount, list[SourceMount]]]:
        """(the source mount whose filesystem the target recreates, the mounts it receives)."""
        root = next(m for m in self.mounts if m.mountpoint == "/")
        if self.policy.layout == "keep":
            for mount in self.mounts:
                if mount.fstype not in SUPPORTED_TYPES:
                    raise P2VError(f"target.layout keep cannot recreate {mount.mountpoint} ({mount.fstype}); "
                                   f"p2v makes {', '.join(SUPPORTED_TYPES)}",
                                   hint=f"use target.layout: flatten in {self.spec_file}")
            return [(m, [m]) for m in self.mounts]
        kept = [m for m in self.mounts if m.mountpoint in ESP_MOUNTPOINTS and m.fstype == "vfat"]
        boot = next((m for m in self.mounts if m.mountpoint == "/boot"), None)
        if boot is not None and not self._merge_boot(boot, root):
            kept.insert(0, boot)
        merged = [m for m in self.mounts if m not in kept]
        for mount in merged:
            if mount is not root:
                self.notes.append(f"{mount.mountpoint} ({mount.device}, {mount.fstype}) merged into /")
        return [(m, [m]) for m in kept] + [(root, merged)]

    def _merge_boot(self, boot: SourceMount, root: SourceMount) -> bool:
        """The proven-readable rule (module docstring): may /boot live in the target root?"""
        if self.bootloader != "grub2":
            self.notes.append(f"/boot kept separate: the bootloader is {self.bootloader}, whose configuration "
                              "names kernels relative to the /boot partition")
            return False
        root_type = self._root_type(root)
        if root_type != boot.fstype:
            self.notes.append(f"/boot kept separate: grub reads {boot.fstype} there today; nothing on the server "
                              f"shows it reads the target root's {root_type}")
            return False
        boot_fs = self.by_device[boot.device]
        if root_type in EXT_TYPES:
            target = self._ext_features_for(root, root_type)[0]
            extra = sorted((target & EXT_INCOMPAT) - _ext_feature_set(boot_fs.get("features", [])))
        else:
            flags = self._xfs_features_for(root, root_type)[0]
            boot_flags = _xfs_flags(boot_fs.get("features", {}))
            extra = [f"{k}={flags[k]}" for k in XFS_BOOT_FLAGS if flags[k] > boot_flags[k]]
        if extra:
            self.notes.append(f"/boot kept separate: the target root has {', '.join(extra)}, which the source /boot "
                              "(read by grub today) does not")
            return False
        self.notes.append(f"/boot merged into /: grub reads {boot.fstype} with the root's features on the source /boot")
        return True

    def _root_type(self, root: SourceMount) -> str:
        wanted = self.policy.root_fs
        if wanted == "auto":
            if root.fstype not in SUPPORTED_TYPES or root.fstype == "vfat":
                raise P2VError(f"the source root is {root.fstype}, which p2v does not make",
                               hint=f"set target.root_fs to ext4 or xfs in {self.spec_file}")
            return root.fstype
        return wanted

    # -- features

    def _ext_features_for(self, mount: SourceMount, fstype: str) -> tuple[set[str], str, int, int]:
        """(features, where from, block size, inode size) for an ext target made for `mount`."""
        source = self.by_device[mount.device]
        if mount.fstype == fstype:
            features = _ext_feature_set(source.get("features", []))
            dropped = sorted(features & {"mmp"})
            if dropped:
                self._note(f"{mount.mountpoint}: {', '.join(dropped)} not carried over")
                features -= set(dropped)
            return (features, f"as on the source {mount.mountpoint} ({mount.device})",
                    int(source.get("block_size") or 4096), int(source.get("inode_size") or 256))
        proof = [fs for fs in self.by_device.values() if fs["type"] == fstype and fs.get("features")]
        if proof:
            shared = set.intersection(*(_ext_feature_set(fs["features"]) for fs in proof)) - {"mmp"}
            names = ", ".join(sorted(fs["device"] for fs in proof))
            inode_size = min(int(fs.get("inode_size") or 256) for fs in proof)
            return shared, f"shared by the source's {fstype} filesystems ({names})", 4096, inode_size
        features, where = _era_ext_features(fstype, self.kernel)
        inode_size = 128 if self.bootloader == "grub-legacy" and fstype != "ext4" else 256
        return features, where, 4096, inode_size

    def _xfs_features_for(self, mount: SourceMount, fstype: str) -> tuple[dict[str, int], str, int, int, int, int]:
        """(flags, where from, block size, inode size, naming block size, projid32bit)."""
        source = self.by_device[mount.device]
        if mount.fstype == fstype:
            features = source.get("features", {})
            return (_xfs_flags(features), f"as on the source {mount.mountpoint} ({mount.device})",
                    int(features.get("data.bsize", 4096)), int(features.get("isize", 512)),
                    int(features.get("naming.bsize", 4096)), int(features.get("projid32bit", 1)))
        proof = [fs for fs in self.by_device.values() if fs["type"] == "xfs" and fs.get("features")]
        if proof:
            flags = {flag: min(_xfs_flags(fs["features"])[flag] for fs in proof) for flag in XFS_FLAGS}
            names = ", ".join(sorted(fs["device"] for fs in proof))
            inode_size = 512 if flags["crc"] else 256
            return flags, f"shared by the source's xfs filesystems ({names})", 4096, inode_size, 4096, 1
        flags, inode_size, where = _era_xfs_features(self.kernel)
        return flags, where, 4096, inode_size, 4096, 1

    # -- drafts

    def _headroom(self, used: int) -> int:
        return max(used * self.policy.headroom_percent // 100, self.min_headroom)

    def _used(self, members: Sequence[SourceMount]) -> int:
        return sum(max(0, m.used_bytes - self.left_out.get(m.mountpoint, 0)) for m in members)

    def _draft(self, base: SourceMount, members: Sequence[SourceMount], is_root: bool, swap_file: int) -> _Draft:
        fstype = self._root_type(base) if is_root else base.fstype
        if fstype not in SUPPORTED_TYPES:
            raise P2VError(f"{base.mountpoint} is {fstype}, which p2v does not make ({', '.join(SUPPORTED_TYPES)})")
        features: frozenset[str] | None = None
        xfs: dict[str, int] | None = None
        naming: int | None = None
        projid = 1
        if fstype in EXT_TYPES:
            ext, where, block_size, inode_size = self._ext_features_for(base, fstype)
            features = frozenset(ext)
        elif fstype == "xfs":
            xfs, where, block_size, inode_size, naming, projid = self._xfs_features_for(base, fstype)
        else:
            where, block_size, inode_size = f"as on the source {base.mountpoint} ({base.device})", 4096, 0
        label = base.label
        limit = {"xfs": 12, "vfat": 11}.get(fstype, 16)
        if len(label.encode()) > limit:
            raise P2VError(f"{base.mountpoint}: label {label!r} is longer than {fstype} allows ({limit} bytes)",
                           hint="set target.root_fs to the source's type, or shorten the label on the server")
        uuid = None
        if self.policy.keep_uuids and base.uuid:
            uuid = base.uuid
            if fstype == "vfat" and not re.fullmatch(r"[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}", uuid):
                uuid = None
        used = self._used(members)
        allowance = 0
        for member in members:
            source_block = self._source_block_size(member)
            if member.fstype != fstype or source_block < block_size:
                # Small files and directories round up to the new block size.
                allowance += member.used_inodes * block_size // 2
        used_inodes = sum(m.used_inodes for m in members)
        inodes_needed = math.ceil(used_inodes * (100 + self.policy.headroom_percent) / 100) + 1024
        return _Draft(
            mountpoint=base.mountpoint, fstype=fstype, label=label, uuid=uuid, features=features, xfs=xfs,
            features_from=where, block_size=block_size, inode_size=inode_size, naming_size=naming,
            projid32bit=projid, sources=tuple(members), payload=used + allowance + swap_file,
            headroom=self._headroom(used), inodes_needed=inodes_needed,
        )

    def _source_block_size(self, mount: SourceMount) -> int:
        fs = self.by_device[mount.device]
        if fs["type"] == "xfs":
            return int(fs.get("features", {}).get("data.bsize", 4096))
        return int(fs.get("block_size") or 4096)

    # -- swap

    def swap(self) -> _SwapChoice:
        """What the source's swap becomes (module doc)."""
        partitions = tuple(s for s in self.layout["swaps"] if s.get("in_fstab"))
        files = tuple(e for e in self.layout["fstab"] if e.get("status") == "swapfile")
        for entry in files:
            if "size" not in entry:
                raise P2VError(f"layout.json records the swap file {entry['spec']} without its size "
                               "(made by an older inspect)",
                               hint="run inspect:<host> again: doit forget inspect:<host>")
            if not int(entry["size"]):
                self.notes.append(f"the source's fstab names the swap file {entry['spec']}, which it does not hold "
                                  f"({entry.get('reason', 'empty')}): no swap is planned for it")
        part_bytes = sum(int(s["size"]) for s in partitions)
        file_bytes = sum(int(e["size"]) for e in files)
        total = part_bytes + file_bytes
        existing = [e["spec"] for e in files if int(e["size"])]
        path = existing[0] if existing else SWAP_FILE_PATH
        choice = {"partition": 0, "file": 0}
        policy = self.policy.swap
        if policy == "none":
            if total:
                self.notes.append(f"swap: none; the source's {mib(total)} MiB of swap is dropped")
        elif not total and not files:
            self.notes.append("the source has no swap in fstab; none planned")
        elif policy == "partition":
            choice["partition"] = round_up_mib(total)
        elif policy == "file":
            choice["file"] = round_up_mib(total)
        else:
            choice = {"partition": round_up_mib(part_bytes), "file": round_up_mib(file_bytes)}
        return _SwapChoice(partition=choice["partition"], file=choice["file"], file_path=path,
                           partitions=partitions, files=files, total=total)

    # -- the whole plan

    def plan(self) -> DiskPlan:
        label = self.policy.label
        if label == "auto":
            # UEFI servers come on GPT (the ESP's natural home); BIOS ones on msdos, the way grub-pc boots them.
            label = "gpt" if self.firmware == "uefi" else "msdos"
        if label not in ("msdos", "gpt"):
            raise P2VError(f"unknown partition table type {label!r}")
        if label == "gpt" and self.firmware == "bios" and self.bootloader == "grub-legacy":
            raise P2VError("target.label gpt: grub legacy cannot boot from a GPT disk",
                           hint=f"use target.label: msdos in {self.spec_file}")
        swap = self.swap()
        source_swaps = list(swap.partitions)
        self.swap_partition_sources = tuple(self._swap_partition_sources(swap))
        swap_part = swap.partition
        groups = self.groups()
        file_holder = self._receiver(swap.file_path, [base.mountpoint for base, _ in groups])
        drafts = [self._draft(base, members, base.mountpoint == "/",
                              swap.file if base.mountpoint == file_holder else 0)
                  for base, members in groups]
        root = next(d for d in drafts if d.mountpoint == "/")
        others = [d for d in drafts if d is not root]
        ordered = [d for d in others if d.mountpoint == "/boot"] + \
                  [d for d in others if d.mountpoint in ESP_MOUNTPOINTS] + \
                  [d for d in others if d.mountpoint != "/boot" and d.mountpoint not in ESP_MOUNTPOINTS]

        slots: list[tuple[Role, _Draft | None, int]] = []  # role, draft, minimum size
        if label == "gpt" and self.firmware == "bios" and self.bootloader != "extlinux":
            slots.append(("bios_boot", None, BIOS_BOOT_SIZE))
        slots += [("filesystem", d, d.min_size) for d in ordered if d.mountpoint in ("/boot", *ESP_MOUNTPOINTS)]
        if swap_part:
            slots.append(("swap", None, swap_part))
        slots += [("filesystem", d, d.min_size) for d in ordered if d.mountpoint not in ("/boot", *ESP_MOUNTPOINTS)]
        slots.append(("filesystem", root, root.min_size))

        sizes = self._final_sizes(slots, label)
        partitions = self._lay_out(slots, sizes, label, source_swaps)
        disk_size = partitions[-1].end + (GPT_TAIL if label == "gpt" else 0)
        swap_file_plan = None
        if swap.file:
            sources = [e["spec"] for e in swap.files if int(e["size"])]
            if self.policy.swap == "file":
                sources = [s["device"] for s in swap.partitions] + sources
            swap_file_plan = SwapFilePlan(swap.file_path, swap.file, file_holder, tuple(sources))
            self.notes.append(f"swap: a {mib(swap.file)} MiB swap file {swap.file_path} in {file_holder}, "
                              f"for the source's {', '.join(sources)} (made by the fix stage)")
        swap_part_plan = next((p for p in partitions if p.swap is not None), None)
        if swap_part_plan is not None:
            self.notes.append(f"swap: a {mib(swap_part_plan.size)} MiB swap partition {swap_part_plan.number}, for "
                              f"the source's {', '.join(self._swap_partition_sources(swap))}")
        if self.layout["lvm"]["lvs"]:
            self.notes.append("LVM on the source is not recreated: the target has plain partitions")
        if self.layout.get("md"):
            self.notes.append("md RAID on the source is not recreated: the target has plain partitions")
        fs_by_mount = {p.filesystem.mountpoint: p for p in partitions if p.filesystem is not None}
        copies = tuple(CopyPlan(m.mountpoint, m.device, self._receiver(m.mountpoint, fs_by_mount))
                       for m in self.mounts)
        plan = DiskPlan(
            host=self.host,
            policy=PlanPolicy(layout=self.policy.layout, root_fs=self.policy.root_fs, label=label,
                              swap=self.policy.swap, size=self.policy.size,
                              headroom_percent=self.policy.headroom_percent, min_headroom=self.min_headroom,
                              keep_uuids=self.policy.keep_uuids),
            label=typing.cast(Literal["msdos", "gpt"], label),
            size=disk_size,
            bootloader=self.bootloader,
            firmware=self.firmware,
            kernel=self.kernel,
            partitions=tuple(partitions),
            swap_file=swap_file_plan,
            copies=copies,
            fstab=(),
            notes=(),
            source_swap=swap.total,
        )
        carriers = self._swap_carriers(swap, plan)
        fstab = tuple(self._fstab_change(entry, plan, copies, carriers) for entry in self.layout["fstab"])
        return dataclasses.replace(plan, fstab=fstab, notes=tuple(self.notes))

    def _swap_partition_sources(self, swap: _SwapChoice) -> list[str]:
        sources = [s["device"] for s in swap.partitions]
        if self.policy.swap == "partition":
            sources += [e["spec"] for e in swap.files if int(e["size"])]
        return sources

    def _swap_carriers(self, swap: _SwapChoice, plan: DiskPlan) -> dict[int, str]:
        """fstab line -> "partition" or "file": the source swap line that becomes the planned swap area's line."""
        by_device = {e.get("device"): e for e in self.layout["fstab"] if e.get("status") == "swap"}
        partition_lines = [int(by_device[s["device"]]["line"]) for s in swap.partitions if s["device"] in by_device]
        file_lines = [int(e["line"]) for e in swap.files if int(e["size"])]
        carriers: dict[int, str] = {}
        if plan.swap_partition is not None:
            line = (partition_lines or file_lines)[:1]
            carriers.update(dict.fromkeys(line, "partition"))
        if plan.swap_file is not None:
            line = [n for n in file_lines if n not in carriers][:1] or \
                [n for n in partition_lines if n not in carriers][:1]
            carriers.update(dict.fromkeys(line, "file"))
        return carriers

    @staticmethod
    def _receiver(mountpoint: str, fs_mounts: Iterable[str]) -> str:
        """The deepest filesystem (of `fs_mounts`, "/" among them) whose mountpoint contains `mountpoint`."""
        candidates = [m for m in fs_mounts if m == "/" or mountpoint == m or mountpoint.startswith(m + "/")]
        return max(candidates, key=len)

    def _final_sizes(self, slots: Sequence[tuple[Role, _Draft | None, int]], label: str) -> list[int]:
        minimum = [size for _, _, size in slots]
        wanted = [draft.auto_size if draft is not None else size for _, draft, size in slots]
        overhead = _layout_overhead(len(slots), label)
        if self.policy.size == "auto":
            return wanted
        explicit = parse_size(self.policy.size)
        needed = sum(minimum) + overhead
        if explicit < needed:
            parts = [f"{d.mountpoint} {mib(size)} MiB for {mib(d.payload)} MiB of data" if d
                     else f"{role} {mib(size)} MiB" for (role, d, size) in slots]
            parts.append(f"partition table {mib(overhead)} MiB")
            raise P2VError(
                f"target size {mib(explicit)} MiB is too small: the data needs {mib(needed)} MiB "
                f"({'; '.join(parts)}; without headroom)",
                hint=f"set target.size to at least {mib(needed)}M, or auto, in {self.spec_file}",
            )
        slack = explicit - needed
        sizes = list(minimum)
        for index, (_, draft, _) in enumerate(slots):
            if draft is None or draft.mountpoint == "/":
                continue
            extra = min(wanted[index] - minimum[index], slack)
            sizes[index] += extra
            slack -= extra
            if sizes[index] < wanted[index]:
                self._short_headroom(draft, sizes[index] - minimum[index])
        root_index = len(slots) - 1
        sizes[root_index] += slack
        root = slots[root_index][1]
        assert root is not None
        if sizes[root_index] < wanted[root_index]:
            self._short_headroom(root, sizes[root_index] - minimum[root_index])
        return sizes

    def _short_headroom(self, draft: _Draft, extra: int) -> None:
        self._note(f"{draft.mountpoint}: about {mib(extra)} MiB free for growth, less than the policy's "
                   f"{mib(draft.headroom)} MiB headroom (target.size {self.policy.size})")

    def _lay_out(self, slots: Sequence[tuple[Role, _Draft | None, int]], sizes: Sequence[int], label: str,
                 source_swaps: Sequence[Mapping[str, Any]]) -> list[PartitionPlan]:
        types_ = MSDOS_TYPES if label == "msdos" else GPT_TYPES
        extended = label == "msdos" and len(slots) > 4
        partitions: list[PartitionPlan] = []
        position = FIRST_PARTITION_START
        number = 0
        boot_mount = "/boot" if any(d is not None and d.mountpoint == "/boot" for _, d, _ in slots) else "/"
        total_end = sum(sizes) + _layout_overhead(len(slots), label)  # msdos: the end of the last partition
        for index, ((role, draft, _), size) in enumerate(zip(slots, sizes, strict=True)):
            kind: Literal["primary", "logical"] = "primary"
            if extended and index >= 3:
                if index == 3:
                    partitions.append(PartitionPlan(
                        number=4, start=position, size=total_end - position, role="extended", kind="extended",
                        type_id=MSDOS_TYPES["extended"], flags=()))
                    number = 4
                position += EBR_GAP
                kind = "logical"
            number += 1
            flags: list[str] = []
            filesystem = swap = None
            if role == "bios_boot":
                type_id = types_["bios_boot"]
                flags.append("bios_grub")
            elif role == "swap":
                type_id = types_["swap"]
                swap = self._swap_plan(source_swaps)
            else:
                assert draft is not None
                filesystem = self._finish(draft, size)
                type_id = types_["esp"] if filesystem.esp else types_["filesystem"]
                if filesystem.esp:
                    flags.append("esp")
                if draft.mountpoint == boot_mount and self.firmware == "bios":
                    if label == "msdos":
                        flags.append("boot")
                    elif self.bootloader == "extlinux":
                        flags.append("legacy_boot")
            partitions.append(PartitionPlan(number=number, start=position, size=size, role=role, kind=kind,
                                            type_id=type_id, flags=tuple(flags), filesystem=filesystem, swap=swap))
            position += size
        return partitions

    def _swap_plan(self, source_swaps: Sequence[Mapping[str, Any]]) -> SwapPlan:
        first = source_swaps[0] if source_swaps else {}
        label = first.get("label", "")
        uuid = first.get("uuid") if self.policy.keep_uuids and first.get("uuid") else None
        argv = ["mkswap"]
        if label:
            argv += ["-L", label]
        if uuid:
            argv += ["-U", uuid]
        return SwapPlan(label=label, uuid=uuid, keep_uuid=uuid is not None, mkswap=tuple(argv),
                        sources=self.swap_partition_sources)

    def _finish(self, draft: _Draft, size: int) -> FilesystemPlan:
        """The filesystem at its final size, with its exact mkfs command."""
        inodes = None
        features: tuple[str, ...] = ()
        features_off: tuple[str, ...] = ()
        if draft.fstype in EXT_TYPES:
            assert draft.features is not None and draft.block_size and draft.inode_size
            enabled = set(draft.features)
            if size // draft.block_size >= 1 << 32 and "64bit" not in enabled:
                enabled.add("64bit")
                self.notes.append(f"{draft.mountpoint}: 64bit added, the filesystem is too large without it")
            inodes = max(size // ext_inode_ratio(size), draft.inodes_needed)
            features = tuple(sorted(enabled))
            features_off = tuple(f for f in EXT_NEWER_DEFAULTS if f not in enabled)
            argv = [f"mkfs.{draft.fstype}", "-F", "-b", str(draft.block_size), "-I", str(draft.inode_size),
                    "-N", str(inodes), "-O", ",".join(["none", *features, *(f"^{f}" for f in features_off)]),
                    # A new sparse file reads as zeros: no need to write the journal and inode tables.
                    "-E", "lazy_itable_init=1,lazy_journal_init=1"]
            if draft.label:
                argv += ["-L", draft.label]
            if draft.uuid:
                argv += ["-U", draft.uuid]
        elif draft.fstype == "xfs":
            assert draft.xfs is not None
            flags = draft.xfs
            features = tuple(f"{k}={flags[k]}" for k in XFS_FLAGS)
            meta = ",".join(f"{k}={flags[k]}" for k in XFS_META_FLAGS)
            if draft.uuid:
                meta += f",uuid={draft.uuid}"
            inode = f"size={draft.inode_size}," + ",".join(f"{k}={flags[k]}" for k in XFS_INODE_FLAGS)
            if draft.projid32bit == 0:
                inode += ",projid32bit=0"
            argv = ["mkfs.xfs", "-f", "-b", f"size={draft.block_size}", "-m", meta, "-i", inode,
                    "-n", f"size={draft.naming_size},ftype={flags['ftype']}"]
            if draft.label:
                argv += ["-L", draft.label]
        else:
            argv = ["mkfs.fat", "-F", "32"]
            if draft.label:
                argv += ["-n", draft.label]
            if draft.uuid:
                argv += ["-i", draft.uuid.replace("-", "")]
        return FilesystemPlan(
            mountpoint=draft.mountpoint, fstype=draft.fstype, label=draft.label, uuid=draft.uuid,
            keep_uuid=draft.uuid is not None, features=features, features_off=features_off,
            features_from=draft.features_from, block_size=draft.block_size,
            inode_size=draft.inode_size or None, inodes=inodes, mkfs=tuple(argv), sources=draft.sources,
            used_bytes=self._used(draft.sources), headroom=draft.headroom,
            overhead=draft.overhead(size),
        )

    # -- fstab mapping

    def _fstab_change(self, entry: Mapping[str, Any], plan: DiskPlan, copies: Sequence[CopyPlan],
                      carriers: Mapping[int, str]) -> FstabChange:
        base = {"line": int(entry["line"]), "spec": entry["spec"], "file": entry["file"],
                "vfstype": entry["vfstype"]}
        options = tuple(entry.get("options", ()))
        status = entry.get("status")
        if status in ("skipped", "unresolved"):
            return FstabChange(**base, action="keep", target=None, new_spec=None, new_vfstype=None,
                               new_options=options, new_passno=None, dropped_options=(),
                               reason=f"{status}: {entry.get('reason', '')}")
        if status in ("swap", "swapfile"):
            return self._swap_change(entry, base, options, plan, carriers.get(int(entry["line"])))
        mountpoint = entry["file"]
        fs_mounts = {fs.mountpoint for fs in plan.filesystems}
        if mountpoint not in fs_mounts:
            receiver = next((c.target_mountpoint for c in copies if c.source_mountpoint == mountpoint), None)
            if receiver is None:
                raise P2VError(f"layout.json: fstab line {entry['line']} mounts {mountpoint}, which is not among "
                               "its mounts", hint="rerun inspect:<host>")
            return self._removed(base, options, f"merged into {receiver}", target=receiver)
        part = plan.partition_of(mountpoint)
        fs = part.filesystem
        assert fs is not None
        source_type = entry["vfstype"]
        if fs.fstype == source_type or source_type == "auto":
            kept, dropped = options, ()
        else:
            kept = tuple(o for o in options if o in GENERIC_MOUNT_OPTIONS or o.startswith(("x-", "comment=")))
            dropped = tuple(o for o in options if o not in kept)
            kept = kept or ("defaults",)
        passno = int(entry.get("passno", 0))
        if fs.fstype == "xfs" or fs.fstype != source_type:
            passno = 0 if fs.fstype == "xfs" else (1 if mountpoint == "/" else 2)
        return FstabChange(**base, action="replace", target=mountpoint,
                           new_spec=_new_spec(entry["spec"], fs.label, fs.uuid), new_vfstype=fs.fstype,
                           new_options=kept, new_passno=passno, dropped_options=dropped,
                           reason=f"partition {part.number}")

    def _swap_change(self, entry: Mapping[str, Any], base: Mapping[str, Any], options: tuple[str, ...],
                     plan: DiskPlan, carries: str | None) -> FstabChange:
        """A source swap line: the line of a planned swap area, or removed saying what (if anything) replaced it."""
        part = plan.swap_partition
        swap_file = plan.swap_file
        if carries == "partition" and part is not None and part.swap is not None:
            return FstabChange(**base, action="replace", target="swap",
                               new_spec=_new_spec(entry["spec"], part.swap.label, part.swap.uuid),
                               new_vfstype="swap", new_options=options, new_passno=0, dropped_options=(),
                               reason=f"swap partition {part.number}")
        if carries == "file" and swap_file is not None:
            return FstabChange(**base, action="replace", target=swap_file.path, new_spec=swap_file.path,
                               new_vfstype="swap", new_options=options, new_passno=0, dropped_options=(),
                               reason=f"swap file {swap_file.path}, made by the fix stage")
        is_file = entry.get("status") == "swapfile"
        what = "swap file, not copied; " if is_file else ""
        if is_file and not int(entry.get("size") or 0):
            return self._removed(base, options, f"{entry.get('reason') or 'an empty swap file'}: "
                                                "no swap planned for it")
        if plan.policy.swap == "none":
            return self._removed(base, options, "swap: none")
        # Which planned area this source swap went into: one of its own kind when there is one.
        into_file = swap_file is not None and entry.get("device", entry["spec"]) in swap_file.sources
        if into_file and swap_file is not None:
            return self._removed(base, options, f"{what}merged into the swap file {swap_file.path}")
        if part is not None:
            return self._removed(base, options, f"{what}merged into swap partition {part.number}")
        raise P2VError(f"internal: no planned swap for fstab line {entry['line']} ({entry['spec']})")

    @staticmethod
    def _removed(base: Mapping[str, Any], options: tuple[str, ...], reason: str,
                 target: str | None = None) -> FstabChange:
        return FstabChange(**base, action="remove", target=target, new_spec=None, new_vfstype=None,
                           new_options=(), new_passno=None, dropped_options=(), reason=reason)


def _layout_overhead(count: int, label: str) -> int:
    """Bytes outside the partitions: the first MiB, EBR gaps, the backup GPT."""
    gaps = FIRST_PARTITION_START
    if label == "msdos" and count > 4:
        gaps += EBR_GAP * (count - 3)
    if label == "gpt":
        gaps += GPT_TAIL
    return gaps


def _new_spec(old_spec: str, label: str, uuid: str | None) -> str | None:
    """The source's style where it still holds (LABEL= with a kept label), else UUID=."""
    kind, _ = source_kind(old_spec)
    if kind == "label" and label:
        return f"LABEL={label}"
    return f"UUID={uuid}" if uuid else None


def _fill_new_spec(change: FstabChange, plan: DiskPlan) -> FstabChange:
    if change.action != "replace" or change.new_spec is not None:
        return change
    if change.target == "swap":
        swap = next(p.swap for p in plan.partitions if p.swap is not None)
        return dataclasses.replace(change, new_spec=_new_spec(change.spec, swap.label, swap.uuid))
    fs = plan.filesystem(change.target or "")
    return dataclasses.replace(change, new_spec=_new_spec(change.spec, fs.label, fs.uuid))


# ---------------------------------------------------------------- the table


def _size(value: int) -> str:
    return f"{mib(value)} MiB" if value < 10 * GiB else f"{value / GiB:.1f} GiB"


def _wrap(items: Sequence[str], width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for item in items:
        piece = item if not current else f",{item}"
        if current and len(current) + len(piece) > width:
            lines.append(current + ",")
            current = item
        else:
            current += piece
    if current:
        lines.append(current)
    return lines or ["-"]


_GPT_NAMES = {GPT_TYPES["filesystem"]: "linux", GPT_TYPES["swap"]: "swap", GPT_TYPES["esp"]: "esp",
              GPT_TYPES["bios_boot"]: "bios"}


def swap_summary(plan: DiskPlan) -> str:
    """What the plan does with swap, against what the source had, in one line."""
    areas = []
    part = plan.swap_partition
    if part is not None:
        areas.append(f"swap partition p{part.number} of {_size(part.size)}")
    if plan.swap_file is not None:
        areas.append(f"swap file {plan.swap_file.path} of {_size(plan.swap_file.size)} (made by the fix stage)")
    if plan.source_swap is None:
        had = "the plan does not record the source's swap (made by an older p2v)"
    else:
        had = f"the source had {_size(plan.source_swap)} of swap in fstab" if plan.source_swap else \
            "the source had no swap"
    if plan.policy.swap == "none" and plan.source_swap:
        return f"{had}; none planned (target.swap: none)"
    return f"{had}; " + (" and ".join(areas) if areas else "none planned")


def render_plan(plan: DiskPlan) -> str:
    """The plan as a table for operators (`doit plan:<host>`)."""
    policy = plan.policy
    lines = [
        f"{plan.host}: {policy.layout}, {plan.label}, {_size(plan.size)} disk "
        f"(size {policy.size}, headroom {policy.headroom_percent}% or at least {_size(policy.min_headroom)}); "
        f"{plan.bootloader} on {plan.firmware}; features for kernel {plan.kernel or 'unknown'}",
        "",
    ]
    header = ("SOURCE", "DEVICE", "TYPE", "USED", "", "TARGET", "PART", "TYPE", "SIZE")
    rows: list[tuple[str, ...]] = []
    for copy in plan.copies:
        fs = plan.filesystem(copy.target_mountpoint)
        part = plan.partition_of(copy.target_mountpoint)
        source = next(s for s in fs.sources if s.mountpoint == copy.source_mountpoint)
        if copy.target_mountpoint == copy.source_mountpoint:
            target = (copy.target_mountpoint, f"p{part.number}", fs.fstype, _size(part.size))
        else:
            target = (f"(into {copy.target_mountpoint})", f"p{part.number}", "", "")
        rows.append((copy.source_mountpoint, source.device, source.fstype, _size(source.used_bytes), "->", *target))
    for part in plan.partitions:
        if part.swap is not None:
            sources = ", ".join(part.swap.sources) or "-"
            rows.append(("swap", sources, "swap", "", "->", "swap", f"p{part.number}", "swap", _size(part.size)))
    if plan.swap_file is not None:
        rows.append(("swap", ", ".join(plan.swap_file.sources) or "-", "swap", "", "->", plan.swap_file.path,
                     f"(file in {plan.swap_file.filesystem})", "swap", _size(plan.swap_file.size)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())

    lines += ["", f"  swap: {swap_summary(plan)}"]
    lines += ["", "  partitions:"]
    for part in plan.partitions:
        what: str = part.role
        if part.filesystem is not None:
            fs = part.filesystem
            label = f" label {fs.label!r}" if fs.label else ""
            uuid = f" UUID {fs.uuid}" if fs.uuid else " new UUID"
            what = f"{fs.fstype} {fs.mountpoint}{label}{uuid}"
        elif part.swap is not None:
            what = "swap" + (f" label {part.swap.label!r}" if part.swap.label else "") + \
                (f" UUID {part.swap.uuid}" if part.swap.uuid else " new UUID")
        flags = f" [{','.join(part.flags)}]" if part.flags else ""
        type_name = _GPT_NAMES.get(part.type_id, part.type_id)
        lines.append(f"  p{part.number:<2} {mib(part.start):>7} MiB +{_size(part.size):>10}  "
                     f"{part.kind:<8} {type_name:<5} {what}{flags}")
        if part.filesystem is not None:
            fs = part.filesystem
            lines.append(f"       data {_size(fs.used_bytes)}, headroom {_size(fs.headroom)}, "
                         f"overhead ~{_size(fs.overhead)}; features: {fs.features_from}")
            shown = [*fs.features, *(f"^{f}" for f in fs.features_off)]
            lines += [f"         {line}" for line in _wrap(shown, 90)]
    changes = [c for c in plan.fstab if c.action != "keep"]
    if changes:
        lines += ["", "  fstab:"]
        for change in changes:
            if change.action == "remove":
                lines.append(f"    line {change.line}: {change.file} ({change.spec}) removed: {change.reason}")
            else:
                new = change.new_spec or "UUID=<new>"
                extra = f", options {','.join(change.new_options)}" if change.dropped_options else ""
                lines.append(f"    line {change.line}: {change.file} {change.spec} -> {new} "
                             f"{change.new_vfstype}{extra}")
    if plan.notes:
        lines += ["", "  notes:"]
        lines += [f"    - {note}" for note in plan.notes]
    return "\n".join(lines)
