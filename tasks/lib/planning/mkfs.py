"""The exact mkfs and mkswap commands of each planned filesystem and swap partition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.lib.planning.context import PlanContext
from tasks.lib.planning.features import EXT_NEWER_DEFAULTS, XFS_FLAGS, XFS_INODE_FLAGS, XFS_META_FLAGS
from tasks.lib.planning.model import EXT_TYPES, FilesystemPlan, SwapPlan
from tasks.lib.planning.sizing import TargetDraft, ext_inode_ratio


def finish_filesystem(ctx: PlanContext, draft: TargetDraft, size: int) -> FilesystemPlan:
    """The filesystem at its final size, with its exact mkfs command."""
    inodes = None
    features: tuple[str, ...] = ()
    features_off: tuple[str, ...] = ()
    if draft.fstype in EXT_TYPES:
        assert draft.features is not None and draft.block_size and draft.inode_size
        enabled = set(draft.features)
        if size // draft.block_size >= 1 << 32 and "64bit" not in enabled:
            enabled.add("64bit")
            ctx.notes.append(f"{draft.mountpoint}: 64bit added, the filesystem is too large without it")
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
        used_bytes=ctx.used(draft.sources), headroom=draft.headroom,
        overhead=draft.overhead(size),
    )


def swap_plan(ctx: PlanContext, source_swaps: Sequence[Mapping[str, Any]]) -> SwapPlan:
    first = source_swaps[0] if source_swaps else {}
    label = first.get("label", "")
    uuid = first.get("uuid") if ctx.policy.keep_uuids and first.get("uuid") else None
    argv = ["mkswap"]
    if label:
        argv += ["-L", label]
    if uuid:
        argv += ["-U", uuid]
    return SwapPlan(label=label, uuid=uuid, keep_uuid=uuid is not None, mkswap=tuple(argv),
                    sources=ctx.swap_partition_sources)
