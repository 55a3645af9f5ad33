"""How the sync stage fills each target filesystem: by the source filesystem's used blocks, or
file by file (target.copy: auto, blocks or files).

A block copy (tasks/lib/copy/blocks.py) makes the target filesystem out of the source's own:
e2image or xfs_copy writes its used blocks, resize2fs or xfs_growfs brings it to the partition's
size, and it gets the planned UUID and label. That can only stand for a filesystem the plan
would have made the same: the same type, the same features (the plan keeps the source's where
the oldest kernel and the bootloader read them, tasks/lib/planning/features.py), block and
inode size. Everything else goes by files:

- a source filesystem merged into another target filesystem (flatten: /srv into /): its blocks
  would be a filesystem of their own;
- a type or feature change (target.root_fs, features dropped for an old kernel);
- a source whose journal needs recovery: its blocks hold the unreplayed journal, and the copy
  reads the replayed view (tasks/lib/replay.py) file by file;
- an xfs source on a device larger than the target partition: xfs cannot shrink;
- an xfs source that gets a new UUID: on v5, xfs_admin -U would add the meta_uuid feature (a kept
  UUID goes by blocks; v4, which has no such problem, is not mountable on the kernels p2v is tested
  on, so it is not sent by blocks either);
- an ext source that would keep too few inodes once shrunk to the partition.

An ext source on a larger device than its partition is shrunk in a scratch copy first; whether
resize2fs can shrink it that far is only known when it tries, and the sync stage copies by files
if it cannot (its receipt says so). The choice is pure: layout.json and the plan, nothing read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from tasks.lib.planning.context import PlanContext
from tasks.lib.planning.features import XFS_FLAGS, ext_feature_set, xfs_flags
from tasks.lib.planning.model import EXT_TYPES, CopyPlan, FilesystemPlan, PartitionPlan, mib
from tasks.lib.runner import P2VError

BLOCK_TYPES = (*EXT_TYPES, "xfs")
BLOCK_TOOLS = {"ext2": "e2image", "ext3": "e2image", "ext4": "e2image", "xfs": "xfs_copy"}
INODE_MARGIN = 1.05  # free inodes a shrunk ext filesystem must keep beyond what its sources use


def choose_copy_methods(ctx: PlanContext, copies: Sequence[CopyPlan],
                        partitions: Sequence[PartitionPlan]) -> tuple[CopyPlan, ...]:
    """Each copy with its method and why; target.copy: blocks refuses a filesystem that cannot go by blocks."""
    wanted = ctx.policy.copy
    by_mount = {p.filesystem.mountpoint: p for p in partitions if p.filesystem is not None}
    chosen = []
    for copy in copies:
        part = by_mount[copy.target_mountpoint]
        assert part.filesystem is not None
        fs = part.filesystem
        if fs.esp:
            chosen.append(dataclasses.replace(copy, method="files", why="an ESP: copied by mtools"))
            continue
        if copy.source_mountpoint != copy.target_mountpoint:
            chosen.append(dataclasses.replace(copy, method="files", why=f"merged into {copy.target_mountpoint}"))
            continue
        source = ctx.by_device[copy.source_device]
        against, resize = _against_blocks(source, fs, part)
        if wanted == "files":
            chosen.append(dataclasses.replace(copy, method="files", why="target.copy: files"))
        elif against is None:
            chosen.append(dataclasses.replace(copy, method="blocks", resize=resize,
                                              why=_blocks_why(fs.fstype, resize)))
        elif wanted == "blocks":
            raise P2VError(f"{ctx.spec_file}: target.copy: blocks, but {copy.source_mountpoint} "
                           f"({copy.source_device}) cannot be copied by blocks: {against}",
                           hint="set target.copy to auto (blocks wherever they serve) or files")
        else:
            chosen.append(dataclasses.replace(copy, method="files", why=against))
    return tuple(chosen)


def _blocks_why(fstype: str, resize: str) -> str:
    tool = BLOCK_TOOLS[fstype]
    if resize == "shrink":
        return (f"{tool}, then resize2fs shrinks it to the partition in a scratch copy "
                "(by files if it cannot shrink that far)")
    grower = "xfs_growfs" if fstype == "xfs" else "resize2fs"
    return f"{tool}, then {grower} grows it to the partition"


Resize = Literal["grow", "shrink", "none"]


def _against_blocks(source: Mapping[str, Any], fs: FilesystemPlan,
                    part: PartitionPlan) -> tuple[str | None, Resize]:
    """Why the source filesystem cannot become `fs` by its blocks (None: it can), and how it is resized."""
    fstype = str(source.get("type"))
    if fstype not in BLOCK_TYPES:
        return f"no block copy for {fstype}", "none"
    if fstype != fs.fstype:
        return f"the source is {fstype}, the target {fs.fstype}", "none"
    if source.get("needs_recovery"):
        return "its journal needs recovery: copied from the replayed view", "none"
    changed = _feature_change(source, fs)
    if changed:
        return f"the target's features differ from the source's ({changed})", "none"
    device = int(source.get("size") or 0)
    if not device:
        return "layout.json records no size for its device", "none"
    if fstype == "xfs" and not fs.keep_uuid:
        return ("xfs goes by blocks only with its UUID kept (target.keep_uuids: true): a new UUID on a v5 xfs "
                "adds the meta_uuid feature, which the plan does not carry"), "none"
    if part.size >= device:
        return None, "grow"
    if fstype == "xfs":
        return (f"xfs cannot shrink, and the partition ({mib(part.size)} MiB) is smaller than the source's "
                f"device ({mib(device)} MiB)"), "none"
    inodes = int(source.get("inodes") or 0)
    needed = sum(s.used_inodes for s in fs.sources)
    kept = inodes * part.size // device
    if kept < needed * INODE_MARGIN:
        return (f"shrunk to the partition it would keep about {kept} inodes, and its data needs {needed} "
                f"(with {INODE_MARGIN - 1:.0%} to spare)"), "none"
    return None, "shrink"


def _feature_change(source: Mapping[str, Any], fs: FilesystemPlan) -> str:
    """What differs between the source filesystem's format and the planned one, in a few words ('' if nothing)."""
    if fs.fstype in EXT_TYPES:
        have = ext_feature_set(source.get("features", []))
        want = set(fs.features)
        parts = [f"+{f}" for f in sorted(want - have)] + [f"-{f}" for f in sorted(have - want)]
        for key in ("block_size", "inode_size"):
            if int(source.get(key) or 0) != getattr(fs, key):
                parts.append(f"{key.replace('_', ' ')} {source.get(key)} -> {getattr(fs, key)}")
        return ", ".join(parts)
    flags = xfs_flags(source.get("features", {}))
    have_flags = tuple(f"{k}={flags[k]}" for k in XFS_FLAGS)
    parts = [f"{h} -> {w}" for h, w in zip(have_flags, fs.features, strict=True) if h != w]
    isize = source.get("features", {}).get("isize")
    if isize is not None and int(isize) != fs.inode_size:
        parts.append(f"inode size {isize} -> {fs.inode_size}")
    bsize = source.get("features", {}).get("data.bsize")
    if bsize is not None and int(bsize) != fs.block_size:
        parts.append(f"block size {bsize} -> {fs.block_size}")
    return ", ".join(parts)
