"""The used-block fast path (tasks/lib/copy/blocks.py) on real loop devices and filesystems.

A small source server (an ext4 / with /boot mounted inside it, or an xfs /) is made into a
target partition by its blocks, grown, shrunk in place (the last partition of a GPT disk) or in
a scratch copy (a partition with another after it), or left alone when resize2fs says it cannot
shrink that far; then the copy engine copies the rest and verifies the whole tree by its
manifest, exactly as the sync stage does. The source images' sha256 never changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.trees import block_plan
from tasks.lib import storage, unwind
from tasks.lib.copy import ALWAYS_EXCLUDED, blocks, copy_tree
from tasks.lib.copy.blocks import BlockCopyFailed, BlockJob, BlockOutcome, fill_by_blocks, unused_inode_table_runs
from tasks.lib.planning.model import CopyPlan, DiskPlan, PartitionPlan
from tasks.lib.resources import host_run_dir, loop_device, mounted
from tasks.lib.runner import run
from tests.fixtures.build import build_server
from tests.fixtures.cache import sha256
from tests.integration.test_inspect import doit, host_leftovers, make_spec, own_images
from tests.killpoints import Gate, KillPoint, doit_command, kill_at

MiB = 1 << 20
ROOT_SIZE = 256 * MiB
SWAP_FILE = "/swapfile"
IMMUTABLE = "/etc/locked.conf"
SWAP_BYTES = os.urandom(8 * MiB)


def mkfs(path: Path, size: int, *argv: str) -> None:
    path.unlink(missing_ok=True)
    path.touch()
    os.truncate(path, size)
    run([*argv, str(path)])


def fill_root(root: Path) -> None:
    """What a file copy and a block copy must agree on, and what a file copy leaves behind."""
    (root / "etc").mkdir()
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / IMMUTABLE.lstrip("/")).write_text("locked\n")
    os.link(root / "etc/hosts", root / "etc/hosts.hardlink")
    run(["setfattr", "-n", "user.p2v", "-v", "kept", str(root / "etc/hosts")])
    run(["setfacl", "-m", "u:1234:r", str(root / "etc/hosts")])
    with open(root / "sparse", "wb") as handle:
        handle.truncate(64 * MiB)
        handle.seek(32 * MiB)
        handle.write(b"middle")
    os.mkfifo(root / "fifo")
    data = root / "data"
    data.mkdir()
    for number in range(400):
        (data / f"file-{number}").write_bytes(os.urandom(number * 97 % 65536))
    (root / "big").write_bytes(os.urandom(24 * MiB))
    for directory in ALWAYS_EXCLUDED:
        (root / directory.lstrip("/")).mkdir()
    (root / "tmp/left-behind").write_text("a file copy does not copy /tmp's contents\n")
    (root / "run/also-left").mkdir()
    (root / "boot").mkdir()
    (root / "boot/hidden-under-the-mount").write_text("/boot's own filesystem hides this\n")
    (root / SWAP_FILE.lstrip("/")).write_bytes(SWAP_BYTES)  # allocated, as swapon wants a swap file
    run(["chattr", "+i", str(root / IMMUTABLE.lstrip("/"))])
    # Kept from writes while nothing is mounted there: hidden under /boot's filesystem, unseen by a file copy.
    run(["chattr", "+i", str(root / "boot")])


@contextlib.contextmanager
def source_server(directory: Path, fstype: str = "ext4", mkfs_options: tuple[str, ...] = ()
                  ) -> Iterator[dict[str, Any]]:
    """root.img (ext4 or xfs, with /boot's mount point) and boot.img (ext4), filled once, then attached read-only."""
    directory.mkdir(parents=True, exist_ok=True)
    root_img, boot_img = directory / "root.img", directory / "boot.img"
    size = max(ROOT_SIZE, 320 * MiB) if fstype == "xfs" else ROOT_SIZE
    mkfs(root_img, size, *(["mkfs.xfs", "-q", "-f", *mkfs_options] if fstype == "xfs" else
                           ["mkfs.ext4", "-q", "-F", *mkfs_options]))
    mkfs(boot_img, 32 * MiB, "mkfs.ext4", "-q", "-F")
    point = directory / "fill"
    point.mkdir(exist_ok=True)
    with loop_device(root_img, read_only=False) as loop, mounted(loop.path, point, fstype=fstype):
        fill_root(point)
    with loop_device(boot_img, read_only=False) as loop, mounted(loop.path, point, fstype="ext4"):
        (point / "vmlinuz").write_bytes(os.urandom(3 * MiB))
    tree = directory / "tree"
    tree.mkdir(exist_ok=True)
    before = {image: sha256(image) for image in (root_img, boot_img)}
    with loop_device(root_img, read_only=True) as root, loop_device(boot_img, read_only=True) as boot, \
            mounted(root.path, tree, fstype=fstype, options=["ro", "nouuid"] if fstype == "xfs" else ["ro"]), \
            mounted(boot.path, tree / "boot", fstype="ext4", options=["ro"]):
        yield {"tree": tree, "node": root.path, "fstype": fstype, "size": size, "before": before}
    assert before == {image: sha256(image) for image in (root_img, boot_img)}, "a source image changed"


def target_disk(path: Path, sizes: list[int], label: str = "gpt") -> list[PartitionPlan]:
    """disk.img with one partition per size (1 MiB aligned), each with an empty ext4 as the disk stage makes it."""
    start = MiB
    parts = []
    for number, size in enumerate(sizes, start=1):
        parts.append((number, start, size))
        start += size
    path.touch()
    os.truncate(path, start + MiB)
    table = "".join(f"start={s // 512}, size={z // 512}, type=linux\n" for _, s, z in parts)
    run(["sfdisk", "--quiet", str(path)], input=f"label: {label}\n{table}")
    return [PartitionPlan(number=n, start=s, size=z, role="filesystem", kind="primary", type_id="83", flags=())
            for n, s, z in parts]


def fill(source: dict[str, Any], image: Path, part: PartitionPlan, copy: CopyPlan, node: str, scratch: Path,
         *, last: bool) -> BlockOutcome:
    return fill_by_blocks(BlockJob(
        copy=copy, partition=part, source_node=source["node"], target_node=node, scratch=scratch / "scratch",
        run_dir=scratch / "run", image=image, in_place=last, disk_size=image.stat().st_size, table="gpt",
        excluded=tuple(ALWAYS_EXCLUDED),
        omitted=(SWAP_FILE,), hidden=("/boot",), source_view=source["tree"]), scratch / "sync-copy.log")


def copy_the_rest(source: dict[str, Any], node: str, outcome: BlockOutcome, scratch: Path) -> dict[str, Any]:
    """The copy engine after the block copy: /boot by files into the new /, the whole tree verified."""
    target = scratch / "target"
    target.mkdir(exist_ok=True)
    with mounted(node, target, fstype=source["fstype"], options=["nouuid"] if source["fstype"] == "xfs" else []):
        result = copy_tree(source["tree"], target, ["/", "/boot"], log_file=scratch / "sync-copy.log",
                           swap_files=[SWAP_FILE], prefilled={"/": outcome.pass_result()}, defer_flags=0)
        seen = {
            "tmp": sorted(os.listdir(target / "tmp")), "run": sorted(os.listdir(target / "run")),
            "hidden": (target / "boot/hidden-under-the-mount").exists(), "swap": (target / "swapfile").exists(),
            "tmp_mtime": (target / "tmp").stat().st_mtime_ns, "size": filesystem_size(node, source["fstype"]),
        }
    return {"result": result, **seen}


def filesystem_size(node: str, fstype: str) -> int:
    if fstype == "xfs":
        text = run(["xfs_db", "-r", "-c", "sb 0", "-c", "print blocksize dblocks", node]).stdout
        values = dict(line.replace(" ", "").split("=") for line in text.splitlines() if "=" in line)
        return int(values["blocksize"]) * int(values["dblocks"])
    fields = storage.tune2fs_fields(node)
    return int(fields["Block count"]) * int(fields["Block size"])


def uuid_of(node: str) -> str:
    return storage.probe(node)["UUID"]


@pytest.mark.parametrize("case", ["grow", "shrink-in-place", "shrink-in-scratch"])
def test_ext4_by_blocks_is_verified_like_a_file_copy(case: str, tmp_path: Path) -> None:
    # 112 MiB of the source's 256: the shrink moves inodes (and the journal) out of the groups it drops.
    sizes = {"grow": [400 * MiB], "shrink-in-place": [8 * MiB, 112 * MiB],
             "shrink-in-scratch": [200 * MiB, 32 * MiB]}[case]
    image = tmp_path / "disk.img"
    parts = target_disk(image, sizes)
    index = 0 if case != "shrink-in-place" else 1
    with source_server(tmp_path / "source") as source, \
            loop_device(image, read_only=False, partitions=True) as loop:
        for part in parts:
            run(["mkfs.ext4", "-q", "-F", "-L", f"p{part.number}", loop.partition(part.number)])
        neighbour = None
        if case == "shrink-in-scratch":  # the next partition holds something the copy must not touch
            (tmp_path / "n").mkdir()
            with mounted(loop.partition(2), tmp_path / "n", fstype="ext4"):
                (tmp_path / "n" / "marker").write_text("p2's own\n")
            neighbour = sha256_of_range(image, parts[1])
        tail = (image.read_bytes()[parts[-1].end:])
        node = loop.partition(parts[index].number)
        planned_uuid = uuid_of(node)
        part, copy = block_plan(parts[index], source["node"], source["fstype"], planned_uuid,
                                resize="grow" if case == "grow" else "shrink")
        source_tmp_mtime = (source["tree"] / "tmp").stat().st_mtime_ns
        outcome = fill(source, image, part, copy, node, tmp_path, last=case == "shrink-in-place")
        assert outcome.fallback is None and outcome.tool == "e2image"
        assert outcome.resize == {"grow": "grow", "shrink-in-place": "shrink in place",
                                  "shrink-in-scratch": "shrink in a scratch copy"}[case]
        assert outcome.removed >= 4  # /tmp's file, /run's directory, the swap file, what /boot's mount hid
        assert_released(outcome, image)
        assert_unused_inode_tables_are_holes(node, image, part)
        if case == "shrink-in-place":  # what the shrink moved: the directories' times are the source's again
            assert "directories set back to the source's mtime" in (tmp_path / "sync-copy.log").read_text()
        assert (uuid_of(node), storage.probe(node)["LABEL"]) == (planned_uuid, "root")
        rest = copy_the_rest(source, node, outcome, tmp_path)
    assert rest["result"].verified_by == "manifests", rest["result"]
    root_pass = rest["result"].passes[0]
    assert (root_pass.tool, root_pass.swap_files) == ("e2image", (SWAP_FILE,)) and "/tmp" in root_pass.excluded_contents
    assert (rest["tmp"], rest["run"], rest["hidden"], rest["swap"]) == ([], [], False, False)
    assert rest["tmp_mtime"] == source_tmp_mtime  # the emptied directory has its time back
    assert part.size - 4 * MiB <= rest["size"] <= part.size  # grown or shrunk to the partition
    assert image.stat().st_size == parts[-1].end + MiB
    assert image.read_bytes()[parts[-1].end:] == tail  # the backup GPT is where it was
    run(["sfdisk", "--verify", str(image)])
    if neighbour is not None:
        assert sha256_of_range(image, parts[1]) == neighbour
    log = (tmp_path / "sync-copy.log").read_text()
    assert "+ e2image -ra -p" in log and "removed /tmp/left-behind (a file copy leaves it behind)" in log
    assert "cleared inode flags i on /boot (its contents go" in log  # then /boot by files, verified above


def assert_released(outcome: BlockOutcome, image: Path) -> None:
    """The removed swap file's blocks were discarded: disk.img gave them back and holds none of its bytes."""
    assert outcome.trim_failed is None and outcome.released >= len(SWAP_BYTES), outcome
    with image.open("rb") as handle:
        while chunk := handle.read(64 * MiB):
            assert SWAP_BYTES[:4096] not in chunk, "the removed swap file's bytes are still in disk.img"


def assert_unused_inode_tables_are_holes(node: str, image: Path, part: PartitionPlan) -> None:
    """The inode table blocks that hold no inode yet (itable_unused) take no room in disk.img."""
    runs = unused_inode_table_runs(run(["dumpe2fs", node]).stdout)
    block_size = int(storage.tune2fs_fields(node)["Block size"])
    assert runs, "the test's filesystem has groups with unused inodes"
    fd = os.open(image, os.O_RDONLY)
    try:
        for start, count in runs:
            offset, end = part.start + start * block_size, part.start + (start + count) * block_size
            allocated, at = 0, offset
            while at < end:
                try:
                    data = os.lseek(fd, at, os.SEEK_DATA)
                except OSError:  # ENXIO: nothing but holes from there on
                    break
                if data >= end:
                    break
                at = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                allocated += at - data
            # disk.img's own filesystem frees whole 4 KiB blocks: a run of 1 KiB blocks keeps its unaligned ends.
            assert allocated <= 2 * (4096 - block_size), f"inode table blocks {start}+{count}: {allocated} B allocated"
    finally:
        os.close(fd)


def sha256_of_range(image: Path, part: PartitionPlan) -> str:
    with image.open("rb") as handle:
        handle.seek(part.start)
        return hashlib.sha256(handle.read(part.size)).hexdigest()


def test_a_partition_too_small_to_shrink_into_is_left_alone_and_said(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    (part,) = target_disk(image, [40 * MiB])
    with source_server(tmp_path / "source") as source, \
            loop_device(image, read_only=False, partitions=True) as loop:
        node = loop.partition(1)
        run(["mkfs.ext4", "-q", "-F", "-L", "made", node])
        made = uuid_of(node)
        part, copy = block_plan(part, source["node"], source["fstype"], made, resize="shrink")
        outcome = fill(source, image, part, copy, node, tmp_path, last=True)
        assert outcome.fallback is not None and outcome.fallback.startswith("resize2fs -P says it shrinks to ")
        assert (uuid_of(node), storage.probe(node)["LABEL"]) == (made, "made")  # as the disk stage left it
    assert "e2image -ra" not in (tmp_path / "sync-copy.log").read_text()


def test_xfs_by_blocks_keeps_its_uuid_grows_and_is_verified(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    (part,) = target_disk(image, [480 * MiB])
    with source_server(tmp_path / "source", "xfs") as source, \
            loop_device(image, read_only=False, partitions=True) as loop:
        node = loop.partition(1)
        uuid = uuid_of(source["node"])
        part, copy = block_plan(part, source["node"], source["fstype"], uuid, keep_uuid=True)
        outcome = fill(source, image, part, copy, node, tmp_path, last=True)
        assert outcome.fallback is None and outcome.tool == "xfs_copy"
        assert uuid_of(node) == uuid and storage.probe(node)["LABEL"] == "root"
        meta = run(["xfs_db", "-r", "-c", "version", node]).stdout
        assert "META_UUID" not in meta  # no feature the plan did not carry
        assert_released(outcome, image)
        rest = copy_the_rest(source, node, outcome, tmp_path)
    assert rest["result"].verified_by == "manifests"
    assert (rest["tmp"], rest["hidden"], rest["swap"]) == ([], False, False)
    assert part.size - 4 * MiB <= rest["size"] <= part.size  # xfs_growfs took it to the partition


def test_the_receipt_of_a_block_copy_round_trips() -> None:
    outcome = BlockOutcome("/", "e2image", "grow", 1.5, 123, removed=2, released=4096)
    assert json.loads(json.dumps(outcome.receipt())) == {
        "mountpoint": "/", "tool": "e2image", "resize": "grow", "seconds": 1.5, "bytes_written": 123, "removed": 2,
        "released": 4096, "trim_failed": None, "fallback": None}


KILLED_HOST = "blocks-killed"
# Inside e2image writing the source's / past the end of its (last) partition: disk.img is longer than planned.
# The real e2image is stopped once it has written 64 MiB of the ~750 it copies, whatever the machine's load.
IN_E2IMAGE = KillPoint("blocks-e2image", "sync",
                       gates=(Gate("e2image", "-ra -p /dev/loop* /dev/loop*", stop_after_writing=64 * MiB),),
                       step=r"^\S*/sbin/e2image -ra ")


def test_a_sync_killed_inside_the_block_copy_is_finished_by_its_rerun(tmp_path: Path) -> None:
    """SIGKILL in the middle of e2image (disk.img extended, the partition half written, the backup GPT gone):
    the rerun releases what the run left, copies by blocks again, cuts disk.img back and verifies."""
    server = build_server("plain-bullseye")
    images = own_images(server.disks, tmp_path)
    before = {image: sha256(image) for image in images}
    spec_dir = make_spec(tmp_path, KILLED_HOST, images, extra="target:\n  copy: blocks\n  label: gpt\n")
    workdir = tmp_path / "work" / KILLED_HOST
    assert doit(spec_dir, f"disk:{KILLED_HOST}").returncode == 0
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    root = plan.copy_of("/")
    assert (root.method, root.resize) == ("blocks", "shrink")
    assert plan.partition_of("/").end == max(p.end for p in plan.partitions)  # in place

    run_dir = host_run_dir(KILLED_HOST, workdir)
    try:
        kill = kill_at(IN_E2IMAGE, *doit_command(spec_dir, f"sync:{KILLED_HOST}"), workdir=workdir,
                       run_dir=run_dir, scratch=tmp_path)
        assert kill.running, "e2image was not running at the kill"
        assert not (workdir / "rootfs-synced.stamp").exists()
        assert (workdir / "disk.img").stat().st_size > plan.size  # the kill came while the copy ran past the end

        rerun = doit(spec_dir, f"sync:{KILLED_HOST}")
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    finally:
        unwind.undo_journal(run_dir)  # what the kill left, where an assertion came before a finished rerun
    assert "released what an interrupted run left" in rerun.stdout + rerun.stderr
    copied = json.loads((workdir / "rootfs-synced.stamp").read_text())["copy"]
    assert copied["verified_by"] == "manifests"
    assert [(m["mountpoint"], m["method"]) for m in copied["methods"]] == [
        ("/", "blocks"), ("/boot", "files"), ("/srv", "files")]
    assert (workdir / "disk.img").stat().st_size == plan.size
    run(["sfdisk", "--verify", str(workdir / "disk.img")])
    assert host_leftovers(spec_dir) == []
    assert before == {image: sha256(image) for image in images}


def test_an_entry_that_cannot_be_removed_stops_the_copy_with_one_line(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "fs"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp/left").write_text("x\n")

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with blocks._Logged(tmp_path / "copy.log") as logged, pytest.raises(BlockCopyFailed) as raised:
        blocks._remove(root / "tmp/left", root, logged)
    assert str(raised.value).startswith("the block copy cannot remove /tmp/left, which a file copy leaves behind")
    assert "target.copy: files" in (raised.value.hint or "")
