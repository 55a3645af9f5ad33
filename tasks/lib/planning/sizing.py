"""Sizes: each filesystem's data, headroom and the new filesystem's own overhead, and how an
explicit target.size is shared out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasks.lib.planning.context import PlanContext
from tasks.lib.planning.features import ext_features_for, xfs_features_for
from tasks.lib.planning.model import (
    EBR_GAP,
    EXT_TYPES,
    FIRST_PARTITION_START,
    GPT_TAIL,
    SUPPORTED_TYPES,
    GiB,
    MiB,
    Role,
    SourceMount,
    mib,
    parse_size,
    round_up_mib,
)
from tasks.lib.runner import P2VError


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
class TargetDraft:
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


def layout_overhead(count: int, label: str) -> int:
    """Bytes outside the partitions: the first MiB, EBR gaps, the backup GPT."""
    gaps = FIRST_PARTITION_START
    if label == "msdos" and count > 4:
        gaps += EBR_GAP * (count - 3)
    if label == "gpt":
        gaps += GPT_TAIL
    return gaps


def make_draft(ctx: PlanContext, base: SourceMount, members: Sequence[SourceMount], is_root: bool,
               swap_file: int) -> TargetDraft:
    fstype = ctx.root_type(base) if is_root else base.fstype
    if fstype not in SUPPORTED_TYPES:
        raise P2VError(f"{base.mountpoint} is {fstype}, which p2v does not make ({', '.join(SUPPORTED_TYPES)})")
    features: frozenset[str] | None = None
    xfs: dict[str, int] | None = None
    naming: int | None = None
    projid = 1
    if fstype in EXT_TYPES:
        ext, where, block_size, inode_size = ext_features_for(ctx, base, fstype)
        features = frozenset(ext)
    elif fstype == "xfs":
        xfs, where, block_size, inode_size, naming, projid = xfs_features_for(ctx, base, fstype)
    else:
        where, block_size, inode_size = f"as on the source {base.mountpoint} ({base.device})", 4096, 0
    label = base.label
    limit = {"xfs": 12, "vfat": 11}.get(fstype, 16)
    if len(label.encode()) > limit:
        raise P2VError(f"{base.mountpoint}: label {label!r} is longer than {fstype} allows ({limit} bytes)",
                       hint="set target.root_fs to the source's type, or shorten the label on the server")
    uuid = None
    if ctx.policy.keep_uuids and base.uuid:
        uuid = base.uuid
        if fstype == "vfat" and not re.fullmatch(r"[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}", uuid):
            uuid = None
    used = ctx.used(members)
    allowance = 0
    for member in members:
        source_block = ctx.source_block_size(member)
        if member.fstype != fstype or source_block < block_size:
            # Small files and directories round up to the new block size.
            allowance += member.used_inodes * block_size // 2
    used_inodes = sum(m.used_inodes for m in members)
    inodes_needed = math.ceil(used_inodes * (100 + ctx.policy.headroom_percent) / 100) + 1024
    return TargetDraft(
        mountpoint=base.mountpoint, fstype=fstype, label=label, uuid=uuid, features=features, xfs=xfs,
        features_from=where, block_size=block_size, inode_size=inode_size, naming_size=naming,
        projid32bit=projid, sources=tuple(members), payload=used + allowance + swap_file,
        headroom=ctx.headroom(used), inodes_needed=inodes_needed,
    )


def final_sizes(ctx: PlanContext, slots: Sequence[tuple[Role, TargetDraft | None, int]], label: str) -> list[int]:
    minimum = [size for _, _, size in slots]
    wanted = [draft.auto_size if draft is not None else size for _, draft, size in slots]
    overhead = layout_overhead(len(slots), label)
    if ctx.policy.size == "auto":
        return wanted
    explicit = parse_size(ctx.policy.size)
    needed = sum(minimum) + overhead
    if explicit < needed:
        parts = [f"{d.mountpoint} {mib(size)} MiB for {mib(d.payload)} MiB of data" if d
                 else f"{role} {mib(size)} MiB" for (role, d, size) in slots]
        parts.append(f"partition table {mib(overhead)} MiB")
        raise P2VError(
            f"target size {mib(explicit)} MiB is too small: the data needs {mib(needed)} MiB "
            f"({'; '.join(parts)}; without headroom)",
            hint=f"set target.size to at least {mib(needed)}M, or auto, in {ctx.spec_file}",
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
            _short_headroom(ctx, draft, sizes[index] - minimum[index])
    root_index = len(slots) - 1
    sizes[root_index] += slack
    root = slots[root_index][1]
    assert root is not None
    if sizes[root_index] < wanted[root_index]:
        _short_headroom(ctx, root, sizes[root_index] - minimum[root_index])
    return sizes


def _short_headroom(ctx: PlanContext, draft: TargetDraft, extra: int) -> None:
    ctx.note(f"{draft.mountpoint}: about {mib(extra)} MiB free for growth, less than the policy's "
             f"{mib(draft.headroom)} MiB headroom (target.size {ctx.policy.size})")
