"""Sources that were not shut down cleanly: their journal replayed in a throw-away overlay, the source never written.

Each power-cut image (tests/fixtures/powercut.py) first proves the problem:
mounted as p2v mounted every source before (ro,noload / ro,norecovery) the
last fsync'ed file is absent, and the filesystem's own tools say it needs
recovery. Then p2v's view has the file, the source hashes the same, and
nothing stays mounted, attached or running: also on the live path (real
device nodes), through an LV, when the replay fails, and after a killed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import inspect
from tasks.lib import unwind
from tasks.lib.pipeline import run_stage
from tasks.lib.replay import replayed_journal
from tasks.lib.resources import loop_device, mounted, read_only_mount_options, release_stale
from tasks.lib.runner import output, run
from tasks.lib.spec import PROJECT_DIR, Spec, load_specs
from tasks.lib.storage import kernel_has_device_mapper, unreplayed_journal
from tasks.sync import fingerprint, source_fingerprints
from tests.fixtures.cache import sha256
from tests.fixtures.powercut import (
    Cut,
    needs_recovery,
    power_cut,
    read_only_view,
    rename_synced,
    source_node,
    write_synced,
)
from tests.killpoints import Gate, KillPoint, doit_command, kill_at, stray_processes

MiB = 1 << 20
LAST_WORDS = "fsync'ed just before the power cut\n"


def make_spec(project: Path, host: str, source: str) -> Spec:
    spec_dir = project / "specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / f"{host}.yaml").write_text(source)
    (spec,) = load_specs(spec_dir)
    return spec


def images_spec(project: Path, host: str, images: list[Path]) -> Spec:
    return make_spec(project, host, "source:\n  images:\n" + "".join(f"    - {image}\n" for image in images))


def mkfs(node: str, fstype: str) -> None:
    if fstype == "xfs":
        run(["mkfs.xfs", "-q", "-f", node])
    else:
        run([f"mkfs.{fstype}", "-q", "-F", node])


def last_changes(root: Path) -> None:
    """A file created and fsync'ed, and a rename, both only in the journal when the power goes."""
    write_synced(root / "before-rename.txt", LAST_WORDS)
    rename_synced(root / "before-rename.txt", root / "last-words.txt")


LAST_PATHS = ("before-rename.txt", "last-words.txt")


def leftovers(spec: Spec, images: list[Path]) -> list[str]:
    """Everything a replay makes, if it is still there: loops on the images or in the run dir, mounts
    and daemons in the run dir, overlay files."""
    run_dir = str(spec.run_dir)
    found = [line for line in output(["losetup", "-a"]).splitlines()
             if any(str(image) in line for image in images) or run_dir in line]
    found += [line for line in output(["findmnt", "-rn", "-o", "TARGET"]).splitlines() if line.startswith(run_dir)]
    found += [f"process {line}" for line in run(["pgrep", "-a", "-f", f"qemu-storage-daemon.*{run_dir}"],
                                                 check=False).stdout.splitlines()]
    found += [f"file {path}" for path in spec.scratch_dir.glob("*")] if spec.scratch_dir.is_dir() else []
    return found


# ---------------------------------------------------------------- one filesystem


