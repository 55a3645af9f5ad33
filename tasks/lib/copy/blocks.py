"""The used-block fast path: a target filesystem made from the source filesystem's own blocks.

    fill_by_blocks(job, log_file) -> BlockOutcome

The plan chose it (tasks/lib/planning/copy_method.py): the same type, the same features, no
journal to recover. Here, with the source read-only and the target's partition attached but not
mounted:

- ext2/3/4: `e2image -ra -p` writes the source's used blocks (metadata and file data) into the
  partition, `e2fsck -f` checks the copy (resize2fs and tune2fs want a freshly checked
  filesystem), `resize2fs` grows it to the partition and `tune2fs -U -L` gives it the planned
  UUID and label. The journal's blocks after its superblock and the inode table blocks that hold
  no inode yet are then discarded, so that disk.img holds no copy of them (each function says why
  nothing reads them), and `e2fsck -fn` checks the result. A source filesystem larger than the
  partition must shrink, and e2image writes each block at its own offset, so it cannot go
  straight into the smaller partition. In the last
  partition of the disk (the usual place of /), it is written at the partition's start and
  past its end (disk.img grows for the while), shrunk there by resize2fs, and disk.img is cut
  back to its size with its last bytes (a GPT's backup) restored. Elsewhere it is copied into a
  sparse scratch file on the work area and shrunk there first. `resize2fs -P` on the read-only
  source says beforehand whether it can shrink that far; if not, nothing is written, and the
  filesystem goes by files (`fallback`).
- xfs: `xfs_copy` (its used blocks, into a partition at least as large as the source's device;
  xfs cannot shrink), with its UUID (-d): the plan sends xfs by blocks only when the UUID is kept,
  as xfs_admin -U would add the meta_uuid feature to a v5 filesystem. `xfs_growfs` grows it once
  mounted.

Then what mkfs's read-back checks in the disk stage is checked again (type, UUID, label,
features, block and inode size: tasks/lib/planning/features.py made_differences), and the new
filesystem is mounted on its own to remove what a file copy would not have brought: the
contents of the excluded directories (/tmp, /run, pseudo and network mount points), swap files,
and whatever lies hidden under the mount points of the source's other filesystems. Each
directory they were removed from gets its times back, as the source has them. Then its free blocks
are discarded (fstrim): disk.img gives back what those removed files and a shrink's moves still
held, which would otherwise be uploaded as data. A work area that cannot punch holes keeps them
allocated, and the receipt says so.

The copy engine (tasks/lib/copy/) then skips that filesystem's own pass, copies the filesystems
merged into it by files, and verifies the whole tree by the same manifest as any copy: a block
copy is proved exactly as strictly as a file copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from tasks.lib import inodeflags, storage
from tasks.lib.copy.commands import _within, assign, filesystem_of
from tasks.lib.copy.model import PassResult
from tasks.lib.copy.passes import _Log
from tasks.lib.paths import write_file_atomically
from tasks.lib.planning.features import made_differences
from tasks.lib.planning.model import EXT_TYPES, CopyPlan, DiskPlan, PartitionPlan
from tasks.lib.progress import Progress
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import CommandError, P2VError, run

log = logging.getLogger("p2v.copy.blocks")


@dataclasses.dataclass(frozen=True)
class BlockJob:
    """One target filesystem to make from one source filesystem's blocks."""

    copy: CopyPlan
    partition: PartitionPlan
    source_node: str  # the source filesystem's device, read-only
    target_node: str  # the target partition, attached, not mounted
    scratch: Path  # on the work area: room for a shrink's scratch copy
    run_dir: Path  # the host's run directory: the new filesystem's own mount point goes there (swept after a kill)
    image: Path  # disk.img
    in_place: bool  # the last partition on the disk: a shrink can run past its end (see _shrink_in_place)
    disk_size: int  # disk.img's planned size
    table: str  # "gpt" or "msdos"
    excluded: tuple[str, ...]  # relative to this filesystem: directories whose contents stay behind
    omitted: tuple[str, ...]  # relative to this filesystem: files left out (swap files)
    hidden: tuple[str, ...]  # relative to this filesystem: the mount points of the source's other filesystems
    # The source filesystem as mounted read-only for the copy: after a shrink, the directory times that
    # resize2fs changed are set back from it (_directory_times_restored).
    source_view: Path | None = None

    @property
    def fstype(self) -> str:
        assert self.partition.filesystem is not None
        return self.partition.filesystem.fstype


