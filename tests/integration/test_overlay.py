"""The verify stage's throw-away overlay: writes land in the qcow2, never in the image."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lib import journal, unwind
from tasks.lib.overlay import create_overlay, fuse_export
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import run
from tasks.lib.spec import PROJECT_DIR
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


HOLD_EXPORT = """
import sys, time
from pathlib import Path
from tasks.lib import journal
from tasks.lib.overlay import fuse_export
with journal.journaling(Path(sys.argv[1])), fuse_export(Path(sys.argv[2]), Path(sys.argv[3])):
    print("exported", flush=True)
    time.sleep(600)
"""


def test_a_dead_export_is_undone_from_the_journal_after_its_attributes_expired(tmp_path: Path) -> None:
    """A stage SIGKILLed with its process group takes its qemu-storage-daemon along: the export is a
    dead FUSE mount. Once the kernel's cached attributes expire, every stat of it fails with ENOTCONN
    (CI saw `doit inspect:`'s rerun stop on that): the next run still undoes it from the journal."""
    image = tmp_path / "disk.img"
    make_image(image)
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(image, overlay)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    export = run_dir / "export"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_EXPORT, str(run_dir), str(overlay), str(export)],
                              cwd=PROJECT_DIR, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "exported"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 30
    while run(["pgrep", "-f", f"qemu-storage-daemon.*{tmp_path}"], check=False).stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # qemu's FUSE export gives its attributes a one-second validity
    with pytest.raises(OSError) as stat_error:
        os.stat(export)
    assert stat_error.value.errno == errno.ENOTCONN
    assert [held.kind for held in journal.held(journal.read(journal.journal_path(run_dir))[0])] == \
        ["process", "fuse-export"]
    undone = unwind.undo_journal(run_dir)
    assert any(item.startswith("FUSE export") for item in undone), undone
    assert str(export) not in run(["findmnt", "-rn", "-o", "TARGET"]).stdout
    assert not os.path.lexists(export)
    assert not journal.journal_path(run_dir).exists()
