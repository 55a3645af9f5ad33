"""Sync stage: every file of the source server into the target image.

    sync:<host>  layout.json + disk-plan.json  ->  rootfs-synced.stamp

The source tree is mounted read-only as inspect found it (a filesystem that
was not shut down cleanly through a throw-away overlay with its journal
replayed, so that the copy and its check see what the source really holds:
tasks/lib/replay.py), the target as the disk plan says; the copy engine
(tasks/lib/copy/) copies each source filesystem, proves the copy with a
manifest of both trees, and its receipt is the stamp. A rerun after a failure or a kill continues the copy in the same
disk.img instead of starting over.

A rerun with nothing to do (`doit forget sync:<host>`, a new stamp
format) proves that cheaply instead of running rsync and hashing both trees
again. Two seals in the host's state directory (.p2v/), each written only
after a verified copy:

- `sync-seal.json`, the copy engine's (tasks/lib/copy/seal.py; SEAL_FORMAT in model.py):
  stat-only listings of both mounted trees, ctime included. Any source, any
  filesystem; costs one cold walk of each tree.
- `sync-stage-seal.json`, this stage's, checked before anything is mounted:
  a fingerprint of every source filesystem, read from its device, that any
  read-write mount changes (see fingerprint()), and the stat of disk.img
  after it was let go, with the copy's receipt. Why it is a proof is told at
  write_stage_seal(). Written only when every source filesystem can be
  fingerprinted (ext2/3/4, xfs; not one that needs recovery) and did not
  change during the run.

The stamp's receipt says which way the copy was proved ("verified_by":
"manifests", "seal" or "stage seal"), and which filesystems were read with
their journal replayed ("journal_replayed").

Inode flags: the copy sets every one the target keeps but i (immutable)
and a (append-only), which the fix stage sets as its last act; the receipt
lists them as pending, and those the target filesystem does not keep as
warnings. A copy into a target that an earlier fix already locked first
clears i and a on the paths that fix recorded in the image
(/var/lib/p2v/conversion.json) and on every pending path.

The swap file the plan makes (tasks/fix.py, step swap-file) is left out of
the copy like the source's own swap files, unless the source has a file of
that name (which is then copied, and the fix stage refuses to overwrite it).

An EFI system partition (vfat) is not mounted on either side (this kernel
may have no vfat): tasks/lib/esp.py copies its files by mtools, from the
source's read-only partition node into the target's, writing only what
differs, and proves the result against the source ESP read again (every
path, type, size, sha256 and FAT attribute). Its receipt is `copy.esp`. No
stage seal is written for such a source: the ESP has no fingerprint.

The stamp depends on disk-plan.json rather than on disk.img: later stages
write into disk.img, and that must not make the copy run again. A new disk
(a new plan, with new UUIDs) does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from tasks.inspect import reachable_source, source_tree
from tasks.lib import esp, inodeflags, storage
from tasks.lib.copy import ALWAYS_EXCLUDED, SETTLE_COARSE, SETTLE_FINE, copy_tree, target_matches_seal
from tasks.lib.copy.blocks import BlockOutcome, planned_block_copies
from tasks.lib.fixes.steps.record import CONVERSION_RECORD
from tasks.lib.outputs import CopyReceipt, SyncStamp, write_sync_stamp
from tasks.lib.paths import read_text_in_root, resolve_in_root, write_file_atomically
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.model import DiskPlan
from tasks.lib.progress import console_reporter
from tasks.lib.replay import ReplayedFilesystem
from tasks.lib.resources import loop_device
from tasks.lib.runner import CommandError, P2VError, run
from tasks.lib.spec import Spec
from tasks.lib.target import MountedTarget, loop_direct_io, mounted_target
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

log = logging.getLogger("p2v.sync")

STAMP_FORMAT = "p2v-sync-stamp"
STAMP_VERSION = 2  # 2: inode flags, the plan's swap file left out
STAGE_SEAL_FORMAT = "p2v-sync-stage-seal"
STAGE_SEAL_VERSION = 2
SKIPPED_CONTENT_REASONS = ("network filesystem", "pseudo filesystem", "FUSE filesystem")


def contents_to_leave_behind(layout: Mapping[str, Any]) -> list[str]:
    """Mount points of pseudo and network filesystems: recreated empty, never copied."""
    return sorted({entry["file"] for entry in layout["fstab"]
                   if entry.get("status") == "skipped" and entry.get("reason") in SKIPPED_CONTENT_REASONS
                   and entry["file"].startswith("/")})


def swap_files(layout: Mapping[str, Any]) -> list[str]:
    return sorted(entry["spec"] for entry in layout["fstab"] if entry.get("status") == "swapfile")


def left_out(layout: Mapping[str, Any], plan: DiskPlan, source: Path) -> list[str]:
    """What the copy leaves out altogether: the source's swap files, and the swap file the plan makes
    (fix stage) unless the source holds something of that name."""
    omitted = set(swap_files(layout))
    made = plan.swap_file.path if plan.swap_file is not None else None
    if made and made not in omitted and not os.path.lexists(resolve_in_root(source, made, follow_last=False)):
        omitted.add(made)
    return sorted(omitted)


def flags_set_by_fix(target: Path) -> list[str]:
    """Paths an earlier fix made immutable or append-only in this image (its conversion record)."""
    try:
        record = json.loads(read_text_in_root(target, CONVERSION_RECORD) or "{}")
    except ValueError:
        return []
    rows = record.get("inode_flags", {}).get("applied", []) if isinstance(record, dict) else []
    return [row["path"] for row in rows if isinstance(row, dict) and isinstance(row.get("path"), str)]


def check_work_area(image: Path, plan: DiskPlan) -> None:
    """Refuse to start a copy the work area cannot hold (disk.img is sparse)."""
    usage = os.statvfs(image.parent)
    free = usage.f_bavail * usage.f_frsize
    data = sum(fs.used_bytes for fs in plan.filesystems)
    already = image.stat().st_blocks * 512  # what a resumed copy has written so far
    # A block copy shrunk in a scratch copy (not the last partition: tasks/lib/copy/blocks.py) holds its
    # source's used blocks a second time, for a while.
    scratch = sum(source.used_bytes for copy in plan.block_copies if copy.resize == "shrink"
                  and not plan.ends_the_disk(plan.partition_of(copy.target_mountpoint))
                  for source in plan.filesystem(copy.target_mountpoint).sources
                  if source.mountpoint == copy.source_mountpoint)
    needed = max(0, data - already) + scratch
    if free < needed:
        raise P2VError(
            f"the work area {image.parent} has {free >> 20} MiB free, and the copy needs about {needed >> 20} MiB "
            f"more in {image.name} ({data >> 20} MiB of data, {already >> 20} MiB already written"
            + (f", {scratch >> 20} MiB for a block copy's scratch copy)" if scratch else ")"),
            hint="free space on the work area or move the workdir, then rerun; the copy resumes",
        )


def seal_path(spec: Spec) -> Path:
    return spec.state_dir / "sync-seal.json"


def stage_seal_path(spec: Spec) -> Path:
    return spec.state_dir / "sync-stage-seal.json"


# ---------------------------------------------------------------- the stage seal


_EXT_FIELDS = ("Filesystem UUID", "Filesystem state", "Filesystem features", "Inode count", "Block count",
               "Free blocks", "Free inodes", "Mount count", "Last mount time", "Last write time", "Last checked",
               "Lifetime writes")


def fingerprint(node: str, fstype: str) -> str | None:
    """A value that any read-write mount of the filesystem changes, read from its device; None if there is none.

    ext2/3/4 (tune2fs -l): a read-write mount bumps the mount count and sets
    the last mount time on disk at once, and sets needs_recovery (with a
    journal) or clears "clean" (without) until it is unmounted; a read-only
    mount (p2v's ro,noload) writes nothing. xfs (xfs_db, xfs_logprint): every
    read-write mount writes to the log and moves its head, and the superblock
    LSN and counters on unmount; while mounted read-write the log is dirty.
    So: no fingerprint for a filesystem that is mounted read-write now (or
    was not cleanly unmounted: then sync reads it with its journal replayed,
    tasks/lib/replay.py, and no stage seal vouches for that copy), and an
    equal fingerprint later means no read-write mount in between. Other
    filesystem types: None.
    """
    try:
        if fstype in ("ext2", "ext3", "ext4"):
            fields = storage.tune2fs_fields(node)
            if storage.ext_needs_recovery(fields) or fields.get("Filesystem state") != "clean":
                return None
            text = "\n".join(f"{name}: {fields.get(name, '')}" for name in _EXT_FIELDS)
        elif fstype == "xfs":
            superblock = run(["xfs_db", "-r", "-c", "sb 0", "-c", "print uuid icount ifree fdblocks lsn", node]).stdout
            log_state = storage.xfs_log_state(node)
            if not storage.xfs_log_is_clean(log_state):
                return None
            text = superblock + log_state
        else:
            return None
    except P2VError as error:  # CommandError included
        log.info("no fingerprint of %s (%s): %s", node, fstype, error)
        return None
    return f"{fstype}:sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def source_fingerprints(spec: Spec, layout: Mapping[str, Any]) -> dict[str, str] | None:
    """Each source filesystem's fingerprint, read with the disks attached read-only and nothing mounted.

    Read from the real source, never from a replayed overlay (replay={}): a
    filesystem that needs recovery has none, so its copy is never vouched for
    by a stage seal.
    """
    with reachable_source(spec, replay={}) as (_discovery, devices):
        found = {}
        for mount in layout["mounts"]:
            value = fingerprint(devices.node(mount["device"]), mount["fstype"])
            if value is None:
                return None
            found[mount["mountpoint"]] = value
        return found


def image_state(image: Path) -> dict[str, int]:
    """disk.img's identity and last change, once that change is settled (see copy.SEAL_FORMAT: the clock's tick)."""
    info = image.stat()
    margin = SETTLE_FINE if info.st_ctime_ns % 1_000_000_000 else SETTLE_COARSE
    pause = (info.st_ctime_ns + int(margin * 1e9) - time.time_ns()) / 1e9
    if pause > 0:
        time.sleep(pause + 0.01)
        info = image.stat()
    return {"dev": info.st_dev, "ino": info.st_ino, "size": info.st_size, "blocks": info.st_blocks,
            "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


def inputs_digest(run_: StageRun) -> str:
    digest = hashlib.sha256()
    for name in (LAYOUT_FILE, PLAN_FILE):
        digest.update(run_.input(name).read_bytes())
    return "sha256:" + digest.hexdigest()


def sealed_target(target: MountedTarget, plan: DiskPlan, spec: Spec, layout: Mapping[str, Any],
                  omitted: list[str]) -> bool:
    """Remount the target read-only, then check it against the copy's seal: nothing can change it after that."""
    try:
        for mountpoint in reversed(plan.mount_order):
            run(["mount", "-o", "remount,ro", str(resolve_in_root(target.root, mountpoint))])
    except CommandError as error:
        log.info("target not remounted read-only, no stage seal: %s", error)
        return False
    return target_matches_seal(seal_path(spec), target.root, [m["mountpoint"] for m in layout["mounts"]],
                               exclude_contents=contents_to_leave_behind(layout), swap_files=omitted,
                               defer_flags=inodeflags.DEFERRED)