@dataclasses.dataclass(frozen=True)
class BlockOutcome:
    """What became of one planned block copy: done (tool, how resized), or gone by files (fallback: why)."""

    mountpoint: str
    tool: str  # "e2image" or "xfs_copy"
    resize: str  # "grow", "shrink in place" or "shrink in a scratch copy": what was done
    seconds: float
    bytes_written: int  # the blocks the tool wrote: the source filesystem's used blocks
    removed: int = 0  # entries removed afterwards (excluded contents, swap files, hidden under mount points)
    released: int = 0  # bytes disk.img gave back when the new filesystem's free blocks were discarded (fstrim)
    trim_failed: str | None = None  # set: fstrim could not discard them, and they stay allocated (its output)
    fallback: str | None = None  # set: the partition was left untouched and the filesystem goes by files
    earlier: bool = False  # done by an earlier run into this disk.img: this run's copy brings it up to date by files

    def receipt(self) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "earlier"}

    def pass_result(self) -> PassResult:
        """The copy engine's record of this filesystem's pass (it skips the pass: tasks/lib/copy/__init__.py)."""
        return PassResult(mountpoint=self.mountpoint, tool=self.tool, resumed=False, seconds=self.seconds,
                          bytes_transferred=self.bytes_written, files_transferred=None, excluded_contents=(),
                          swap_files=())


class BlockCopyFailed(P2VError):
    """A block copy that failed after it wrote into the partition: the stage stops (the rerun starts it again)."""


def fill_by_blocks(job: BlockJob, log_file: Path,
                   progress: Callable[[Progress], None] | None = None) -> BlockOutcome:
    """Make the target filesystem of `job` from its source's blocks, checked; or say why it goes by files."""
    started = time.monotonic()
    mountpoint = job.copy.source_mountpoint
    used = _used_bytes(job.source_node, job.fstype)  # read once: the progress total and the receipt's figure
    with _Logged(log_file) as logged, _written(job, used, progress):
        logged.note(f"== {mountpoint}: {job.source_node} -> {job.target_node} by blocks ({job.copy.why})")
        if job.fstype in EXT_TYPES:
            outcome = _ext(job, logged, started, used)
        else:
            outcome = _xfs(job, logged, started, used)
        if outcome.fallback is not None:
            logged.note(f"== {mountpoint}: by files after all: {outcome.fallback}")
            return outcome
        _check_as_planned(job)
        removed, released, trim_failed = _clear_what_files_would_not_bring(job, logged)
        outcome = dataclasses.replace(outcome, removed=removed, released=released, trim_failed=trim_failed,
                                      seconds=round(time.monotonic() - started, 3))
        logged.note(f"== {mountpoint}: done by {outcome.tool} ({outcome.resize}) in {outcome.seconds:.1f} s; "
                    f"{removed} entries removed that a file copy leaves behind; "
                    + (f"free blocks not discarded (fstrim failed: {trim_failed})" if trim_failed else
                       f"{_mib(released)} of free blocks given back to {job.image.name}"))
        return outcome


@contextlib.contextmanager
def _written(job: BlockJob, total: int, callback: Callable[[Progress], None] | None) -> Iterator[None]:
    """Progress while the tools run: what disk.img and the scratch copy gained, every half second, against the
    source filesystem's used bytes (an estimate: a shrink in a scratch copy writes them twice)."""
    if callback is None:
        yield
        return
    report = callback

    def written() -> int:
        paths = [job.image, *job.scratch.glob("blocks-*.img")] if job.scratch.is_dir() else [job.image]
        return sum(allocated(path) for path in paths if path.exists())

    baseline, started = written(), time.monotonic()
    done = threading.Event()

    def sample(final: bool = False) -> None:
        with contextlib.suppress(OSError):
            gained = min(max(0, written() - baseline), total)
            report(Progress(step="copy", bytes_done=total if final else gained, bytes_total=total,
                            elapsed=time.monotonic() - started, estimated=True,
                            where=f"{job.copy.source_mountpoint} by blocks", final=final))

    def watch() -> None:
        while not done.wait(0.5):
            sample()

    thread = threading.Thread(target=watch, name="blocks-progress", daemon=True)
    thread.start()
    try:
        yield
        sample(final=True)
    finally:
        done.set()
        thread.join()


