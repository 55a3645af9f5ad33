"""Filesystem features: the exact set a target filesystem gets (as on the source, shared by the
source's filesystems of that type, or a baseline for the oldest kernel), and how what mkfs
made differs from the plan.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tasks.lib.planning.model import EXT_TYPES, PartitionPlan, SourceMount
from tasks.lib.runner import P2VError

if TYPE_CHECKING:  # the context imports oldest_kernel from here
    from tasks.lib.planning.context import PlanContext

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


def ext_feature_set(features: Iterable[str]) -> set[str]:
    return {"extent" if f == "extents" else f for f in features} - EXT_STATE_FLAGS


def xfs_flags(features: Mapping[str, Any]) -> dict[str, int]:
    return {flag: int(features.get(flag, 0) or 0) for flag in XFS_FLAGS}


def era_ext_features(fstype: str, kernel: str | None) -> tuple[set[str], str]:
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


def era_xfs_features(kernel: str | None) -> tuple[dict[str, int], int, str]:
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


def ext_features_for(ctx: PlanContext, mount: SourceMount, fstype: str) -> tuple[set[str], str, int, int]:
    """(features, where from, block size, inode size) for an ext target made for `mount`."""
    source = ctx.by_device[mount.device]
    if mount.fstype == fstype:
        features = ext_feature_set(source.get("features", []))
        dropped = sorted(features & {"mmp"})
        if dropped:
            ctx.note(f"{mount.mountpoint}: {', '.join(dropped)} not carried over")
            features -= set(dropped)
        return (features, f"as on the source {mount.mountpoint} ({mount.device})",
                int(source.get("block_size") or 4096), int(source.get("inode_size") or 256))
    proof = [fs for fs in ctx.by_device.values() if fs["type"] == fstype and fs.get("features")]
    if proof:
        shared = set.intersection(*(ext_feature_set(fs["features"]) for fs in proof)) - {"mmp"}
        names = ", ".join(sorted(fs["device"] for fs in proof))
        inode_size = min(int(fs.get("inode_size") or 256) for fs in proof)
        return shared, f"shared by the source's {fstype} filesystems ({names})", 4096, inode_size
    features, where = era_ext_features(fstype, ctx.kernel)
    inode_size = 128 if ctx.bootloader == "grub-legacy" and fstype != "ext4" else 256
    return features, where, 4096, inode_size


def xfs_features_for(ctx: PlanContext, mount: SourceMount,
                     fstype: str) -> tuple[dict[str, int], str, int, int, int, int]:
    """(flags, where from, block size, inode size, naming block size, projid32bit)."""
    source = ctx.by_device[mount.device]
    if mount.fstype == fstype:
        features = source.get("features", {})
        return (xfs_flags(features), f"as on the source {mount.mountpoint} ({mount.device})",
                int(features.get("data.bsize", 4096)), int(features.get("isize", 512)),
                int(features.get("naming.bsize", 4096)), int(features.get("projid32bit", 1)))
    proof = [fs for fs in ctx.by_device.values() if fs["type"] == "xfs" and fs.get("features")]
    if proof:
        flags = {flag: min(xfs_flags(fs["features"])[flag] for fs in proof) for flag in XFS_FLAGS}
        names = ", ".join(sorted(fs["device"] for fs in proof))
        inode_size = 512 if flags["crc"] else 256
        return flags, f"shared by the source's xfs filesystems ({names})", 4096, inode_size, 4096, 1
    flags, inode_size, where = era_xfs_features(ctx.kernel)
    return flags, where, 4096, inode_size, 4096, 1


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
        have = ext_feature_set(found.get("features", []))
        want = set(fs_plan.features)
        if have != want:
            problems.append(f"features {', '.join(sorted(have - want)) or '-'} not planned, "
                            f"{', '.join(sorted(want - have)) or '-'} missing")
        for key in ("block_size", "inode_size"):
            if found.get(key) != getattr(fs_plan, key):
                problems.append(f"{key.replace('_', ' ')} {found.get(key)}, planned {getattr(fs_plan, key)}")
    elif fs_plan.fstype == "xfs":
        flags = xfs_flags(found.get("features", {}))
        have_flags = tuple(f"{k}={flags[k]}" for k in XFS_FLAGS)
        wrong = [f"{h} (planned {w})" for h, w in zip(have_flags, fs_plan.features, strict=True) if h != w]
        if wrong:
            problems.append("xfs " + ", ".join(wrong))
        if found.get("features", {}).get("isize") != fs_plan.inode_size:
            problems.append(f"inode size {found.get('features', {}).get('isize')}, planned {fs_plan.inode_size}")
    return problems
