"""The verify stage's throw-away overlay: writes land in the qcow2, never in the image."""

from __future__ import annotations

from pathlib import Path

from tasks.lib.overlay import create_overlay, fuse_export
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import run
from tests.fixtures.cache import sha256


def make_image(path: Path) -> None:
    with open(path, "wb") as handle:
        handle.truncate(64 << 20)
    run(["sfdisk", "--quiet", str(path)], input="label: dos\nstart=2048, type=83\n")
    with loop_device(path, read_only=False, partitions=True) as loop:
        run(["mkfs.ext4", "-q", loop.partition(1)])


def test_overlay_takes_the_writes_and_the_image_stays_as_it_was(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image)
    before = sha256(image)
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(image, overlay)
    export = tmp_path / "export"
    point = tmp_path / "mnt"
    point.mkdir()
    with fuse_export(overlay, export) as exported, loop_device(exported, read_only=False, partitions=True) as loop:
        with mounted(loop.partition(1), point, fstype="ext4"):
            (point / "written-in-overlay").write_text("hello\n")
    assert sha256(image) == before
    # The overlay holds the file: read it back through a second export.
    with fuse_export(overlay, export) as exported, loop_device(exported, read_only=True, partitions=True) as loop:
        with mounted(loop.partition(1), point, fstype="ext4", options=["ro", "noload"]):
            assert (point / "written-in-overlay").read_text() == "hello\n"
    assert not export.exists()
    assert str(export) not in run(["findmnt", "-rn", "-o", "TARGET"]).stdout
    assert str(export) not in run(["losetup", "-a"]).stdout
    assert run(["pgrep", "-f", f"qemu-storage-daemon.*{tmp_path}"], check=False).stdout == ""