def _used_bytes(node: str, fstype: str) -> int:
    return _ext_used_bytes(node) if fstype in EXT_TYPES else _xfs_used_bytes(node)


def planned_block_copies(plan: DiskPlan, image: Path, partition_node: Callable[[int], str],
                         source_nodes: Mapping[str, str], *,
                         excluded: Sequence[str], omitted: Sequence[str], record: Path, identity: Mapping[str, object],
                         scratch: Path, run_dir: Path, log_file: Path,
                         progress: Callable[[Progress], None] | None = None,
                         source_root: Path | None = None) -> dict[str, BlockOutcome]:
    """Every block copy the plan asks for, each done once per disk.img: source mountpoint -> outcome.

    `excluded` and `omitted` are paths as the server sees them (the copy engine's); `record` keeps
    the outcomes of this disk.img (`identity`: the plan's inputs and the image's inode), so that a
    rerun after a later failure does not write blocks over a filesystem the copy has since filled.
    A planned copy not in the record is done (again): a run killed during one left its partition
    unfinished, and nothing else writes there before it is recorded. A recorded one comes back with
    `earlier` set: the copy engine then treats that filesystem as a resumed copy (rsync's quick
    check, and the repair of what verification finds), since later stages may have written there.
    """
    if not plan.block_copies:
        return {}
    done = _recorded(record, identity)
    points = [c.source_mountpoint for c in plan.copies if not plan.filesystem(c.target_mountpoint).esp]
    every_source = [c.source_mountpoint for c in plan.copies]
    excluded_by_fs, omitted_by_fs = assign(list(excluded), points), assign(list(omitted), points)
    for copy in plan.block_copies:
        mountpoint = copy.source_mountpoint
        if mountpoint in done:
            log.info("%s: copied by blocks in an earlier run (%s)", mountpoint, done[mountpoint].tool)
            continue
        part = plan.partition_of(copy.target_mountpoint)
        hidden = tuple(rel for other in every_source if other != mountpoint
                       and filesystem_of(other, [p for p in every_source if p != other]) == mountpoint
                       and (rel := _within(other, mountpoint)) is not None)
        job = BlockJob(copy=copy, partition=part, source_node=source_nodes[mountpoint],
                       target_node=partition_node(part.number), scratch=scratch, run_dir=run_dir, image=image,
                       in_place=plan.ends_the_disk(part), disk_size=plan.size,
                       table=plan.label,
                       excluded=tuple(excluded_by_fs.get(mountpoint, ())),
                       omitted=tuple(omitted_by_fs.get(mountpoint, ())), hidden=hidden,
                       source_view=None if source_root is None else source_root / mountpoint.lstrip("/"))
        log.info("copying %s by blocks: %s", mountpoint, copy.why)
        outcome = fill_by_blocks(job, log_file, progress)
        if outcome.fallback:
            log.warning("%s: %s; copying it by files", mountpoint, outcome.fallback)
        else:
            log.info("%s: %s written by %s in %.1f s", mountpoint, _mib(outcome.bytes_written), outcome.tool,
                     outcome.seconds)
        done[mountpoint] = outcome
        write_file_atomically(record, json.dumps({"identity": dict(identity),
                                                  "done": {k: v.receipt() for k, v in done.items()}},
                                                 indent=1, sort_keys=True) + "\n")
    return {mp: done[mp] for mp in (c.source_mountpoint for c in plan.block_copies)}