def power_cut_filesystem(tmp_path: Path, fstype: str) -> Path:
    """A bare filesystem image (no partition table) cut while its last changes were only in the journal."""
    pristine = tmp_path / f"{fstype}-pristine.img"
    with open(pristine, "wb") as handle:
        handle.truncate((320 if fstype == "xfs" else 64) * MiB)  # mkfs.xfs wants 300 MB
    mkfs(str(pristine), fstype)
    source = tmp_path / f"{fstype}-cut.img"
    power_cut([Cut(pristine, None, last_changes, absent=LAST_PATHS)], {pristine: source})
    pristine.unlink()
    return source


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_the_replayed_view_has_what_the_journal_held_and_the_source_is_not_written(tmp_path: Path,
                                                                                    fstype: str) -> None:
    source = power_cut_filesystem(tmp_path, fstype)
    before = sha256(source)
    spec = images_spec(tmp_path, f"cut-{fstype}", [source])
    point = tmp_path / "mnt"
    point.mkdir()
    with source_node(source, None) as node:
        # The problem, proved: the filesystem's tools say so, and the old read-only view lacks the file.
        assert needs_recovery(node)
        with read_only_view(node, point):
            assert not (point / "last-words.txt").exists()
        assert unreplayed_journal(fstype, node) is not None
        assert fingerprint(node, fstype) is None  # so no stage seal can ever skip its copy
        with replayed_journal("disk1", fstype, node, "test", scratch_dir=spec.scratch_dir,
                              run_dir=spec.run_dir) as replayed:
            assert replayed.view != node
            assert unreplayed_journal(fstype, replayed.view) is None
            with mounted(replayed.view, point, fstype=fstype, options=read_only_mount_options(fstype)):
                assert (point / "last-words.txt").read_text() == LAST_WORDS
                assert not (point / "before-rename.txt").exists()
            assert leftovers(spec, [source]) != []  # the overlay is in place
        assert needs_recovery(node)  # the source still holds its unreplayed journal
    assert sha256(source) == before
    assert leftovers(spec, [source]) == []


# ---------------------------------------------------------------- a small server, inspected and read by sync


