"""The kill matrix: `doit fix:<host>` SIGKILLed (its whole process group) at named points, and rerun.

One small source (plain-bullseye: /boot, / and swap on one disk, /srv xfs on
the other) goes through inspect, disk, sync and fix twice in this module:

- once uninterrupted, the reference;
- once as a chain of killed runs of the same command, `doit fix:<host>`:
  the first run is killed while inspect has the source mounted, the rerun
  finishes inspect and is killed in the disk stage between partitioning and
  mkfs, the next finishes disk and is killed early in the copy, and so on
  through sync (late, during verification) and fix (the package install, the
  initrd rebuild, grub-install); a last rerun finishes.

After each kill: no stamp of the killed stage or a later one. Each rerun
first releases what the killed run left (the log says so). After the last
rerun: layout.json, disk-plan.json, the copy's manifest digest, the fix
receipt (timings apart) and the image's tree (every entry without mtimes) are
those of the uninterrupted run; no loop device, mount or process of the host
is left; the source's sha256 is unchanged. Both projects keep the source's
UUIDs (`target.keep_uuids`), so that the two images can be compared file by
file.

How each point is hit: tests/killpoints.py. Verify killed while the guest
boots (two TCG boots, about 3 minutes) is the last test here, on demand:
P2V_KILL_MATRIX_BOOT=1. The points that need Glance (the qcow2 conversion, the
upload, right after the upload) are in test_upload.py, a killed journal replay
in test_replay.py.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.manifest import Manifest, build_manifest
from tasks.lib.plan import DiskPlan
from tasks.lib.resources import detach_loop, host_run_dir, loops_backed_by, release_stale, source_in_use
from tasks.lib.runner import P2VError, output
from tasks.lib.spec import load_specs
from tests.e2e.test_convert import doit, suite_of
from tests.fixtures.build import FixtureServer, build_server
from tests.fixtures.cache import sha256
from tests.fixtures.packages import ensure_package_dir
from tests.integration.test_inspect import drop_own_images, host_leftovers, make_spec, own_images
from tests.integration.test_sync import image_tree
from tests.killpoints import Gate, Kill, KillPoint, doit_command, kill_at, stray_processes

SERVER = "plain-bullseye"
HOST = SERVER  # the same host name in both projects: it is written into the image (conversion record)
TARGET = f"fix:{HOST}"
MiB = 1 << 20

POINTS = (
    # All three source filesystems are mounted when inspect mounts /srv, the last: that mount waits.
    KillPoint("inspect-mounted", "inspect", gates=(Gate("mount", "*/tree-*/srv"),)),
    KillPoint("disk-before-mkfs", "disk", gates=(Gate("mkfs.ext4", "*"),)),
    KillPoint("sync-early", "sync", filled=64 * MiB, step=r"^(tar|rsync) "),
    # / and /boot are copied, /srv (the last) is about to be: its tar or rsync waits.
    KillPoint("sync-late", "sync", gates=(Gate("tar", "*--directory=*/tree-*/srv ."),
                                          Gate("rsync", "*/tree-*/srv/ *"))),
    KillPoint("sync-verification", "sync", log_line=r"copied .* in [\d.]+ s[\s\S]*\+ find .* -fprintf \S*/listing-",
              step=r"^find "),
    KillPoint("fix-packages", "fix", log_line=r"\+ chroot \S+ apt-get .* install ", settle=3.0,
              step=r"(apt-get|dpkg) "),
    KillPoint("fix-initrd", "fix", log_line=r"\+ chroot \S+ update-initramfs ", settle=5.0,
              step=r"(update-initramfs|mkinitramfs) "),
    KillPoint("fix-grub-install", "fix", log_line=r"\+ chroot \S+ grub-install ", step=r"grub-install "),
)
# What each stage leaves when it finishes; none of the killed stage's or a later one's may exist after a kill.
STAGE_FILES = {"inspect": ("layout.json",), "disk": ("disk.img", "disk-plan.json"),
               "sync": ("rootfs-synced.stamp",), "fix": ("fixed.stamp",)}
STAGES = tuple(STAGE_FILES)
RELEASED = "released what an interrupted run left"
# Files whose bytes depend on when and in how many runs they were written: compared for everything but their
# size and content. Why that hides no loss: the server's own bytes in them were copied by sync, which is
# verified against the source and whose manifest digest is compared (test_stage_outputs_...); after that only
# dpkg, apt and ldconfig write them, with run-dependent bytes. The logs record each dpkg and apt run with
# its time (the killed runs' lines are there too, as they should be); aux-cache is ldconfig's cache of the
# libraries' inode numbers and ctimes; status-old is dpkg's copy of its database from before its last run,
# and after the kills the last run is another one. The database itself, /var/lib/dpkg/status, is compared
# in full, as is every other file but the bytecode below.
TIMESTAMPED = (
    "/var/log/dpkg.log", "/var/log/alternatives.log", "/var/log/apt/history.log", "/var/log/apt/term.log",
    "/var/log/apt/eipp.log.xz",
    "/var/cache/ldconfig/aux-cache",
    "/var/lib/dpkg/status-old",
)
# Bytecode of the standard library's own packages (python3-distutils and python3-lib2to3 are installed
# with cloud-init): compared for everything but its content, its size included. Their postinst compiles
# with `python3.N -E -S py_compile.py`, and -E ignores the PYTHONHASHSEED=0 fix gives its chroot commands
# (py3compile, which compiles every other package's bytecode, honours it: those .pyc are compared in full).
# Python before 3.11 writes a frozenset constant's elements in string-hash order, random per process
# (bpo-37596), so the bytes differ between any two runs in that order alone; the size does not (the same
# elements and references, permuted). Why that hides no loss: the sources they are compiled from (.py) are
# compared in full, a missing or extra .pyc is still a difference, and py_compile writes each one
# atomically (a temporary file renamed), so a kill leaves none torn.
STDLIB_BYTECODE = re.compile(r"/usr/lib/python3\.\d+/.+\.pyc")


def compared(path: str, key: str) -> bool:
    """Whether an entry's field must be the same in both images (see TIMESTAMPED and STDLIB_BYTECODE)."""
    if path in TIMESTAMPED:
        return key not in ("size", "sha256")
    return not (key == "sha256" and STDLIB_BYTECODE.fullmatch(path))