def _recorded(record: Path, identity: Mapping[str, object]) -> dict[str, BlockOutcome]:
    try:
        data = json.loads(record.read_text())
        if data.get("identity") != dict(identity):
            return {}
        return {mp: dataclasses.replace(BlockOutcome(**row), earlier=True) for mp, row in data["done"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.0f} MiB"


# ---------------------------------------------------------------- ext2/3/4


def _ext(job: BlockJob, logged: _Logged, started: float, used: int) -> BlockOutcome:
    fs = job.partition.filesystem
    assert fs is not None and fs.uuid and fs.block_size
    if job.copy.resize == "shrink":
        # resize2fs -P reads the source (a read-only device) and writes nothing: whether it can shrink that far,
        # before anything is written.
        estimate = logged.run(["resize2fs", "-P", job.source_node])
        minimum = int(estimate.text.split("Estimated minimum size of the filesystem:")[1].split()[0]) * fs.block_size
        if minimum > job.partition.size:
            return BlockOutcome(job.copy.source_mountpoint, "e2image", "shrink", round(time.monotonic() - started, 3),
                                used, fallback=f"resize2fs -P says it shrinks to {minimum >> 20} MiB at best, and the "
                                               f"partition has {job.partition.size >> 20} MiB")
        if job.in_place:
            _shrink_in_place(job, logged)
        else:
            _shrink_in_scratch(job, logged)
    else:
        _discard(job.target_node, logged)
        logged.run(["e2image", "-ra", "-p", job.source_node, job.target_node])
        logged.check_ext(job.target_node)
        logged.run(["resize2fs", job.target_node])
        logged.run(["tune2fs", "-U", fs.uuid, "-L", fs.label, job.target_node])
    _journal_left_sparse(job.target_node, fs.block_size, logged)
    _unused_inode_tables_left_sparse(job.target_node, fs.block_size, logged)
    logged.check_ext(job.target_node, repair=False)  # checks both
    done = "grow" if job.copy.resize == "grow" else "shrink in place" if job.in_place else "shrink in a scratch copy"
    return BlockOutcome(job.copy.source_mountpoint, "e2image", done, round(time.monotonic() - started, 3), used)


def _shrink_in_place(job: BlockJob, logged: _Logged) -> None:
    """The last partition: the source filesystem written at the partition's start and past its end (disk.img
    grows for the while), shrunk there, and disk.img cut back to the plan's size. What lies after the partition
    is nothing (msdos) or the backup GPT, which sfdisk writes again from the primary one: so a rerun after a
    kill at any point here finds everything it needs where the disk stage left it."""
    fs = job.partition.filesystem
    assert fs is not None and fs.uuid
    fields = storage.tune2fs_fields(job.source_node)
    source_size = int(fields["Block count"]) * int(fields["Block size"])
    _discard(job.target_node, logged)
    try:
        os.truncate(job.image, max(job.disk_size, job.partition.start + source_size))
        with loop_device(job.image, read_only=False, offset=job.partition.start, size=source_size) as wide:
            logged.run(["e2image", "-ra", "-p", job.source_node, wide.path])
            logged.check_ext(wide.path)
            shrunk = logged.run(["resize2fs", wide.path, f"{job.partition.size // 1024}K"], check=False)
            if shrunk.returncode != 0:
                raise BlockCopyFailed(
                    f"resize2fs could not shrink the block copy of {job.copy.source_mountpoint} to "
                    f"{job.partition.size >> 20} MiB: {' '.join(shrunk.text.split()[-30:])}",
                    hint="set target.copy: files in the spec (or a larger target.size), then rerun sync")
            logged.run(["tune2fs", "-U", fs.uuid, "-L", fs.label, wide.path])
    finally:
        os.truncate(job.image, job.partition.end)  # drops what ran past the partition, the old backup GPT too
        os.truncate(job.image, job.disk_size)
        if job.table == "gpt":
            logged.run(["sfdisk", "--relocate", "gpt-bak-std", str(job.image)])
        with job.image.open("rb+") as image:
            os.fsync(image.fileno())


def _shrink_in_scratch(job: BlockJob, logged: _Logged) -> None:
    """Not the last partition: shrunk in a sparse scratch file on the work area, then its used blocks copied in."""
    fs = job.partition.filesystem
    assert fs is not None and fs.uuid
    job.scratch.mkdir(parents=True, exist_ok=True)
    copy = job.scratch / f"blocks-{job.partition.number}.img"
    copy.unlink(missing_ok=True)
    try:
        logged.run(["e2image", "-ra", "-p", job.source_node, str(copy)])
        logged.check_ext(str(copy))
        logged.run(["resize2fs", str(copy), f"{job.partition.size // 1024}K"])
        logged.run(["tune2fs", "-U", fs.uuid, "-L", fs.label, str(copy)])
        _discard(job.target_node, logged)
        logged.run(["e2image", "-ra", "-p", str(copy), job.target_node])
    finally:
        copy.unlink(missing_ok=True)


def _journal_left_sparse(node: str, block_size: int, logged: _Logged) -> None:
    """Discard the copied journal's blocks but its superblock: disk.img holds no copy of old journal traffic.

    The filesystem is clean (e2fsck just checked it), so its journal is empty: the journal
    superblock says where the log starts and nothing is replayed; the rest of the journal then
    reads as zeros, as in a journal mke2fs made with lazy_journal_init (what the disk stage does),
    and is overwritten as the log wraps. Without it, a block copy allocates the whole journal (up
    to 1 GiB) in disk.img and in the upload.
    """
    listing = run(["debugfs", "-R", "stat <8>", node], check=False)
    runs = journal_data_runs(listing.stdout)
    try:
        discard_runs(node, [(start * block_size, count * block_size) for start, count in runs])
    except OSError as error:
        logged.note(f"the journal's blocks stay allocated: discard failed: {error}")
        return
    if runs:
        logged.note(f"journal: {sum(count for _, count in runs)} blocks after its superblock discarded (they read "
                    "as zeros: the filesystem is clean, nothing in the journal is replayed)")


def journal_data_runs(debugfs_stat: str) -> list[tuple[int, int]]:
    """(first block, count) of the journal's data blocks but its superblock (logical block 0), from
    `debugfs -R "stat <8>"`'s EXTENTS (or BLOCKS) list: "(0-179):8013-8192, (180):8964" for data,
    "(ETB0):58766" or "(IND):1234" for the mapping's own blocks, which stay. A shrink that moves the
    journal gives it an extent tree block, and `debugfs blocks` lists that block first: taking the
    first listed block for the superblock discarded the real one (found 2026-12-03)."""
    _, _, listing = debugfs_stat.partition("EXTENTS:\n")
    if not listing:
        _, _, listing = debugfs_stat.partition("BLOCKS:\n")
    runs: list[tuple[int, int]] = []
    for entry in listing.replace("\n", " ").split(","):
        logical, _, physical = entry.strip().partition("):")
        logical = logical.removeprefix("(")
        if not physical or not logical[:1].isdigit():
            continue  # a mapping block (ETB, IND, DIND, TIND), or the TOTAL line
        first_logical = int(logical.split("-")[0])
        start, _, end = physical.split()[0].partition("-")
        first, last = int(start), int(end or start)
        if first_logical == 0:  # the journal superblock stays
            first += 1
        if first <= last:
            runs.append((first, last - first + 1))
    return runs


def _unused_inode_tables_left_sparse(node: str, block_size: int, logged: _Logged) -> None:
    """Discard the blocks of each group's inode table that hold no inode yet: disk.img holds no copy of them.

    e2image copies a group's whole inode table, but a filesystem with group descriptor checksums
    (uninit_bg, metadata_csum) records per group how many inodes at the table's end were never
    used (itable_unused), and neither the kernel nor e2fsck reads them: a new inode there is
    written whole when it is allocated. A file copy into the disk stage's filesystem (mke2fs's
    lazy_itable_init) leaves them unwritten the same way. On a large filesystem, mostly empty
    tables are hundreds of MiB that would be uploaded as data. The e2fsck -n that follows reads
    every inode it must.
    """
    listing = run(["dumpe2fs", node], check=False)
    runs = unused_inode_table_runs(listing.stdout)
    if listing.returncode != 0 or not runs:
        return
    try:
        discard_runs(node, [(start * block_size, count * block_size) for start, count in runs])
    except OSError as error:
        logged.note(f"the unused parts of the inode tables stay allocated: discard failed: {error}")
        return
    logged.note(f"inode tables: {sum(count for _, count in runs)} blocks that hold no inode yet discarded "
                f"(in {len(runs)} groups; never read: the groups' itable_unused)")


def unused_inode_table_runs(dumpe2fs_text: str) -> list[tuple[int, int]]:
    """(first block, blocks) per group: the whole blocks at the end of its inode table that hold no inode yet.

    Read from `dumpe2fs` (not -h): "Inode size", "Block size", and per group "Inode table at A-B" and
    "..., N unused inodes". A filesystem without group descriptor checksums prints no unused count: nothing.
    """
    inode_size = block_size = 0
    table: tuple[int, int] | None = None
    runs = []
    for line in dumpe2fs_text.splitlines():
        text = line.strip()
        if text.startswith("Inode size:"):
            inode_size = int(text.split(":")[1])
        elif text.startswith("Block size:"):
            block_size = int(text.split(":")[1])
        elif text.startswith("Group "):
            table = None
        elif text.startswith("Inode table at "):
            first, _, last = text.removeprefix("Inode table at ").split()[0].partition("-")
            table = (int(first), int(last or first))
        elif text.endswith(" unused inodes") and table is not None and inode_size and block_size:
            unused = int(text.rsplit(",", 1)[-1].split()[0])
            blocks = unused * inode_size // block_size
            if blocks:
                runs.append((table[1] + 1 - blocks, blocks))
            table = None
    return runs


def discard_runs(node: str, runs: Sequence[tuple[int, int]]) -> None:
    """BLKDISCARD each (offset, length) in bytes on `node` (a partition of disk.img: it then reads as zeros)."""
    fd = os.open(node, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for offset, length in runs:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))
    finally:
        os.close(fd)


