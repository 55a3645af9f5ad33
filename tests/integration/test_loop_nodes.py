"""Loop partition nodes and detaching, as two conversions side by side meet them.

Real loop devices and device nodes: this machine has no udev, so p2v makes /dev/loopNpM itself.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

from tasks.lib.resources import _make_node, loop_device
from tasks.lib.runner import output, run


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
