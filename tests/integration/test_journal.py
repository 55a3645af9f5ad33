"""The resource journal with real loop devices, mounts and a process: a SIGKILLed run's leftovers are undone
by the next run of the host, also what the findmnt/losetup sweep (release_stale) cannot find.

A holder process journals what a stage would make (tasks/lib/journal.py):
disk1 on a read-only loop with its partition, a loop over that partition
mounted in the run directory (as an LV's offset loop is), disk2 on a loop
that nothing mounts (a source disk without a filesystem the stage has reached
yet), and a process in a session of its own (as qemu runs under its pty).
It is SIGKILLed: nothing of it is undone. The sweep finds the mount and the
loops under it; disk2's loop and the process are found only by the journal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib import journal, unwind
from tasks.lib.pipeline import Stage, StageRun, run_stage
from tasks.lib.resources import loop_device, release_stale, remove_tree
from tasks.lib.runner import group_members, output, run
from tasks.lib.spec import PROJECT_DIR, Spec, load_specs

MiB = 1 << 20

HOLD = """
import contextlib, subprocess, sys, time
from pathlib import Path
from tasks.lib import journal
from tasks.lib.resources import loop_device, mounted, read_only_mount_options
run_dir, disk1, disk2 = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
run_dir.mkdir(parents=True, exist_ok=True)
with journal.journaling(run_dir), contextlib.ExitStack() as stack:
    first = stack.enter_context(loop_device(disk1, read_only=True, partitions=True))
    part = stack.enter_context(loop_device(first.partition(1), read_only=True))
    point = run_dir / "tree"
    point.mkdir(exist_ok=True)
    stack.enter_context(mounted(part.path, point, fstype="ext4", options=read_only_mount_options("ext4")))
    second = stack.enter_context(loop_device(disk2, read_only=True))
    sleeper = stack.enter_context(journal.resource(
        "process", lambda: subprocess.Popen(["sleep", "600"], start_new_session=True),
        lambda proc: (proc.kill(), proc.wait()), lambda proc: journal.process_record(proc.pid, "sleep")))
    print(first.path, part.path, second.path, sleeper.pid, flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("journal-disks")
    disk1, disk2 = directory / "disk1.img", directory / "disk2.img"
    for image in (disk1, disk2):
        with image.open("wb") as handle:
            handle.truncate(64 * MiB)
    run(["sfdisk", "--quiet", str(disk1)], input="label: dos\nstart=2048, type=83\n")
    with loop_device(disk1, read_only=False, partitions=True) as loop:
        run(["mkfs.ext4", "-q", "-F", loop.partition(1)])
    yield disk1, disk2
    disk1.unlink(missing_ok=True)
    disk2.unlink(missing_ok=True)


def make_spec(project: Path, host: str, images: tuple[Path, Path]) -> Spec:
    spec_dir = project / "specs"
    spec_dir.mkdir(parents=True)
    (spec_dir / f"{host}.yaml").write_text("source:\n  images:\n" + "".join(f"    - {i}\n" for i in images))
    (spec,) = load_specs(spec_dir)
    return spec


def leftovers(spec: Spec, images: tuple[Path, Path], pid: int | None) -> list[str]:
    """Loops over the images (and over their partitions), mounts in the run dir, the process."""
    table = output(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"])
    attached = dict(line.split(None, 1) for line in table.splitlines() if len(line.split(None, 1)) == 2)
    ours = {name for name, backing in attached.items() if backing.strip() in {str(i) for i in images}}
    ours |= {name for name, backing in attached.items() if any(backing.startswith(f"{o}p") for o in ours)}
    found = sorted(f"loop {name}" for name in ours)
    found += [f"mount {line}" for line in output(["findmnt", "-rn", "-o", "TARGET"]).splitlines()
              if line.startswith(f"{spec.run_dir}/")]
    if pid is not None and journal.process_start_time(pid) is not None and not unwind._zombie(pid):
        found.append(f"process {pid}")  # (a zombie holds nothing; whoever inherited it reaps it)
    return found


def kill_holder(spec: Spec, images: tuple[Path, Path]) -> tuple[list[str], int]:
    """Run the holder, SIGKILL it once it holds everything; (loop devices, the process's pid)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(spec.run_dir), *map(str, images)], cwd=PROJECT_DIR,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        *loops, pid = holder.stdout.readline().split()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    held = journal.held(journal.read(journal.journal_path(spec.run_dir))[0])
    assert [h.kind for h in held] == ["process", "loop", "mount", "loop", "loop"]
    assert len(leftovers(spec, images, int(pid))) == 5  # three loops, the mount, the process
    return loops, int(pid)


def test_the_sweep_alone_misses_what_the_journal_names(disks: tuple[Path, Path], tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "journal-sweep", disks)
    (first, part, second), pid = kill_holder(spec, disks)
    released = release_stale(spec.run_dir, [])
    assert released == [f"mount {spec.run_dir}/tree", f"loop {part}", f"loop {first}"]
    assert leftovers(spec, disks, pid) == [f"loop {second}", f"process {pid}"]
    assert unwind.undo_journal(spec.run_dir) == [f"process sleep (pid {pid})", f"loop {second} on {disks[1]}"]
    assert leftovers(spec, disks, pid) == []
    assert not journal.journal_path(spec.run_dir).exists()
    remove_tree(spec.run_dir)


def write_done(stage_run: StageRun) -> None:
    stage_run.partial.write_text("done\n")


NOOP = Stage(name="noop", doc="does nothing", target="noop.stamp", inputs=(), run=write_done, config=lambda spec: {})


def test_the_next_stage_undoes_a_killed_run_first(disks: tuple[Path, Path], tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "journal-next", disks)
    (first, part, second), pid = kill_holder(spec, disks)
    assert run_stage(NOOP, spec) is None
    log = (spec.log_dir / "noop.log").read_text()
    undone = [line.partition(unwind.RELEASED)[2] for line in log.splitlines()
              if unwind.RELEASED in line]
    tree = spec.run_dir / "tree"
    assert undone == [f"process sleep (pid {pid})", f"loop {second} on {disks[1]}", f"mount {tree}",
                      f"loop {part} on {os.path.realpath(first + 'p1')}", f"loop {first} on {disks[0]}"], log
    assert "released what an interrupted run left: " not in log  # the sweep found nothing more
    assert leftovers(spec, disks, pid) == []
    assert not journal.journal_path(spec.run_dir).exists()
    assert spec.artifact("noop.stamp").read_text() == "done\n"
    remove_tree(spec.run_dir)


GROUP_HOLD = """
import sys
from pathlib import Path
from tasks.lib import journal
from tasks.lib.runner import run
with journal.journaling(Path(sys.argv[1])):
    # A chroot command runs in a process group of its own (runner.run own_group=True), and what it
    # starts in the background is in that group too.
    run(["sh", "-c", "sleep 600 & echo started; sleep 600"], own_group=True, capture=False)
"""


def test_a_command_group_left_by_a_killed_run_is_killed_whole(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", GROUP_HOLD, str(run_dir)], cwd=PROJECT_DIR,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 10  # the record is written right after the fork: maybe after the echo
        while not journal.held(journal.read(journal.journal_path(run_dir))[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    (held,) = journal.held(journal.read(journal.journal_path(run_dir))[0])
    pgid = held.resource["pid"]
    assert held.resource["group"] is True
    assert len(group_members(pgid)) == 3  # sh and its two sleeps live on
    assert unwind.undo_journal(run_dir) == [f"process group sh (pid {pgid})"]
    assert group_members(pgid) == []