BLKDISCARD = 0x1277  # linux/fs.h: _IO(0x12, 119)


def _ext_used_bytes(node: str) -> int:
    fields = storage.tune2fs_fields(node)
    size = int(fields.get("Block size", "0") or 0)
    return (int(fields.get("Block count", "0") or 0) - int(fields.get("Free blocks", "0") or 0)) * size


# ---------------------------------------------------------------- xfs


def _xfs(job: BlockJob, logged: _Logged, started: float, used: int) -> BlockOutcome:
    fs = job.partition.filesystem
    assert fs is not None and fs.uuid
    _discard(job.target_node, logged)
    if not fs.keep_uuid:  # the plan never asks for it (tasks/lib/planning/copy_method.py)
        raise BlockCopyFailed(f"{job.copy.source_mountpoint}: xfs by blocks needs its UUID kept",
                              hint="set target.copy: files or target.keep_uuids: true")
    # -d: the same UUID. -L: xfs_copy's own log (else in /var/tmp), folded into ours and removed.
    job.scratch.mkdir(parents=True, exist_ok=True)
    prefix = job.scratch / "xfs_copy.log"
    try:
        logged.run(["xfs_copy", "-d", "-L", str(prefix), job.source_node, job.target_node])
    finally:
        for own_log in job.scratch.glob("xfs_copy.log*"):
            logged.note(own_log.read_text(errors="replace").rstrip())
            own_log.unlink()
    logged.run(["xfs_admin", "-L", fs.label or "--", job.target_node])
    return BlockOutcome(job.copy.source_mountpoint, "xfs_copy", "grow", round(time.monotonic() - started, 3),
                        used)


