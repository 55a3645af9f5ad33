"""A rerun of copy_tree with a seal: unchanged trees take the fast path, any change the full one.

And the sync stage's own seal (tasks/sync.py), end to end through doit.

The source is a small ext4 image written by the test (so the test can change
it), the target an xfs image; both are unmounted and mounted again between
runs, as two runs of the sync stage would do, so the seal has to hold across
mounts (inode numbers and ctimes are on disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.trees import make_filesystem
from tasks.lib.copy import CopyResult, copy_tree
from tasks.lib.plan import DiskPlan
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import run
from tasks.lib.spec import PROJECT_DIR
from tests.fixtures.build import build_server
from tests.integration.test_inspect import host_leftovers, make_spec
from tests.integration.test_sync import image_tree

MIB = 1 << 20
CHANGED = "etc/config.conf"  # the file the nasty test rewrites


def fill_source(root: Path) -> None:
    (root / "etc").mkdir()
    (root / CHANGED).write_bytes(b"setting = 1\n" * 100)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.link(root / "etc" / "passwd", root / "etc" / "passwd.hardlink")
    os.symlink("passwd", root / "etc" / "passwd.symlink")
    os.setxattr(root / "etc" / "passwd", "user.origin", b"physical")
    (root / "usr" / "lib").mkdir(parents=True)
    for number in range(200):
        (root / "usr" / "lib" / f"lib{number}.so").write_bytes(os.urandom(number * 37))
    with open(root / "usr" / "sparse.img", "wb") as handle:
        handle.truncate(8 * MIB)
        handle.seek(4 * MIB)
        handle.write(b"data")
    for pseudo in ("proc", "sys", "dev", "run", "tmp"):
        (root / pseudo).mkdir()
    (root / "tmp" / "scratch").write_text("left behind")


@contextlib.contextmanager
def mounted_image(image: Path, fstype: str, point: Path) -> Iterator[Path]:
    point.mkdir(parents=True, exist_ok=True)
    with loop_device(image, read_only=False, direct_io=True) as loop, mounted(loop.path, point, fstype=fstype):
        yield point


class Trees:
    """The source and target images of one test, mounted afresh for each run."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.source_image = scratch / "source.img"
        self.target_image = scratch / "target.img"
        self.seal = scratch / "work" / "sync-seal.json"
        self.runs = 0
        make_filesystem(self.source_image, "ext4", 256 * MIB)
        make_filesystem(self.target_image, "xfs", 320 * MIB)
        with self.mounted() as (source, _target):
            fill_source(source)

    @contextlib.contextmanager
    def mounted(self) -> Iterator[tuple[Path, Path]]:
        self.runs += 1
        with mounted_image(self.source_image, "ext4", self.scratch / f"source-{self.runs}") as source, \
                mounted_image(self.target_image, "xfs", self.scratch / f"target-{self.runs}") as target:
            yield source, target

    def copy(self, **options: object) -> CopyResult:
        with self.mounted() as (source, target):
            return copy_tree(source, target, ["/"], log_file=self.scratch / f"copy-{self.runs}.log",
                             seal=self.seal, **options)  # type: ignore[arg-type]

    def log(self) -> str:
        return (self.scratch / f"copy-{self.runs}.log").read_text()


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[Trees]:
    yield Trees(tmp_path)
    attached = [line for line in run(["losetup", "-a"]).stdout.splitlines() if str(tmp_path) in line]
    mounts = [line for line in run(["findmnt", "-rn", "-o", "TARGET"]).stdout.splitlines()
              if line.startswith(str(tmp_path))]
    assert attached == [] and mounts == []


def test_unchanged_trees_take_the_fast_path(trees: Trees) -> None:
    first = trees.copy()
    assert first.verified_by == "manifests" and first.sealed == "written" and not first.fast_path
    seal = json.loads(trees.seal.read_text())
    assert seal["manifest_digest"] == first.manifest_digest

    again = trees.copy()
    receipt = again.receipt()
    assert again.fast_path and receipt["fast_path"] is True and receipt["verified_by"] == "seal"
    assert receipt["verified"] is True and receipt["manifest_digest"] == first.manifest_digest
    assert receipt["files"] == first.files and receipt["bytes"] == first.bytes
    assert receipt["bytes_transferred"] == 0
    assert "holds: every listing unchanged" in trees.log()
    assert "+ rsync" not in trees.log() and "verify:" not in trees.log()
    assert trees.copy().fast_path  # the fast path leaves the seal valid