# Receipt keys that hold a time, or a digest of a receipt that holds one.
TIMING_KEYS = {"seconds", "sync_receipt_sha256"}


def kill_spec(project: Path, server: FixtureServer) -> Path:
    packages = ensure_package_dir(suite_of(server.name))
    return make_spec(project, HOST, own_images(server.disks, project), extra=(
        # copy: files: the sync points below are inside tar and rsync; the block copy's own kill is in
        # tests/integration/test_blocks.py.
        "target:\n  keep_uuids: true\n  copy: files\n"
        "fix:\n"
        "  network: keep\n"
        f"  cloud_init:\n    install: true\n    source: {packages}\n    packages: [qemu-guest-agent]\n"))


def normalized(data: Any, project: Path) -> Any:
    """A stage output with what differs between two projects by nature written the same way:
    the project's path, loop device numbers, the run directory's random mount point names, timings."""
    if isinstance(data, dict):
        return {key: normalized(value, project) for key, value in data.items() if key not in TIMING_KEYS}
    if isinstance(data, list):
        return [normalized(value, project) for value in data]
    if isinstance(data, str):
        text = data.replace(str(project), "<project>")
        text = re.sub(r"/dev/loop\d+", "/dev/loopN", text)
        return re.sub(r"/run/p2v/[^/\s\"']+(/[a-z]+-[a-z0-9_]{8})?", "<run>", text)
    return data


def outputs(workdir: Path, project: Path) -> dict[str, Any]:
    """What the stages wrote that a kill must not change, normalized."""
    read = {name: json.loads((workdir / name).read_text())
            for name in ("layout.json", "disk-plan.json", "fixed.stamp")}
    copy = json.loads((workdir / "rootfs-synced.stamp").read_text())["copy"]
    return {**{name: normalized(data, project) for name, data in read.items()},
            "copy manifest": copy["manifest_digest"], "copy verified": copy.get("verified")}


def image_manifest(workdir: Path, scratch: Path) -> dict[str, dict[str, Any]]:
    """Every entry of the image's tree as mounted per its plan, without mtimes."""
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    with image_tree(workdir / "disk.img", plan, scratch) as tree:
        manifest: Manifest = build_manifest(tree, mounts=plan.mount_order[1:])
    return {path: {key: value for key, value in entry.comparable().items() if key != "mtime_ns"}
            for path, entry in manifest.entries.items()}