def _xfs_used_bytes(node: str) -> int:
    text = run(["xfs_db", "-r", "-c", "sb 0", "-c", "print blocksize dblocks fdblocks", node]).stdout
    values = {key.strip(): int(value) for key, _, value in (line.partition("=") for line in text.splitlines())
              if value.strip().isdigit()}
    return (values.get("dblocks", 0) - values.get("fdblocks", 0)) * values.get("blocksize", 0)


# ---------------------------------------------------------------- both


def _discard(node: str, logged: _Logged) -> None:
    """Let the partition read as zeros (a hole in disk.img): nothing of the disk stage's mkfs stays in free space."""
    result = logged.run(["blkdiscard", "-f", node], check=False)
    if result.returncode != 0:
        logged.note(f"blkdiscard {node} failed (the work area may not punch holes); the copy overwrites what it uses")


def _check_as_planned(job: BlockJob) -> None:
    probe = storage.probe(job.target_node)
    found = storage.fs_features(job.fstype, job.target_node)
    problems = made_differences(job.partition, probe, found)
    if problems:
        raise BlockCopyFailed(
            f"the block copy of {job.copy.source_mountpoint} into partition {job.partition.number} is not the "
            f"planned filesystem: {'; '.join(problems)}",
            hint="set target.copy: files in the spec to copy it by files, and report this")