def write_stage_seal(spec: Spec, inputs: str, fingerprints: Mapping[str, str], image: Path,
                     receipt: Mapping[str, Any]) -> None:
    """Vouch for this run's copy to a later run, which will not even mount the trees.

    Sound because each link is: the copy was verified (manifests, or the copy
    seal, itself a proof); the target was then remounted read-only and its
    listing was still the copy seal's, so disk.img held exactly that when it
    was let go; its stat (mtime/ctime, settled) is taken after that, and any
    later write to it through a loop device or otherwise moves them; and the
    source filesystems' fingerprints were equal before the source was
    mounted and after it was let go, so no read-write mount happened in
    between. Not seen, as by every such check: writes that bypass both the
    filesystem and the mount machinery (dd onto a source partition, debugfs).
    """
    seal = {
        "format": STAGE_SEAL_FORMAT, "version": STAGE_SEAL_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": inputs, "sources": dict(fingerprints), "image": image_state(image), "receipt": dict(receipt),
    }
    write_file_atomically(stage_seal_path(spec), json.dumps(seal, indent=1, sort_keys=True) + "\n")


def stage_seal_holds(spec: Spec, layout: Mapping[str, Any], image: Path, inputs: str) -> dict[str, Any] | None:
    """The stage seal, when the inputs, disk.img and every source filesystem are as it recorded; else None."""
    try:
        seal = json.loads(stage_seal_path(spec).read_text())
    except (OSError, ValueError):
        return None
    if seal.get("format") != STAGE_SEAL_FORMAT or seal.get("version") != STAGE_SEAL_VERSION:
        return None
    if seal.get("inputs") != inputs:
        return None
    info = image.stat()
    now = {"dev": info.st_dev, "ino": info.st_ino, "size": info.st_size, "blocks": info.st_blocks,
           "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}
    if seal.get("image") != now:
        log.info("disk.img changed since the stage seal: copying")
        return None
    if seal.get("sources") != source_fingerprints(spec, layout):
        log.info("a source filesystem was mounted read-write since the stage seal: copying")
        return None
    return dict(seal)


# ---------------------------------------------------------------- the stage


def sync_host(run_: StageRun) -> None:
    spec = run_.spec
    layout = read_layout(run_.input(LAYOUT_FILE))
    plan = read_disk_plan(run_.input(PLAN_FILE))
    image = spec.artifact("disk.img")
    # The ESP (vfat) is copied by mtools, not by the copy engine: this kernel may not mount it.
    mountpoints = [mount["mountpoint"] for mount in layout["mounts"] if mount["fstype"] != "vfat"]
    esp_mounts = [mount["mountpoint"] for mount in layout["mounts"] if mount["fstype"] == "vfat"]
    if not image.is_file():
        raise P2VError(f"{image} does not exist", hint=f"run disk:{spec.host} first")
    started = time.monotonic()
    inputs = inputs_digest(run_)
    held = stage_seal_holds(spec, layout, image, inputs)
    if held is not None:
        # A held seal means every source filesystem had a fingerprint: none needed recovery.
        receipt = {**held["receipt"], "verified_by": "stage seal", "fast_path": True, "journal_replayed": [],
                   "seal": f"stage seal held (written {held['created']})", "bytes_transferred": 0,
                   "duration_seconds": round(time.monotonic() - started, 3), "copy_seconds": 0.0,
                   "verify_seconds": round(time.monotonic() - started, 3)}
        log.info("source filesystems and disk.img unchanged since the verified copy of %s: nothing to copy",
                 held["created"])
        write_stamp(run_, receipt, started)
        return
    stage_seal_path(spec).unlink(missing_ok=True)
    check_work_area(image, plan)
    before = source_fingerprints(spec, layout)
    vouched = False
    nodes: dict[str, str] = {}
    direct_io = loop_direct_io(image.parent)
    with source_tree(spec, layout, esp_views=False, devices_out=nodes) as source:
        replayed = journal_replayed(layout, source.replayed)
        omitted = left_out(layout, plan, source.root)
        by_blocks = fill_planned_blocks(spec, plan, layout, image, nodes, omitted, inputs, direct_io, source.root)
        with mounted_target(image, plan, run_dir=spec.run_dir, direct_io=direct_io) as target:
            result = copy_tree(
                source.root, target.root, mountpoints,
                log_file=spec.log_dir / "sync-copy.log",
                exclude_contents=contents_to_leave_behind(layout),
                swap_files=omitted,
                progress=console_reporter(),
                seal=seal_path(spec),
                defer_flags=inodeflags.DEFERRED,
                unlock=flags_set_by_fix(target.root),
                prefilled={mp: outcome.pass_result() for mp, outcome in by_blocks.items()
                           if not outcome.fallback and not outcome.earlier},
            )
            esp_receipts = {}
            for mountpoint in esp_mounts:
                log.info("copying the ESP %s by mtools", mountpoint)
                target_node = target.loop.partition(plan.partition_of(mountpoint).number)
                esp_receipts[mountpoint] = esp.copy_esp(nodes[mountpoint], target_node, spec.run_dir)
                log.info("ESP %s: %d files, %d bytes, verified against the source ESP (%d entries changed)",
                         mountpoint, esp_receipts[mountpoint]["files"], esp_receipts[mountpoint]["bytes"],
                         esp_receipts[mountpoint]["changed_entries"])
            if before is not None and result.verified and not esp_mounts:
                vouched = sealed_target(target, plan, spec, layout, omitted)
    receipt = {**result.receipt(), "journal_replayed": replayed,
               "methods": copy_methods(plan, by_blocks)}
    if esp_receipts:
        receipt["esp"] = esp_receipts
    if vouched and before is not None and not replayed and source_fingerprints(spec, layout) == before:
        write_stage_seal(spec, inputs, before, image, receipt)
    write_stamp(run_, receipt, started)


def blocks_record_path(spec: Spec) -> Path:
    return spec.state_dir / "sync-blocks.json"


def fill_planned_blocks(spec: Spec, plan: DiskPlan, layout: Mapping[str, Any], image: Path, nodes: Mapping[str, str],
                        omitted: Sequence[str], inputs: str, direct_io: bool,
                        source_root: Path | None = None) -> dict[str, BlockOutcome]:
    """The plan's block copies (tasks/lib/copy/blocks.py), into disk.img attached but not mounted."""
    if not plan.block_copies:
        blocks_record_path(spec).unlink(missing_ok=True)
        return {}
    info = image.stat()
    with loop_device(image, read_only=False, partitions=True, direct_io=direct_io) as loop:
        return planned_block_copies(
            plan, image, loop.partition, nodes, excluded=[*ALWAYS_EXCLUDED, *contents_to_leave_behind(layout)],
            omitted=omitted, record=blocks_record_path(spec),
            identity={"inputs": inputs, "image": [info.st_dev, info.st_ino]},
            scratch=spec.scratch_dir, run_dir=spec.run_dir, log_file=spec.log_dir / "sync-copy.log",
            progress=console_reporter(), source_root=source_root)


def copy_methods(plan: DiskPlan, by_blocks: Mapping[str, BlockOutcome]) -> list[dict[str, Any]]:
    """The receipt's row per source filesystem: how it was copied, and why (the plan's reason, or the fallback's)."""
    rows = []
    for copy in plan.copies:
        outcome = by_blocks.get(copy.source_mountpoint)
        if outcome is not None and outcome.fallback is None:
            rows.append({"mountpoint": copy.source_mountpoint, "method": "blocks", "tool": outcome.tool,
                         "resize": outcome.resize, "why": copy.why, "earlier": outcome.earlier,
                         "seconds": outcome.seconds,
                         "bytes_written": outcome.bytes_written, "removed_after": outcome.removed,
                         "released": outcome.released,
                         **({"trim_failed": outcome.trim_failed} if outcome.trim_failed else {})})
        else:
            why = f"planned by blocks; {outcome.fallback}" if outcome is not None and outcome.fallback else copy.why
            rows.append({"mountpoint": copy.source_mountpoint, "method": "files", "why": why})
    return rows


def journal_replayed(layout: Mapping[str, Any], replayed: Sequence[ReplayedFilesystem]) -> list[dict[str, str]]:
    """The receipt's record of the filesystems copied from a replayed overlay (none: an empty list)."""
    mountpoints = {mount["device"]: mount["mountpoint"] for mount in layout["mounts"]}
    return [{"device": fs.device, "mountpoint": mountpoints[fs.device], "fstype": fs.fstype, "reason": fs.reason}
            for fs in replayed]


def write_stamp(run_: StageRun, receipt: Mapping[str, Any], started: float) -> None:
    stamp: SyncStamp = {
        "format": STAMP_FORMAT,
        "version": STAMP_VERSION,
        "host": run_.spec.host,
        "seconds": round(time.monotonic() - started, 1),
        "copy": cast(CopyReceipt, dict(receipt)),  # checked against the schema as it is written
    }
    write_sync_stamp(run_.partial, stamp)
    log.info("synced %s files, %s bytes in %.1f s; manifest %s (verified by %s)", receipt.get("files"),
             receipt.get("bytes"), stamp["seconds"], receipt.get("manifest_digest"), receipt.get("verified_by"))
    for fs in receipt.get("journal_replayed", []):
        log.warning("%s (%s) was not shut down cleanly: copied with its journal replayed in a throw-away overlay; "
                    "the source was not written", fs["device"], fs["mountpoint"])


def _config(spec: Spec) -> dict[str, object]:
    return {"stamp_version": STAMP_VERSION}


STAGE = Stage(
    name="sync",
    doc="copy every file of the source into the target image, verified -> rootfs-synced.stamp",
    target="rootfs-synced.stamp",
    inputs=(LAYOUT_FILE, PLAN_FILE),
    run=sync_host,
    config=_config,
)
