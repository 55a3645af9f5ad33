"""Inode flags the sync stage left pending (i and a): cleared before fix edits, set again after."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tasks.lib import inodeflags
from tasks.lib.fixes.steps.context import FixContext
from tasks.lib.fixes.steps.record import _read_record, _write_record
from tasks.lib.outputs import SyncStamp
from tasks.lib.paths import resolve_in_root
from tasks.lib.planning.model import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.target import MountedTarget


def target_devices(target: MountedTarget, plan: DiskPlan) -> frozenset[int]:
    """The st_dev of every target filesystem: flags are set there and nowhere else (not through a bind)."""
    return frozenset(os.stat(resolve_in_root(target.root, mp)).st_dev for mp in plan.mount_order)


def pending_flags(sync_stamp: SyncStamp) -> list[tuple[str, str]]:
    """(path, letters) the sync stage left for this stage to set: i and a."""
    return [(row["path"], row["flags"]) for row in sync_stamp["copy"]["inode_flags"]["pending"]]


def applied_flag_paths(root: Path) -> list[str]:
    rows = _read_record(root).get("inode_flags", {}).get("applied", [])
    return [row["path"] for row in rows if isinstance(row, dict) and isinstance(row.get("path"), str)]


def clear_deferred_flags(root: Path, paths: Sequence[str], devices: frozenset[int]) -> int:
    """Clear i and a (set by an earlier run) so that the steps can write; return how many were set."""
    cleared = 0
    for path in sorted(set(paths), key=os.fsencode, reverse=True):
        with inodeflags.open_entry(root, path, devices) as fd:
            if fd is None or not (inodeflags.get_raw(fd) or 0) & inodeflags.DEFERRED:
                continue
            inodeflags.apply_flags(fd, 0, inodeflags.DEFERRED)
            if (inodeflags.get_raw(fd) or 0) & inodeflags.DEFERRED:
                raise P2VError(f"cannot clear the immutable or append-only flag of {path} on the target")
            cleared += 1
    return cleared


def set_deferred_flags(root: Path, pending: Sequence[tuple[str, str]],
                       devices: frozenset[int]) -> list[tuple[str, str]]:
    """Set i and a where the source had them; read each back; return (path, letters) set.

    The paths go into the image's conversion record first, so that a later
    run (fix again, or sync into this image) knows what to unlock even if
    this one is killed halfway.
    """
    record = _read_record(root)
    applied = [{"path": path, "flags": flags} for path, flags in pending]
    if record.get("inode_flags", {}).get("applied") != applied:
        _write_record(root, {**record, "inode_flags": {"applied": applied}})
    done = []
    missing = []
    for path, flags in pending:
        want = inodeflags.bits_of(flags) & inodeflags.DEFERRED
        with inodeflags.open_entry(root, path, devices) as fd:
            if fd is None:
                missing.append(path)
                continue
            got, refused = inodeflags.apply_flags(fd, want, inodeflags.DEFERRED)
        if refused or got & want != want:
            why = "; ".join(sorted(set(refused.values()))) or "not there when read back"
            raise P2VError(f"could not make {path} {inodeflags.describe(want)} on the target: {why}")
        done.append((path, inodeflags.letters(got & inodeflags.DEFERRED)))
    if missing:
        raise P2VError(f"{len(missing)} entries the source had immutable or append-only are not on the target: "
                       f"{', '.join(missing[:5])}", hint="rerun sync:<host>; the copy was verified, so something "
                                                         "removed them since")
    return done


def restore_deferred_flags(ctx: FixContext, pending: Sequence[tuple[str, str]], devices: frozenset[int]) -> None:
    """The inode-flags step: i and a where the source had them, after every other step (set_deferred_flags)."""
    report = ctx.report("inode-flags")
    if not pending:
        report.changes.append("no immutable or append-only file or directory on the source")
        return
    ctx.restored_flags = set_deferred_flags(ctx.root, pending, devices)
    counts = {letter: sum(1 for _, flags in ctx.restored_flags if letter in flags) for letter in "ia"}
    listed = ", ".join(f"{path} ({flags})" for path, flags in ctx.restored_flags[:20])
    more = f" and {len(ctx.restored_flags) - 20} more" if len(ctx.restored_flags) > 20 else ""
    report.changed(f"set i (immutable) on {counts['i']} and a (append only) on {counts['a']} entries, as on the "
                   f"source, read back: {listed}{more}")