def _clear_what_files_would_not_bring(job: BlockJob, logged: _Logged) -> tuple[int, int, str | None]:
    """Mount the new filesystem alone; remove what a file copy leaves behind; grow xfs; discard the free blocks.

    Returns the entries removed, the bytes disk.img gave back, and why the discard failed (None: it did not).
    The discard (fstrim) matters: what was removed here (a swap file, /tmp's contents) and what a shrink
    moved away from still hold the source's bytes in disk.img until they are discarded, and would be
    uploaded with it.
    """
    fs = job.partition.filesystem
    assert fs is not None
    removed = 0
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="blocks-", dir=job.run_dir) as point, \
            mounted(job.target_node, point, fstype=fs.fstype, options=["nouuid"] if fs.fstype == "xfs" else []):
        root = Path(point)
        for relative in job.excluded + job.hidden:
            directory = root / relative.lstrip("/")
            if directory.is_dir() and not directory.is_symlink():
                _flags_cleared(directory, root, logged)
                with _times_kept(directory):
                    for child in list(directory.iterdir()):
                        removed += _remove(child, root, logged)
        for relative in job.omitted:
            entry = root / relative.lstrip("/")
            if os.path.lexists(entry):
                with _times_kept(entry.parent):
                    removed += _remove(entry, root, logged)
        if job.copy.resize == "shrink" and fs.fstype in EXT_TYPES and job.source_view is not None:
            restored, failed = _directory_times_restored(root, job.source_view, job.hidden)
            if restored or failed:
                logged.note(f"directory times: {restored} directories set back to the source's mtime (resize2fs's "
                            "shrink sets the mtime of each directory holding an inode it moves)"
                            + (f"; not set: {'; '.join(failed[:5])}" if failed else ""))
        if fs.fstype == "xfs":
            logged.run(["xfs_growfs", point])
        # ext4 frees a removed file's blocks when its journal commits: sync first, or fstrim skips them.
        logged.run(["sync", "--file-system", point])
        before = allocated(job.image)
        trimmed = logged.run(["fstrim", "--verbose", point], check=False)
        if trimmed.returncode != 0:
            return removed, 0, " ".join(trimmed.text.split()) or f"exit {trimmed.returncode}"
        return removed, max(0, before - allocated(job.image)), None


def _directory_times_restored(root: Path, source: Path, hidden: Sequence[str]) -> tuple[int, list[str]]:
    """Every directory of the new filesystem whose mtime is not its source directory's gets the source's
    atime and mtime. A shrink that moves inodes out of the block groups it drops writes the time of the
    shrink into the mtime of each directory holding one (e2fsprogs does it for dump's incremental
    backups); the copy's verification would find them changed. The mount points of the source's other
    filesystems are skipped: in the source view they are those filesystems' roots."""
    skipped = {relative.strip("/") for relative in hidden}
    source_device = source.lstat().st_dev
    restored, failed = 0, []
    for directory, subdirectories, _ in os.walk(root):
        relative = os.path.relpath(directory, root)
        relative = "" if relative == "." else relative
        subdirectories[:] = [name for name in subdirectories if os.path.join(relative, name) not in skipped]
        try:
            wanted = (source / relative).lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(wanted.st_mode) or wanted.st_dev != source_device:
            continue
        if os.lstat(directory).st_mtime_ns != wanted.st_mtime_ns:
            try:
                os.utime(directory, ns=(wanted.st_atime_ns, wanted.st_mtime_ns), follow_symlinks=False)
            except OSError as error:  # an immutable directory: the verification names it
                failed.append(f"/{relative}: {error.strerror}")
            else:
                restored += 1
    return restored, failed


