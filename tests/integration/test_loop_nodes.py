"""Loop partition nodes and detaching, as two conversions side by side meet them.

Real loop devices and device nodes: this machine has no udev, so p2v makes /dev/loopNpM itself.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from tasks.lib.resources import (
    _drop_partition_nodes,
    _kernel_partitions,
    _make_node,
    _sync_partition_nodes,
    loop_device,
)
from tasks.lib.runner import P2VError, output, run

MiB = 1 << 20
# Three primaries; then the layout of an old installer (plain-bullseye): / and swap logical in an extended
# partition, so that the old partition 2 is a window onto the middle of the new extended one.
PRIMARIES = "label: dos\n,10M\n,10M\n,10M\n"


def with_logicals(device: str) -> str:
    """In sectors: 1 at 2048, the extended 2 at 12288 (inside the old 2 at 22528), 5 and 6 logical in it."""
    return (f"label: dos\n{device}p1 : start=2048, size=10240, type=83\n"
            f"{device}p2 : start=12288, size=81920, type=5\n"
            f"{device}p5 : start=14336, size=24576, type=83\n{device}p6 : start=40960, size=24576, type=82\n")


def test_a_stale_node_with_another_partitions_number_is_replaced(tmp_path: Path) -> None:
    # The node a detached loop left, whose minor the kernel has since given to another partition.
    node = tmp_path / "loop99p1"
    os.mknod(node, 0o660 | stat.S_IFBLK, os.makedev(259, 250))
    sysdev = tmp_path / "dev"
    sysdev.write_text("259:7\n")
    _make_node(str(node), sysdev)
    assert stat.S_ISBLK(node.stat().st_mode)
    assert node.stat().st_rdev == os.makedev(259, 7)


def test_a_node_that_already_matches_is_kept(tmp_path: Path) -> None:
    node = tmp_path / "loop99p1"
    os.mknod(node, 0o660 | stat.S_IFBLK, os.makedev(259, 7))
    inode = node.stat().st_ino
    sysdev = tmp_path / "dev"
    sysdev.write_text("259:7\n")
    _make_node(str(node), sysdev)
    assert node.stat().st_ino == inode


def test_the_partition_nodes_of_a_reused_loop_device_read_its_own_partitions(tmp_path: Path) -> None:
    images = []
    for name, label in (("a.img", "first"), ("b.img", "second")):
        image = tmp_path / name
        with image.open("wb") as handle:
            handle.truncate(64 * 1024 * 1024)
        run(["sfdisk", "--quiet", str(image)], input="label: dos\n,,L\n")
        images.append((image, label))
    with loop_device(images[0][0], read_only=False, partitions=True) as loop:
        run(["mkfs.ext4", "-q", "-L", images[0][1], loop.partition(1)])
        used = loop.path
    # Spoil the node name the next attach of that device will use, as a stale node would.
    os.mknod(f"{used}p1", 0o660 | stat.S_IFBLK, os.makedev(259, 250))
    with loop_device(images[1][0], read_only=False, partitions=True) as loop:
        run(["mkfs.ext4", "-q", "-L", images[1][1], loop.partition(1)])
        with_own = os.stat(loop.partition(1)).st_rdev
        sysfs = Path(f"/sys/class/block/{os.path.basename(loop.partition(1))}/dev").read_text().split(":")
        assert with_own == os.makedev(int(sysfs[0]), int(sysfs[1]))
        assert output(["blkid", "-o", "value", "-s", "LABEL", loop.partition(1)]) == images[1][1]


def test_detach_waits_for_a_probe_that_holds_the_device_open(tmp_path: Path) -> None:
    image = tmp_path / "held.img"
    with image.open("wb") as handle:
        handle.truncate(16 * 1024 * 1024)
    with loop_device(image, read_only=True) as loop:
        # Another process's probe: it holds the device for a moment after the detach.
        holder = os.open(loop.path, os.O_RDONLY)
        threading.Timer(0.5, os.close, (holder,)).start()
        started = time.monotonic()
    assert time.monotonic() - started >= 0.4
    assert str(image) not in output(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"])


def _image(path: Path, table: str) -> Path:
    with path.open("wb") as handle:
        handle.truncate(64 * MiB)
    run(["sfdisk", "--quiet", "--no-reread", str(path)], input=table)
    return path


def _sectors(loop: str) -> dict[int, tuple[int, int]]:
    return {nr: (extent.start, extent.sectors) for nr, extent in _kernel_partitions(loop).items()}


def test_partitions_an_earlier_table_left_registered_are_replaced_by_the_tables_own(tmp_path: Path) -> None:
    """A partition open when its loop device was detached stays registered there with its old extent (seen
    after a SIGKILLed e2image still held a source partition): the next file on the device must not see it."""
    image = _image(tmp_path / "reused.img", PRIMARIES)
    with loop_device(image, read_only=False, partitions=True) as loop:
        old = _sectors(loop.path)
        assert sorted(old) == [1, 2, 3]
        # The new table, written past the registered partitions: they are now what an earlier user left.
        run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", loop.path], input=with_logicals(loop.path))
        assert _sectors(loop.path) == old
        _sync_partition_nodes(loop.path)
        registered = _sectors(loop.path)
        assert sorted(registered) == [1, 2, 5, 6]
        table = output(["partx", "-g", "-o", "NR,START", loop.path]).split()
        assert {nr: start for nr, (start, _) in registered.items()} == dict(
            (int(nr), int(start)) for nr, start in zip(table[::2], table[1::2], strict=True))
        assert registered[2][1] < 10 * MiB // 512  # the extended container: only its first sectors
        run(["mkfs.ext4", "-q", "-L", "logical", loop.partition(5)])
        assert output(["blkid", "-o", "value", "-s", "LABEL", loop.partition(5)]) == "logical"


def test_a_foreign_partition_held_open_stops_the_attach_with_one_line_naming_it(tmp_path: Path) -> None:
    image = _image(tmp_path / "held.img", PRIMARIES)
    with loop_device(image, read_only=False, partitions=True) as loop:
        run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", loop.path], input=with_logicals(loop.path))
        holder = os.open(loop.partition(2), os.O_RDONLY)
        try:
            with pytest.raises(P2VError) as raised:
                _sync_partition_nodes(loop.path, timeout=1)
        finally:
            os.close(holder)
        message = str(raised.value)
        assert f"the kernel's partitions of {loop.path} are not its table's" in message
        assert "p2 at 22528+20480" in message  # what is registered: the old 10M partition 2
        assert raised.value.hint is not None and "fuser -v" in raised.value.hint


def test_detach_waits_for_a_held_partition_before_it_drops_the_partitions(tmp_path: Path) -> None:
    image = _image(tmp_path / "parts.img", PRIMARIES)
    with loop_device(image, read_only=True, partitions=True) as loop:
        holder = os.open(loop.partition(2), os.O_RDONLY)
        threading.Timer(0.5, os.close, (holder,)).start()
        started = time.monotonic()
        _drop_partition_nodes(loop.path)
        assert time.monotonic() - started >= 0.4
        assert _kernel_partitions(loop.path) == {}
        assert not os.path.exists(loop.partition(2))
