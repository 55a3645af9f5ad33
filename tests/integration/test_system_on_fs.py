"""describe_system on real filesystems: each synthetic tree written onto a loop-mounted
ext4 or xfs (with the features the source's own kernel would have), remounted
read-only, gives the same description as the tree in a plain directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib.resources import LoopDevice, loop_device, mounted, read_only_mount_options
from tasks.lib.runner import run
from tasks.lib.system import describe_system
from tests.fixtures.synthetic import SYNTHETIC_TREES, write_tree

MiB = 1024 * 1024

# fstype, mkfs options: what the source server's kernel can mount
FILESYSTEMS: dict[str, tuple[str, list[str]]] = {
    "centos6": ("ext4", ["-O", "^metadata_csum,^64bit"]),
    "centos7": ("xfs", ["-m", "reflink=0,bigtime=0,inobtcount=0"]),
    "rhel9-nm": ("xfs", []),
    "ubuntu-netplan": ("ext4", []),
    "debian12-ifupdown": ("ext4", []),
}


def _make_filesystem(image: Path, fstype: str, options: list[str]) -> None:
    with open(image, "wb") as f:
        f.truncate(512 * MiB if fstype == "xfs" else 64 * MiB)  # sparse; mkfs.xfs wants >= 300 MB
    if fstype == "xfs":
        run(["mkfs.xfs", "-q", "-f", *options, str(image)])
    else:
        run(["mkfs.ext4", "-q", "-F", *options, str(image)])


@contextlib.contextmanager
def _loop(image: Path, *, read_only: bool) -> Iterator[LoopDevice]:
    """loop_device, minus a leftover: its `blockdev --setro` stays on /dev/loopN after
    detach, and the next read-write attach of that loopN would be read-only."""
    path = None
    try:
        with loop_device(image, read_only=read_only) as loop:
            path = loop.path
            if not read_only:
                run(["blockdev", "--setrw", path])
            yield loop
    finally:
        if read_only and path:
            run(["blockdev", "--setrw", path], check=False)


def _attached(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout


def _is_mounted(point: Path) -> bool:
    return subprocess.run(["findmnt", "--mountpoint", str(point)], capture_output=True).returncode == 0


def test_filesystem_table_covers_every_tree():
    assert set(FILESYSTEMS) == set(SYNTHETIC_TREES)


@pytest.mark.parametrize("name", SYNTHETIC_TREES)
def test_same_description_on_a_read_only_mount(name: str, tmp_path: Path) -> None:
    fstype, options = FILESYSTEMS[name]
    plain = tmp_path / "plain"
    write_tree(name, plain)
    expected = describe_system(plain)

    image = tmp_path / "disk.img"
    point = tmp_path / "mnt"
    point.mkdir()
    _make_filesystem(image, fstype, options)
    try:
        with _loop(image, read_only=False) as loop, mounted(loop.path, point, fstype=fstype):
            write_tree(name, point)
        with (
            _loop(image, read_only=True) as loop,
            mounted(loop.path, point, fstype=fstype, options=read_only_mount_options(fstype)),
        ):
            with pytest.raises(OSError):
                (point / "probe").write_text("x")  # really read-only
            actual = describe_system(point)
    finally:
        assert not _is_mounted(point)
        assert _attached(image) == ""

    assert actual == expected
    assert actual.warnings == ()
    if name == "centos6":
        features = run(["dumpe2fs", "-h", str(image)]).stdout
        assert "metadata_csum" not in features and " 64bit" not in features


def test_nothing_stays_attached_or_mounted_after_a_failure(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    point = tmp_path / "mnt"
    point.mkdir()
    _make_filesystem(image, "ext4", [])
    with _loop(image, read_only=False) as loop, mounted(loop.path, point, fstype="ext4"):
        write_tree("centos6", point)
    with pytest.raises(RuntimeError, match="boom"):
        with (
            _loop(image, read_only=True) as loop,
            mounted(loop.path, point, fstype="ext4", options=read_only_mount_options("ext4")),
        ):
            assert describe_system(point).os.id == "centos"
            raise RuntimeError("boom")
    assert not _is_mounted(point)
    assert _attached(image) == ""
    assert os.listdir(point) == []