def allocated(path: Path) -> int:
    """The bytes a file's blocks take on its filesystem (a sparse file's holes take none)."""
    return path.stat().st_blocks * 512


def _flags_cleared(directory: Path, root: Path, logged: _Logged) -> None:
    """Clear the inode flags of a directory whose contents go (an excluded one, another filesystem's mount point).

    An immutable directory lets nothing in it be removed, or be made by the pass that copies the
    filesystem mounted there: `chattr +i` on an empty mount point is how some keep writes off it
    while nothing is mounted. A block copy brings that hidden directory's flags along; a file copy
    never sees them (it reads the mounted filesystem's root). The copy engine then sets on each
    entry the flags the source tree shows (tasks/lib/copy/flags.py), so these end as a file copy's.
    """
    with inodeflags.opened(directory) as fd:
        before = inodeflags.read_flags(fd) if fd is not None else 0
        if fd is None or not before:
            return
        inodeflags.apply_flags(fd, 0)
    logged.note(f"cleared inode flags {inodeflags.letters(before)} on {job_path(directory, root)} (its contents "
                "go; the copy sets the flags the source shows)")


@contextlib.contextmanager
def _times_kept(directory: Path) -> Iterator[None]:
    info = directory.stat()
    try:
        yield None
    finally:
        os.utime(directory, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)


def _remove(entry: Path, root: Path, logged: _Logged) -> int:
    """Remove one entry (a tree), clearing immutable/append-only flags that stand in the way; entries removed."""
    count = sum(1 + len(files) + len(dirs) for _, dirs, files in os.walk(entry)) if entry.is_dir() and \
        not entry.is_symlink() else 1
    for attempt in (1, 2):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            break
        except PermissionError as error:
            if attempt == 2:
                raise BlockCopyFailed(
                    f"the block copy cannot remove {job_path(entry, root)}, which a file copy leaves behind, even "
                    f"with its immutable and append-only flags cleared: {error.strerror}: {error.filename}",
                    hint="set target.copy: files in the spec to copy this filesystem by files, and report this"
                ) from None
            logged.run(["chattr", "-R", "-i", "-a", str(entry)], check=False)
    logged.note(f"removed {job_path(entry, root)} (a file copy leaves it behind)")
    return count


def job_path(entry: Path, root: Path) -> str:
    """`entry` as a path in the filesystem being copied."""
    return "/" + str(entry.relative_to(root)).removeprefix(".")


class _Logged:
    """The block copy's commands and their output, in the sync stage's copy log (the copy engine's _Log)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _Logged:
        self.log = _Log(self.path)
        return self

    def __exit__(self, *_: object) -> None:
        self.log.close()

    def note(self, text: str) -> None:
        self.log.write(text)

    def run(self, argv: Sequence[str], *, check: bool = True) -> _Ran:
        self.note("+ " + " ".join(argv))
        started = time.monotonic()
        result = run(argv, check=False)
        text = result.stdout + result.stderr
        self.note(text.rstrip())
        self.note(f"  (exit {result.returncode} after {time.monotonic() - started:.1f} s)")
        if check and result.returncode != 0:
            raise CommandError(result.argv, result.returncode, text, hint=f"full log: {self.path}")
        return _Ran(result.returncode, text)

    def check_ext(self, device: str, *, repair: bool = True) -> None:
        """e2fsck -f: a clean source's copy needs no repair (exit 0) or only its summary counters (1)."""
        result = self.run(["e2fsck", "-f", "-y" if repair else "-n", device], check=False)
        if result.returncode > (1 if repair else 0):
            raise BlockCopyFailed(
                f"e2fsck found errors in the block copy ({device}): exit {result.returncode}: "
                f"{' '.join(result.text.split()[-30:])}",
                hint="check the source filesystem with e2fsck -fn, or set target.copy: files in the spec")


@dataclasses.dataclass(frozen=True)
class _Ran:
    returncode: int
    text: str
