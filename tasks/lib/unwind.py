"""Undo what a killed run of a host left, from its resource journal (tasks/lib/journal.py).

The stage runner calls `undo_journal` first thing under the host's lock,
before `release_stale` sweeps for what the journal cannot name. Each resource
still held is undone newest first, the order its context managers would have
used: mounts before the loop devices under them, LVs before the md array
they sit on, a daemon before its export. Each undo checks first that the
resource is still the one recorded (a loop with the same backing file, a
mount point, an array with the same uuid, a process with the same start
time), so a loop device or pid reused by someone else since is never touched;
what is gone already is marked so. Each step is logged in the stage's log,
and journaled as released, so an interrupted undo resumes where it stopped.
An undo that fails stops the stage with one line: the next steps would meet
the leftover (an array still assembled, an image still attached).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tasks.lib import journal, machine_names, storage
from tasks.lib.overlay import export_present, release_export
from tasks.lib.resources import detach_loop, mounts_below, unmount
from tasks.lib.runner import P2VError, group_members, kill_group, output, run

log = logging.getLogger("p2v.unwind")

# How the stage log says each undo (the sweep after it says `released what an interrupted run left: ...`).
RELEASED = "released what an interrupted run left, from its journal: "


def _loop_still_ours(resource: Mapping[str, Any]) -> bool:
    """The loop device still has the recorded backing file at the recorded offset."""
    sys_dir = Path("/sys/class/block") / os.path.basename(resource["device"]) / "loop"
    try:
        backing = (sys_dir / "backing_file").read_text().strip().removesuffix(" (deleted)")
        offset = int((sys_dir / "offset").read_text().strip())
    except (OSError, ValueError):
        return False  # detached: no loop/ directory
    return bool(backing == resource["backing"] and offset == resource["offset"])


def _undo_loop(resource: Mapping[str, Any]) -> bool:
    if not _loop_still_ours(resource):
        return False
    detach_loop(resource["device"])
    return True


def _undo_mount(resource: Mapping[str, Any]) -> bool:
    target = resource["target"]
    if target not in mounts_below(Path(target)):
        return False
    unmount(target)
    return True


def _undo_lvm(resource: Mapping[str, Any]) -> bool:
    """vgchange -an of exactly the recorded VGs, seen through exactly the recorded --devices and p2v's own
    LVM configuration, while a device-mapper device of theirs (by its LVM uuid) is there."""
    if not set(resource["dm_uuids"]) & machine_names.active_dm_uuids():
        return False
    with storage.lvm_config() as config_dir:
        storage.vgchange(resource["devices"], config_dir, ["-an", *resource["vgs"]])
    return True


def _running_md_arrays() -> list[str]:
    try:
        text = Path("/proc/mdstat").read_text()
    except OSError:
        return []  # no md driver: nothing can be assembled
    return [f"/dev/{line.split()[0]}" for line in text.splitlines() if line.startswith("md")]


def _md_uuid(node: str) -> str | None:
    values = dict(line.split("=", 1) for line in output(["mdadm", "--detail", "--export", node], check=False)
                  .splitlines() if "=" in line)
    return values.get("MD_UUID")


def _undo_md(resource: Mapping[str, Any]) -> bool:
    """mdadm --stop of the array with the recorded uuid, found by its kernel name (/dev/mdN), so
    that a missing /dev/md/ link does not hide it."""
    for node in _running_md_arrays():
        if _md_uuid(node) == resource["uuid"]:
            run(["mdadm", "--stop", node])
            return True
    return False


def _undo_export(resource: Mapping[str, Any]) -> bool:
    export = Path(resource["export"])
    if not export_present(export):
        return False
    release_export(export)
    return True


def _undo_group(resource: Mapping[str, Any]) -> bool:
    """SIGKILL to a chroot command's process group (what the runner does when the command ends) while any
    member is left. The kernel gives no new process a pid that is still a group's id, so the members are
    the recorded group's, unless the leader's pid now has another start time (the group ended long ago)."""
    pid = resource["pid"]
    started = journal.process_start_time(pid)
    if started is not None and started != resource["start_time"] and not _zombie(pid):
        return False
    if not group_members(pid):
        return False
    kill_group(pid)
    return True


def _undo_process(resource: Mapping[str, Any], timeout: float = 10.0) -> bool:
    """SIGTERM (qemu-storage-daemon flushes and unmounts its export), then SIGKILL; only the recorded
    process: the same pid with the same start time."""
    if resource.get("group"):
        return _undo_group(resource)
    pid = resource["pid"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if journal.process_start_time(pid) != resource["start_time"] or _zombie(pid):
            return sig != signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if journal.process_start_time(pid) != resource["start_time"] or _zombie(pid):
                return True
            time.sleep(0.05)
    raise P2VError(f"{resource['command']} (pid {pid}) does not exit after SIGKILL")


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    return False


UNDO: Mapping[str, Callable[[Mapping[str, Any]], bool]] = {
    "loop": _undo_loop, "mount": _undo_mount, "lvm": _undo_lvm, "md": _undo_md,
    "fuse-export": _undo_export, "process": _undo_process,
}


def undo_journal(run_dir: Path) -> list[str]:
    """Undo, newest first, every resource the host's journal says a killed run still held; return what was
    undone. The journal is removed once nothing in it is held."""
    path = journal.journal_path(run_dir)
    records, problems = journal.read(path)
    for problem in problems:
        log.warning("resource journal: a line left out: %s", problem)
    leftovers = journal.held(records)
    if not leftovers:
        path.unlink(missing_ok=True)
        return []
    writer = journal.Journal(path)
    undone: list[str] = []
    for held in leftovers:
        what = held.describe()
        try:
            was_there = UNDO[held.kind](held.resource)
        except P2VError as error:
            raise P2VError(f"cannot undo what an interrupted run left ({what}): {error.args[0]}",
                           hint=f"release it by hand, then rerun; the journal is {path}") from None
        if was_there:
            log.warning("%s%s", RELEASED, what)
            undone.append(what)
        else:
            log.info("gone already, left by an interrupted run according to its journal: %s", what)
        writer.released(held.seq, "undone-by-next-run" if was_there else "gone")
    path.unlink(missing_ok=True)
    return undone