def test_same_size_change_with_restored_mtime_is_copied(trees: Trees) -> None:
    """The nasty case: rsync's quick check (size, mtime) cannot see it; ctime does."""
    trees.copy()
    with trees.mounted() as (source, _target):
        changed = source / CHANGED
        before = changed.stat()
        changed.write_bytes(b"setting = 2\n" * 100)  # same size
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = changed.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        assert after.st_ctime_ns != before.st_ctime_ns

    again = trees.copy()
    assert not again.fast_path and again.verified_by == "manifests" and again.sealed == "written"
    assert "changed since: source /" in trees.log()
    assert "repaired 1 entries" in trees.log()  # rsync skipped it; verification caught it; copied again
    with trees.mounted() as (_source, target):
        assert (target / CHANGED).read_bytes() == b"setting = 2\n" * 100
    assert trees.copy().fast_path


def test_target_changed_after_the_copy_is_detected(trees: Trees) -> None:
    first = trees.copy()
    with trees.mounted() as (_source, target):
        os.chmod(target / "etc" / "passwd", 0o666)
        (target / "usr" / "lib" / "intruder").write_text("not from the source")

    again = trees.copy()
    assert not again.fast_path and again.verified_by == "manifests"
    assert again.manifest_digest == first.manifest_digest  # the target is the source's copy again
    assert "changed since: target /" in trees.log()
    with trees.mounted() as (_source, target):
        assert (target / "etc" / "passwd").stat().st_mode & 0o777 == 0o644
        assert not (target / "usr" / "lib" / "intruder").exists()


def test_seal_is_only_for_the_same_scope_and_a_verified_copy(trees: Trees) -> None:
    trees.copy()
    other = trees.copy(exclude_contents=["/usr/lib"])
    assert not other.fast_path and "covers other filesystems or exclusions" in trees.log()
    unverified = trees.copy(verify=False)
    assert unverified.sealed == "not written: the copy was not verified" and not trees.seal.exists()
    assert not trees.copy().fast_path  # no seal left: the full path again


# ---------------------------------------------------------------- the sync stage's own seal


def doit(spec_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2V_SPECS": str(spec_dir)}
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, check=False, timeout=1200)


def test_sync_stage_reruns_by_seal_and_sees_changes(tmp_path: Path) -> None:
    """doit sync, forced again: stage seal; disk.img touched: copy seal; source written: full copy."""
    server = build_server("plain-bookworm")
    disks = []
    for disk in server.disks:  # our own copies: this test writes to the source
        disks.append(tmp_path / disk.name)
        run(["cp", "--sparse=always", str(disk), str(disks[-1])])
    spec_dir = make_spec(tmp_path, server.name, disks)
    workdir = tmp_path / "work" / server.name

    def sync_again() -> dict[str, Any]:
        assert doit(spec_dir, "forget", f"sync:{server.name}").returncode == 0
        done = doit(spec_dir, f"sync:{server.name}")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        receipt: dict[str, Any] = json.loads((workdir / "rootfs-synced.stamp").read_text())["copy"]
        return receipt

    first = doit(spec_dir, f"sync:{server.name}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    digest = json.loads((workdir / "rootfs-synced.stamp").read_text())["copy"]["manifest_digest"]
    assert (workdir / ".p2v" / "sync-stage-seal.json").exists()

    quick = sync_again()
    assert quick["verified_by"] == "stage seal" and quick["fast_path"] and quick["manifest_digest"] == digest
    assert quick["duration_seconds"] < 2

    os.utime(workdir / "disk.img")  # as any write through a loop device would: the image may have changed
    listed = sync_again()
    assert listed["verified_by"] == "seal" and listed["manifest_digest"] == digest  # the trees say it did not
    assert sync_again()["verified_by"] == "stage seal"  # and the stage seal is back

    # The nasty change, on the source: same size, mtime put back; a read-write mount is what gives it away here.
    (tmp_path / "source").mkdir()
    with loop_device(disks[0], read_only=False, partitions=True) as loop, \
            mounted(loop.partition(2), tmp_path / "source", fstype="ext4") as root:
        hostname = root / "etc" / "hostname"
        before = hostname.stat()
        text = hostname.read_bytes()
        changed = text.upper() if text.upper() != text else text[::-1]
        hostname.write_bytes(changed)
        os.utime(hostname, ns=(before.st_atime_ns, before.st_mtime_ns))
    full = sync_again()
    assert full["verified_by"] == "manifests" and not full["fast_path"]
    assert full["manifest_digest"] != digest
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    with image_tree(workdir / "disk.img", plan, tmp_path / "image") as tree:
        assert (tree / "etc" / "hostname").read_bytes() == changed
    assert host_leftovers(spec_dir) == []