def small_server(tmp_path: Path) -> tuple[Path, Path]:
    """Two disks like a server's: disk1 msdos with / (ext4), disk2 with /srv (xfs); both cut with their last
    changes in the journal. Returns the two power-cut images."""
    pristine = [tmp_path / "disk1-pristine.img", tmp_path / "disk2-pristine.img"]
    for image, size in zip(pristine, (96 * MiB, 340 * MiB), strict=True):
        with open(image, "wb") as handle:
            handle.truncate(size)
        run(["sfdisk", "--quiet", str(image)], input="label: dos\nstart=2048, type=83\n")
    uuids = {}
    with loop_device(pristine[0], read_only=False, partitions=True) as one, \
            loop_device(pristine[1], read_only=False, partitions=True) as two:
        for loop, fstype, key in ((one, "ext4", "/"), (two, "xfs", "/srv")):
            mkfs(loop.partition(1), fstype)
            uuids[key] = output(["blkid", "-p", "-s", "UUID", "-o", "value", loop.partition(1)])

    def root_files(root: Path) -> None:
        (root / "etc").mkdir()
        (root / "srv").mkdir()
        (root / "etc" / "os-release").write_text('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n')
        (root / "etc" / "hostname").write_text("powercut\n")
        (root / "etc" / "fstab").write_text(f"UUID={uuids['/']} / ext4 errors=remount-ro 0 1\n"
                                            f"UUID={uuids['/srv']} /srv xfs defaults 0 2\n")
        os.sync()  # the tree itself is in place; only the last changes are left in the journal
        last_changes(root)

    sources = [tmp_path / "disk1.img", tmp_path / "disk2.img"]
    power_cut([Cut(pristine[0], 1, root_files, absent=LAST_PATHS),
               Cut(pristine[1], 1, last_changes, absent=LAST_PATHS)], dict(zip(pristine, sources, strict=True)))
    for image in pristine:
        image.unlink()
    return sources[0], sources[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return small_server(tmp_path_factory.mktemp("powercut-server"))


def test_small_server_is_power_cut(server: tuple[Path, Path], tmp_path: Path) -> None:
    point = tmp_path / "mnt"
    point.mkdir()
    for image in server:
        with source_node(image, 1) as node:
            assert needs_recovery(node)
            with read_only_view(node, point):
                assert not (point / "last-words.txt").exists()


def test_inspect_records_and_reads_the_replayed_filesystems(server: tuple[Path, Path], tmp_path: Path) -> None:
    images = list(server)
    before = {image: sha256(image) for image in images}
    spec = images_spec(tmp_path, "powercut", images)
    assert run_stage(inspect.STAGE, spec) is None
    layout = json.loads(spec.artifact("layout.json").read_text())
    recovery = {fs["mountpoint"]: fs["needs_recovery"] for fs in layout["filesystems"]}
    assert recovery == {"/": True, "/srv": True}
    assert "powercut" == layout["system"]["hostname"]
    assert [note for note in layout["later"] if "not shut down cleanly" in note] == [
        "disk1p1 (/, ext4) was not shut down cleanly: inspect read it with its journal replayed in a throw-away "
        "overlay",
        "disk2p1 (/srv, xfs) was not shut down cleanly: inspect read it with its journal replayed in a throw-away "
        "overlay",
    ]
    assert not any("needs_recovery" in fs.get("features", []) for fs in layout["filesystems"])
    log = (spec.log_dir / "inspect.log").read_text()
    assert "journal replayed" in log
    # sync's view: the files are there, the fingerprints (from the real source) are none
    with inspect.source_tree(spec, layout) as view:
        assert (view.root / "last-words.txt").read_text() == LAST_WORDS
        assert (view.root / "srv" / "last-words.txt").read_text() == LAST_WORDS
        assert [(fs.device, fs.fstype) for fs in view.replayed] == [("disk1p1", "ext4"), ("disk2p1", "xfs")]
    assert source_fingerprints(spec, layout) is None
    assert {image: sha256(image) for image in images} == before
    assert leftovers(spec, images) == []


def test_sync_copies_and_verifies_the_replayed_view_and_never_takes_the_seal_fast_path(
        server: tuple[Path, Path], tmp_path: Path) -> None:
    from tasks import disk, sync
    from tasks.lib.plan import DiskPlan
    from tests.integration.test_sync import image_tree

    images = list(server)
    before = {image: sha256(image) for image in images}
    spec = images_spec(tmp_path, "powercut-sync", images)
    for stage in (inspect.STAGE, disk.STAGE, sync.STAGE):
        assert run_stage(stage, spec) is None, stage.name
    copy = json.loads(spec.artifact("rootfs-synced.stamp").read_text())["copy"]
    assert copy["verified"] and copy["verified_by"] == "manifests"
    assert [(fs["device"], fs["mountpoint"], fs["fstype"]) for fs in copy["journal_replayed"]] == [
        ("disk1p1", "/", "ext4"), ("disk2p1", "/srv", "xfs")]
    assert not sync.stage_seal_path(spec).exists()  # fingerprints are none: nothing vouches for a replayed copy
    plan = DiskPlan.from_json(json.loads(spec.artifact("disk-plan.json").read_text()))
    with image_tree(spec.artifact("disk.img"), plan, tmp_path / "image") as tree:
        assert (tree / "last-words.txt").read_text() == LAST_WORDS
        assert (tree / "srv" / "last-words.txt").read_text() == LAST_WORDS
    # A rerun replays again and proves the copy again; it never skips the sources by the stage seal.
    assert run_stage(sync.STAGE, spec) is None
    again = json.loads(spec.artifact("rootfs-synced.stamp").read_text())["copy"]
    assert again["verified_by"] in ("manifests", "seal")  # the copy seal is taken over the replayed trees
    assert [fs["device"] for fs in again["journal_replayed"]] == ["disk1p1", "disk2p1"]
    assert {image: sha256(image) for image in images} == before
    assert leftovers(spec, [*images, spec.artifact("disk.img")]) == []


def test_live_path_replays_on_real_device_nodes(server: tuple[Path, Path], tmp_path: Path) -> None:
    """source.devices: whole-disk block devices, as on the live system (loops stand in for /dev/sdX here:
    the code path sees only block device nodes, set read-only with blockdev --setro)."""
    images = list(server)
    before = {image: sha256(image) for image in images}
    with contextlib.ExitStack() as stack:
        disks = [stack.enter_context(loop_device(image, read_only=True, partitions=True)) for image in images]
        for disk in disks:  # attached_source sets them read-only, which would outlive the detach
            stack.callback(run, ["blockdev", "--setrw", disk.path], check=False)
        devices = "".join(f"    - {disk.path}\n" for disk in disks)
        spec = make_spec(tmp_path, "powercut-live", f"source:\n  devices:\n{devices}")
        assert spec.source.live
        with inspect.reachable_source(spec) as (discovery, device_map):
            assert sorted(discovery.replayed) == ["disk1p1", "disk2p1"]
            for name, replayed in discovery.replayed.items():
                assert replayed.source == f"{disks[int(name[4]) - 1].path}p1"
                assert device_map.node(name) == replayed.view
            point = tmp_path / "mnt"
            point.mkdir()
            for name, fstype in (("disk1p1", "ext4"), ("disk2p1", "xfs")):
                with mounted(device_map.node(name), point, fstype=fstype, options=read_only_mount_options(fstype)):
                    assert (point / "last-words.txt").read_text() == LAST_WORDS
        assert leftovers(spec, []) == []
    assert {image: sha256(image) for image in images} == before


# ---------------------------------------------------------------- LVM


def test_a_logical_volume_is_replayed_too(tmp_path: Path) -> None:
    """An ext4 on a linear LV, read the way this kernel can (a loop at the LV's offset; with
    device-mapper, /dev/<vg>/<lv>): the replay sits on whatever node the LV has."""
    pristine = tmp_path / "lvm-pristine.img"
    with open(pristine, "wb") as handle:
        handle.truncate(128 * MiB)
    run(["sfdisk", "--quiet", str(pristine)], input="label: dos\nstart=2048, type=8e\n")
    vg = f"vg_p2vcut{os.getpid()}"
    from tasks.lib.storage import discover_lvm, linear_lv_extent, lvm_config, lvm_env

    with loop_device(pristine, read_only=False, partitions=True) as loop, lvm_config() as config:
        pv = loop.partition(1)
        env = lvm_env(config)
        run(["pvcreate", "--devices", pv, pv], env=env)
        run(["vgcreate", "--devices", pv, vg, pv], env=env)
        run(["lvcreate", "--devices", pv, "--driverloaded", "n", "-an", "-Zn", "-L", "64M", "-n", "data", vg],
            env=env)
        lvm = discover_lvm({"disk1p1": pv}, config)
        _pv, offset, size = linear_lv_extent(lvm["lvs"][0], lvm)
    start = 2048 * 512 + offset  # the partition's start, then the LV's on its PV
    with loop_device(pristine, read_only=False, offset=start, size=size) as lv:
        mkfs(lv.path, "ext4")
    source = tmp_path / "lvm.img"
    power_cut([Cut(pristine, None, last_changes, absent=LAST_PATHS, offset=start, size=size)], {pristine: source})
    pristine.unlink()
    before = sha256(source)
    spec = images_spec(tmp_path, "powercut-lvm", [source])
    point = tmp_path / "mnt"
    point.mkdir()
    with inspect.reachable_source(spec) as (discovery, devices):
        name = f"lv:{vg}/data"
        assert sorted(discovery.replayed) == [name]
        if not kernel_has_device_mapper():
            assert discovery.replayed[name].source.startswith("/dev/loop")  # the offset loop on the PV
        with mounted(devices.node(name), point, fstype="ext4", options=read_only_mount_options("ext4")):
            assert (point / "last-words.txt").read_text() == LAST_WORDS
    assert sha256(source) == before
    assert leftovers(spec, [source]) == []


# ---------------------------------------------------------------- failure


def corrupt_journal(image: Path) -> None:
    """Zero the ext4 journal's superblock: the kernel then refuses to replay (and to mount without noload)."""
    block = int(output(["debugfs", "-R", "bmap <8> 0", str(image)]).split()[-1])
    block_size = int(next(line.split()[-1] for line in output(["dumpe2fs", "-h", str(image)]).splitlines()
                          if line.startswith("Block size:")))
    with open(image, "r+b") as handle:
        handle.seek(block * block_size)
        assert handle.read(4) == bytes.fromhex("c03b3998")  # the jbd2 magic
        handle.seek(block * block_size)
        handle.write(bytes(block_size))


def test_a_journal_that_does_not_replay_stops_inspect_with_one_clear_line(tmp_path: Path) -> None:
    source = power_cut_filesystem(tmp_path, "ext4")
    corrupt_journal(source)
    point = tmp_path / "mnt"
    point.mkdir()
    with source_node(source, None) as node:
        assert needs_recovery(node)
        with read_only_view(node, point):  # the view a silent fallback would have copied
            assert not (point / "last-words.txt").exists()
    before = sha256(source)
    spec = images_spec(tmp_path, "badjournal", [source])
    failure = run_stage(inspect.STAGE, spec)
    assert failure is not None
    message = failure.message
    assert message.startswith("inspect:badjournal: disk1 (ext4): the journal could not be replayed in a throw-away "
                              "overlay: command failed (exit code 32): mount -t ext4 -o ro /dev/loop")
    assert "--- output tail ---" in message and "wrong fs type, bad option, bad superblock" in message
    assert "(hint: the server was not shut down cleanly and its journal does not replay" in message
    assert not spec.artifact("layout.json").exists()
    assert sha256(source) == before
    assert leftovers(spec, [source]) == []


# ---------------------------------------------------------------- a killed run


HOLD = """
import contextlib, sys, time
from pathlib import Path
from tasks import inspect
from tasks.lib import journal
from tasks.lib.spec import load_specs
(spec,) = load_specs(Path(sys.argv[1]))
with journal.journaling(spec.run_dir) if sys.argv[2:] == ["journaled"] else contextlib.nullcontext(), \
        inspect.reachable_source(spec) as (discovery, devices):
    print(" ".join(sorted(discovery.replayed)), flush=True)
    time.sleep(600)
"""


def kill_during_replay(spec: Spec, images: list[Path], *, journaled: bool = False) -> None:
    """A process that reaches the source (both journals replayed) and is SIGKILLed: no cleanup at all.
    journaled: it journals what it makes, as a stage run by the pipeline does (tasks/lib/journal.py)."""
    argv = [sys.executable, "-c", HOLD, str(spec.path.parent), *(["journaled"] if journaled else [])]
    holder = subprocess.Popen(argv, cwd=PROJECT_DIR, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().split() == ["disk1p1", "disk2p1"]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    left = leftovers(spec, images)
    assert sum(line.startswith("process ") for line in left) == 2  # the daemons live on
    assert sum(line.startswith("file ") and line.endswith(".qcow2") for line in left) == 2


def test_the_next_stage_frees_what_a_killed_replay_left(server: tuple[Path, Path], tmp_path: Path) -> None:
    images = list(server)
    spec = images_spec(tmp_path, "powercut-killed", images)
    kill_during_replay(spec, images)
    # The next stage of the host releases all of it first (pipeline -> release_stale), then works as usual.
    assert run_stage(inspect.STAGE, spec) is None
    released = next(line for line in (spec.log_dir / "inspect.log").read_text().splitlines()
                    if "released what an interrupted run left" in line)
    assert released.count("qemu-storage-daemon ") == 2 and released.count(".qcow2") == 2, released
    assert leftovers(spec, images) == []
    assert json.loads(spec.artifact("layout.json").read_text())["root"] == "disk1p1"


def test_release_stale_frees_a_killed_replay(server: tuple[Path, Path], tmp_path: Path) -> None:
    images = list(server)
    spec = images_spec(tmp_path, "powercut-killed2", images)
    kill_during_replay(spec, images)
    released = release_stale(spec.run_dir, [], scratch_dir=spec.scratch_dir)
    assert sum(item.startswith("qemu-storage-daemon ") for item in released) == 2
    deadline = time.monotonic() + 10
    while leftovers(spec, images) and time.monotonic() < deadline:
        time.sleep(0.2)  # a loop released with autoclear goes when its last holder has exited
    assert leftovers(spec, images) == []
    assert sorted(path.name for path in spec.run_dir.iterdir()) == []  # no pid file, no export file


def test_a_killed_replay_is_undone_from_its_journal(server: tuple[Path, Path], tmp_path: Path) -> None:
    """The same kill, journaled: the next stage undoes daemons, exports and loops from the journal, newest
    first, and the findmnt/losetup sweep after it finds no kernel resource left to release."""
    images = list(server)
    spec = images_spec(tmp_path, "powercut-journaled", images)
    kill_during_replay(spec, images, journaled=True)
    assert run_stage(inspect.STAGE, spec) is None
    lines = (spec.log_dir / "inspect.log").read_text().splitlines()
    undone = [line.partition(unwind.RELEASED)[2] for line in lines
              if unwind.RELEASED in line]
    kinds = [item.split()[0] for item in undone]
    assert kinds.count("process") == 2 and kinds.count("FUSE") == 2, undone
    # Each replay: its view loop, then its daemon, then its export; the disks' loops last.
    assert kinds[:3] == ["loop", "process", "FUSE"] and kinds[-2:] == ["loop", "loop"], undone
    # The sweep after it releases no kernel resource, only the scratch overlays (files on the work area).
    (swept,) = [line.partition("released what an interrupted run left: ")[2] for line in lines
                if "released what an interrupted run left: " in line]
    assert [item.split()[0] for item in swept.split(", ")] == ["file", "file"], swept
    assert leftovers(spec, images) == []
    assert json.loads(spec.artifact("layout.json").read_text())["root"] == "disk1p1"


def test_doit_killed_while_the_replay_overlays_are_up(server: tuple[Path, Path], tmp_path: Path) -> None:
    """The kill matrix's journal-replay point, on a real `doit inspect:` SIGKILLed with its whole process
    group while the second filesystem's journal replays (the first one's overlay up, its own daemon
    started): the rerun releases both exports, the loops on them and the overlays, and inspects as usual."""
    images = list(server)
    before = {image: sha256(image) for image in images}
    spec = images_spec(tmp_path, "powercut-doit", images)
    # xfs's replay mount: `ro,nouuid` without norecovery (every other xfs mount of a source has it).
    point = KillPoint("journal-replay", "inspect", gates=(Gate("mount", "-t xfs -o ro,nouuid *replay-*"),))
    argv, env = doit_command(spec.path.parent, "inspect:powercut-doit")
    kill_at(point, argv, env, workdir=spec.workdir, run_dir=spec.run_dir, scratch=tmp_path)
    left = leftovers(spec, images)
    # Both overlays (the daemons died with the group: their exports are dead FUSE mounts).
    assert sum(line.startswith("file ") and line.endswith(".qcow2") for line in left) == 2, left
    assert not spec.artifact("layout.json").exists()
    rerun = subprocess.run(argv, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    lines = (spec.log_dir / "inspect.log").read_text().splitlines()
    # The exports (and the loops on them) from the run's resource journal, the overlays by the sweep.
    undone = [line.partition(unwind.RELEASED)[2] for line in lines if unwind.RELEASED in line]
    assert sum(item.startswith("FUSE export ") for item in undone) == 2, undone
    (swept,) = [line.partition("released what an interrupted run left: ")[2] for line in lines
                if "released what an interrupted run left: " in line]
    assert swept.count(".qcow2") == 2, swept
    assert json.loads(spec.artifact("layout.json").read_text())["root"] == "disk1p1"
    assert leftovers(spec, images) == [] and stray_processes(spec.run_dir, spec.workdir) == []
    assert {image: sha256(image) for image in images} == before