@pytest.fixture(scope="module")
def server() -> FixtureServer:
    return build_server(SERVER)


def drop_images(project: Path) -> None:
    """The module's big files: each project's disk.img (and what a killed disk stage left), the links."""
    for image in (project / "work" / HOST).glob("disk.*"):
        image.unlink()
    drop_own_images(project)


@pytest.fixture(scope="module")
def reference(server: FixtureServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    project = tmp_path_factory.mktemp("kill-reference")
    spec_dir = kill_spec(project, server)
    started = time.monotonic()
    try:
        result = doit(spec_dir, TARGET)
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        workdir = project / "work" / HOST
        # disk.img stays until the module ends: a failure shows what differs.
        yield {"seconds": seconds, "outputs": outputs(workdir, project), "workdir": workdir,
               "tree": image_manifest(workdir, project / "mnt")}
    finally:
        drop_images(project)


@pytest.fixture(scope="module")
def matrix(server: FixtureServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    project = tmp_path_factory.mktemp("kill-chain")
    try:
        yield kill_chain(project, server)
    finally:
        drop_images(project)


def kill_chain(project: Path, server: FixtureServer) -> dict[str, Any]:
    """`doit fix:<host>` killed at each point in turn, then run to its end; what each kill left."""
    spec_dir = kill_spec(project, server)
    (spec,) = load_specs(spec_dir)
    workdir, run_dir = spec.workdir, spec.run_dir
    sources = list(spec.source.images)
    before = {image: sha256(image) for image in sources}
    scratch = project / "kills"
    scratch.mkdir()
    points: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    for point in POINTS:
        log_path = workdir / "logs" / f"{point.stage}.log"
        try:
            kill: Kill = kill_at(point, *doit_command(spec_dir, TARGET), workdir=workdir, run_dir=run_dir,
                                 scratch=scratch)
        except AssertionError as error:
            points[point.name] = {"error": str(error)}
            break  # a rerun that fails ends the chain: the later points cannot be reached
        points[point.name] = {
            "kill": kill,
            "files": {name: (workdir / name).exists() for files in STAGE_FILES.values() for name in files},
            "left": host_leftovers(spec_dir) + stray_processes(run_dir, workdir),
            "log": log_path, "log_offset": log_path.stat().st_size if log_path.exists() else 0,
        }
        print(f"\n{point.name}: killed after {kill.seconds:.1f} s; running: {kill.running}; "
              f"left: {points[point.name]['left']}")
    final_started = time.monotonic()
    final = doit(spec_dir, TARGET)
    finished = time.monotonic()
    print(f"\nchain: {final_started - started:.0f} s to the last kill, the last rerun {finished - final_started:.0f} s")
    for found in points.values():  # what the rerun after each kill said first, in the killed stage's log
        if "log" in found:
            with open(found["log"], "rb") as handle:
                handle.seek(found["log_offset"])
                found["rerun_log"] = handle.read().decode(errors="replace")
    found_final: dict[str, Any] = {
        "result": final, "seconds": finished - started, "points": points, "spec_dir": spec_dir,
        "workdir": workdir, "run_dir": run_dir, "scratch": scratch,
        "leftovers": host_leftovers(spec_dir) + stray_processes(run_dir, workdir),
        "before": before, "after": {image: sha256(image) for image in sources},
    }
    if final.returncode == 0:
        found_final["outputs"] = outputs(workdir, project)
        found_final["tree"] = image_manifest(workdir, project / "mnt")
    return found_final


@pytest.mark.parametrize("point", POINTS, ids=[point.name for point in POINTS])
def test_killed_at_the_point_with_no_stamp_and_released_by_the_rerun(point: KillPoint, matrix: dict[str, Any]
                                                                     ) -> None:
    found = matrix["points"].get(point.name)
    assert found is not None, "not reached: an earlier point's rerun failed"
    assert "error" not in found, found.get("error")
    kill: Kill = found["kill"]
    if point.step is not None:
        assert kill.running, f"no process matching {point.step!r} was running at the kill"
    later = STAGES[STAGES.index(point.stage):]
    assert [name for stage in later for name in STAGE_FILES[stage] if found["files"][name]] == []
    earlier = STAGES[:STAGES.index(point.stage)]
    assert all(found["files"][name] for stage in earlier for name in STAGE_FILES[stage])
    assert found["left"], "the kill left nothing: the point is not inside the stage's work"
    released = [line for line in found["rerun_log"].splitlines() if RELEASED in line]
    assert released, f"the rerun did not release what the kill left: {found['left']}"


def test_the_last_rerun_finishes(matrix: dict[str, Any]) -> None:
    result: subprocess.CompletedProcess[str] = matrix["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_nothing_left_and_the_source_untouched(matrix: dict[str, Any]) -> None:
    assert matrix["leftovers"] == []
    assert matrix["before"] == matrix["after"]


def show_contents(paths: list[str], reference: Path, killed: Path, scratch: Path, limit: int = 12) -> str:
    """A unified diff of each small text file among `paths`, uninterrupted run against the killed one."""
    shown: list[str] = []
    images = {}
    for name, workdir in (("uninterrupted", reference), ("killed", killed)):
        images[name] = (DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text())), workdir)
    (want_plan, want_dir), (got_plan, got_dir) = images["uninterrupted"], images["killed"]
    with image_tree(want_dir / "disk.img", want_plan, scratch / "show-uninterrupted") as want_tree, \
            image_tree(got_dir / "disk.img", got_plan, scratch / "show-killed") as got_tree:
        for path in paths[:limit]:
            texts = []
            for tree in (want_tree, got_tree):
                file = tree / path.lstrip("/")
                if not file.is_file() or file.is_symlink() or file.stat().st_size > 256 * 1024:
                    break
                texts.append(file.read_bytes().decode(errors="replace").splitlines())
            if len(texts) == 2:
                diff = difflib.unified_diff(texts[0], texts[1], f"uninterrupted{path}", f"killed{path}", lineterm="")
                shown.extend(list(diff)[:30])
    return "\n".join(shown)


def receipt_differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Fix receipts compared key by key and step by step, timings left out."""
    found = [f"{key}: {want.get(key)!r} -> {got.get(key)!r}" for key in sorted(set(got) | set(want))
             if key != "steps" and got.get(key) != want.get(key)]
    for ours, theirs in zip(got["steps"], want["steps"], strict=True):
        found += [f"step {theirs['name']}: {key}: {theirs[key]!r} -> {ours[key]!r}"
                  for key in ("name", "status", "changes", "warnings", "commands") if ours[key] != theirs[key]]
    return found


def test_stage_outputs_equal_an_uninterrupted_run(matrix: dict[str, Any], reference: dict[str, Any]) -> None:
    assert "outputs" in matrix, "the last rerun failed"
    print(f"\nuninterrupted: {reference['seconds']:.0f} s; killed {len(matrix['points'])} times and rerun: "
          f"{matrix['seconds']:.0f} s")
    for name, want in reference["outputs"].items():
        if name != "fixed.stamp":
            assert matrix["outputs"][name] == want, name


def test_fix_receipt_equals_an_uninterrupted_run(matrix: dict[str, Any], reference: dict[str, Any]) -> None:
    assert "outputs" in matrix, "the last rerun failed"
    differences = receipt_differences(matrix["outputs"]["fixed.stamp"], reference["outputs"]["fixed.stamp"])
    assert differences == [], "\n".join(differences)


def test_image_tree_equals_an_uninterrupted_run(matrix: dict[str, Any], reference: dict[str, Any]) -> None:
    assert "tree" in matrix, "the last rerun failed"
    got, want = matrix["tree"], reference["tree"]
    differences = [f"{path}: only in the uninterrupted run" for path in sorted(set(want) - set(got))]
    differences += [f"{path}: only after the kills" for path in sorted(set(got) - set(want))]
    for path in sorted(set(got) & set(want)):
        fields = [key for key in want[path] if got[path][key] != want[path][key]
                  and compared(path, key)]
        if fields:
            differences.append(f"{path}: {', '.join(fields)}")
    if differences:
        shown = show_contents([path for path in sorted(set(got) & set(want))
                               if got[path] != want[path] and path not in TIMESTAMPED],
                              reference["workdir"], matrix["workdir"], matrix["scratch"])
        raise AssertionError("\n".join(differences[:80]) + "\n" + shown)


# A process chrooted into a directory: what a killed fix's chroot command is (Python is loaded before the
# chroot, so the empty directory does not matter).
CHROOTED = "import os, sys, time; os.chroot(sys.argv[1]); print('in', flush=True); time.sleep(600)"


def test_release_stale_ends_a_chroot_command_a_killed_run_left(tmp_path: Path) -> None:
    """A killed fix's chroot command runs in a process group of its own, which a SIGKILL of doit's
    group misses: the next stage of the host ends it before it unmounts anything."""
    run_dir = host_run_dir("orphan", tmp_path / "work")
    inside = run_dir / "target-abcdefgh"
    inside.mkdir(parents=True)
    try:
        orphan = subprocess.Popen([sys.executable, "-c", CHROOTED, str(inside)], process_group=0,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert orphan.stdout is not None and orphan.stdout.readline() == "in\n"
            name = Path(f"/proc/{orphan.pid}/comm").read_text().strip()
            assert release_stale(run_dir, []) == [f"process {name} ({orphan.pid})"]
            assert orphan.wait(timeout=10) == -signal.SIGKILL
        finally:
            orphan.kill()
            orphan.wait()
        assert release_stale(run_dir, []) == []
    finally:
        inside.rmdir()
        run_dir.rmdir()


def test_release_stale_does_not_kill_a_process_that_only_works_in_the_run_directory(tmp_path: Path) -> None:
    """Not chrooted, only there (an operator's shell, say): not p2v's to kill. It keeps the mounts busy,
    so the stage stops with one line that names it."""
    run_dir = host_run_dir("visitor", tmp_path / "work")
    inside = run_dir / "target-abcdefgh"
    inside.mkdir(parents=True)
    try:
        visitor = subprocess.Popen(["sleep", "600"], cwd=inside, process_group=0)
        try:
            with pytest.raises(P2VError, match=rf"keep its mounts busy: sleep \({visitor.pid}\)"):
                release_stale(run_dir, [])
            assert visitor.poll() is None
        finally:
            visitor.kill()
            visitor.wait()
    finally:
        inside.rmdir()
        run_dir.rmdir()


def test_release_stale_detaches_an_idle_loop_on_a_source_image_no_stage_reads(tmp_path: Path) -> None:
    """A run killed between `losetup` and its journal record leaves a loop on a source image that nothing
    names. The next stage of the host detaches it, unless a live stage (of another host: the host lock
    keeps two of one host apart) reads that image: then the loop may be that stage's."""
    image = tmp_path / "source.img"
    with image.open("wb") as handle:
        handle.truncate(8 * MiB)
    run_dir = host_run_dir("idle-loop", tmp_path / "work")
    loop = output(["losetup", "--find", "--show", "--read-only", str(image)])
    try:
        with source_in_use(image):
            assert release_stale(run_dir, [], source_images=[image]) == []
            assert loops_backed_by(image) == [loop]
        assert release_stale(run_dir, [], source_images=[image]) == [f"loop {loop}"]
        assert loops_backed_by(image) == []
    finally:
        if loops_backed_by(image):
            detach_loop(loop)


BOOT_POINT = KillPoint("verify-booting", "verify", log_line=r"\+ .*qemu-system-x86_64 ", settle=20.0,
                       step=r"qemu-system-x86_64 ")


@pytest.mark.skipif(os.environ.get("P2V_KILL_MATRIX_BOOT") != "1",
                    reason="boots the converted image under TCG twice (about 3 minutes): P2V_KILL_MATRIX_BOOT=1")
def test_verify_killed_while_the_guest_boots(matrix: dict[str, Any]) -> None:
    """The killed chain's image, verified: killed 20 s into the boot, then `doit verify:` again."""
    assert "outputs" in matrix, "the last rerun failed"
    workdir, run_dir, spec_dir = matrix["workdir"], matrix["run_dir"], matrix["spec_dir"]
    target = f"verify:{HOST}"
    kill = kill_at(BOOT_POINT, *doit_command(spec_dir, target), workdir=workdir, run_dir=run_dir,
                   scratch=matrix["scratch"])
    assert kill.running, "qemu was not running at the kill"
    assert not (workdir / "verified.stamp").exists()
    left = host_leftovers(spec_dir) + stray_processes(run_dir, workdir)
    print(f"\nverify killed after {kill.seconds:.0f} s; left: {left}")
    log_path = workdir / "logs" / "verify.log"
    offset = log_path.stat().st_size
    started = time.monotonic()
    rerun = doit(spec_dir, target)
    print(f"verify rerun: {time.monotonic() - started:.0f} s")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        assert RELEASED in handle.read().decode(errors="replace") or not left
    assert host_leftovers(spec_dir) + stray_processes(run_dir, workdir) == []
