"""Inode flags (chattr) through the copy and the fix stage's last step, on real ext4 and xfs images.

The source gets its flags from the real chattr, the target is read with the real lsattr. The copy
(tasks/lib/copy/, as the sync stage calls it) keeps every flag the target keeps but i and a, which
it lists as pending; the fix stage's code that sets them (tasks/fix.py: set_deferred_flags) runs on
the mounted target, and a resync into a target that already has them still works.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.trees import make_filesystem
from tasks.lib.copy import CopyResult, copy_tree, verify_copy
from tasks.lib.fixes.steps.flags import clear_deferred_flags, set_deferred_flags
from tasks.lib.fixes.steps.record import CONVERSION_RECORD
from tasks.lib.inodeflags import DEFERRED
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import P2VError, run
from tasks.sync import flags_set_by_fix

MIB = 1 << 20
# path -> flags set on the source: what both ext4 and xfs keep, on files and directories.
COMMON = {
    "etc/resolv.conf": "i",
    "etc/locked": "i",  # a directory, with a file inside
    "var/log/audit.log": "a",
    "var/log/append-dir": "a",  # a directory
    "var/backup/nodump.tar": "d",
    "srv/noatime": "A",
    "srv/sync": "S",
    "srv/several": "adA",
}
# What only ext4 keeps: xfs refuses them (and D, T, t are for directories, or not on xfs at all).
EXT4_ONLY = {"srv/secure": "s", "srv/undelete": "u", "srv/notail": "t", "srv/dirsync": "D", "srv/topdir": "T"}
DIRECTORIES = {"etc/locked", "var/log/append-dir", "srv/dirsync", "srv/topdir"}


def lsattr(path: Path) -> str:
    """The flags lsattr shows, as letters (e, the extents flag ext4 sets itself, left out)."""
    shown = run(["lsattr", "-d", str(path)]).stdout.split()[0]
    return "".join(sorted(c for c in shown if c not in "-e"))


def expected(flags: str) -> str:
    return "".join(sorted(flags))


def fill(root: Path, flagged: dict[str, str]) -> None:
    for relative in flagged:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative in DIRECTORIES:
            path.mkdir()
            (path / "inside").write_text(f"in {relative}\n")
        else:
            path.write_text(f"{relative}\n")
    (root / "etc" / "plain.conf").write_text("no flags\n")
    for pseudo in ("proc", "sys", "dev", "run", "tmp"):
        (root / pseudo).mkdir(exist_ok=True)
    for relative, flags in flagged.items():  # after the contents: i and a lock a directory
        run(["chattr", f"+{flags}", str(root / relative)])


class Images:
    """A source and a target image of one test, mounted for each step like the stages would."""

    def __init__(self, scratch: Path, source_fs: str, target_fs: str, flagged: dict[str, str]):
        self.scratch = scratch
        self.source_fs, self.target_fs = source_fs, target_fs
        self.source_image, self.target_image = scratch / "source.img", scratch / "target.img"
        self.mounts = 0
        make_filesystem(self.source_image, source_fs, 320 * MIB)
        make_filesystem(self.target_image, target_fs, 320 * MIB)
        with self.mounted() as (source, _target):
            fill(source, flagged)

    @contextlib.contextmanager
    def mounted(self) -> Iterator[tuple[Path, Path]]:
        self.mounts += 1
        with contextlib.ExitStack() as stack:
            points = []
            for image, fstype, name in ((self.source_image, self.source_fs, "source"),
                                        (self.target_image, self.target_fs, "target")):
                point = self.scratch / f"{name}-{self.mounts}"
                point.mkdir()
                loop = stack.enter_context(loop_device(image, read_only=False))
                points.append(stack.enter_context(mounted(loop.path, point, fstype=fstype)))
            yield points[0], points[1]

    def copy(self, source: Path, target: Path) -> CopyResult:
        """As the sync stage copies: i and a deferred, whatever an earlier fix set unlocked first."""
        return copy_tree(source, target, ["/"], log_file=self.scratch / f"copy-{self.mounts}.log",
                         defer_flags=DEFERRED, unlock=flags_set_by_fix(target))


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    mounts = [line for line in run(["findmnt", "-rn", "-o", "TARGET"]).stdout.splitlines()
              if line.startswith(str(tmp_path))]
    assert mounts == []
    # A loop device udev still has open when it is detached goes once udev lets go (autoclear).
    for _ in range(50):
        attached = [line for line in run(["losetup", "-a"]).stdout.splitlines() if str(tmp_path) in line]
        if not attached:
            break
        time.sleep(0.1)
    assert attached == []


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_flags_survive_the_copy_and_i_a_come_last(scratch: Path, fstype: str) -> None:
    flagged = {**COMMON, **(EXT4_ONLY if fstype == "ext4" else {})}
    images = Images(scratch, fstype, fstype, flagged)
    with images.mounted() as (source, target):
        assert {rel: lsattr(source / rel) for rel in flagged} == {rel: expected(f) for rel, f in flagged.items()}
        first = images.copy(source, target)
        assert first.verified and first.verified_by == "manifests"
        # Every flag is on the target but i and a, which are pending; nothing the target did not keep.
        assert {rel: lsattr(target / rel) for rel in flagged} == \
            {rel: expected(f.replace("i", "").replace("a", "")) for rel, f in flagged.items()}
        assert sorted(first.flags.pending) == sorted(
            ("/" + rel, "".join(c for c in "ia" if c in f)) for rel, f in flagged.items() if set(f) & set("ia"))
        receipt = first.receipt()
        assert receipt["warnings"] == [] and receipt["inode_flags"]["dropped"] == []
        assert receipt["inode_flags"]["entries"] == len(flagged)
        # The fix stage's last step: i and a, read back, recorded in the image first.
        devices = frozenset({os.stat(target).st_dev})
        done = set_deferred_flags(target, first.flags.pending, devices)
        assert sorted(done) == sorted(first.flags.pending)
        assert {rel: lsattr(target / rel) for rel in flagged} == {rel: expected(f) for rel, f in flagged.items()}
        record = json.loads((target / CONVERSION_RECORD.lstrip("/")).read_text())
        assert [row["path"] for row in record["inode_flags"]["applied"]] == [p for p, _ in first.flags.pending]
        with pytest.raises(PermissionError):
            (target / "etc/resolv.conf").write_text("changed\n")
        with pytest.raises(PermissionError):
            (target / "etc/locked/new").write_text("no new entries in an immutable directory\n")
        with open(target / "var/log/audit.log", "a") as log:
            log.write("appending is what append-only allows\n")
        with pytest.raises(PermissionError):
            (target / "var/log/audit.log").write_text("truncating is not\n")
        # fix again: unlocked for its steps, locked again at the end.
        assert clear_deferred_flags(target, flags_set_by_fix(target), devices) == len(first.flags.pending)
        (target / "etc/locked/by-fix").write_text("a fix step may write here\n")
        (target / "etc/locked/by-fix").unlink()
        set_deferred_flags(target, first.flags.pending, devices)
        assert lsattr(target / "etc/resolv.conf") == "i"

    # The server changed an immutable file (unlocked, edited, locked again); sync runs again into the
    # fixed, locked image: it unlocks what the fix set, copies, and leaves i and a pending again.
    with images.mounted() as (source, _target):
        run(["chattr", "-i", str(source / "etc/resolv.conf")])
        (source / "etc/resolv.conf").write_text("nameserver 192.0.2.53\n")
        run(["chattr", "+i", str(source / "etc/resolv.conf")])
    with images.mounted() as (source, target):
        again = images.copy(source, target)
        assert again.verified and any(p.resumed for p in again.passes)
        assert (target / "etc/resolv.conf").read_text() == "nameserver 192.0.2.53\n"
        assert lsattr(target / "etc/resolv.conf") == "" and lsattr(target / "var/log/audit.log") == ""
        assert lsattr(target / "srv/several") == expected("dA")
        assert again.flags.pending == first.flags.pending
        assert "cleared i/a on" in (scratch / f"copy-{images.mounts}.log").read_text()


def test_a_flag_difference_fails_verification(scratch: Path) -> None:
    images = Images(scratch, "ext4", "ext4", COMMON)
    with images.mounted() as (source, target):
        assert images.copy(source, target).verified
        verify_copy(source, target, ["/"], log_file=scratch / "verify.log", defer_flags=DEFERRED)
        run(["chattr", "-d", str(target / "var/backup/nodump.tar")])
        with pytest.raises(P2VError) as failed:
            verify_copy(source, target, ["/"], log_file=scratch / "verify.log", defer_flags=DEFERRED)
        lines = str(failed.value).splitlines()
        assert lines[0] == "copy verification failed: 1 difference(s) between the source and the target:"
        assert lines[1].startswith("/var/backup/nodump.tar: flags d != - (hint: every difference is listed in")
        # An i on the target before the fix stage set it is a difference too: pending means not there yet.
        run(["chattr", "+d", str(target / "var/backup/nodump.tar")])
        run(["chattr", "+i", str(target / "etc/resolv.conf")])
        with pytest.raises(P2VError, match=r"/etc/resolv\.conf: flags - != i"):
            verify_copy(source, target, ["/"], log_file=scratch / "verify.log", defer_flags=DEFERRED)
        run(["chattr", "-i", str(target / "etc/resolv.conf")])


def test_flags_the_target_does_not_keep_are_warnings_not_silence(scratch: Path) -> None:
    flagged = {**COMMON, **EXT4_ONLY}
    images = Images(scratch, "ext4", "xfs", flagged)
    with images.mounted() as (source, target):
        result = images.copy(source, target)
        assert result.verified
        dropped = {path: flags for path, flags, _why in result.flags.dropped}
        assert dropped == {"/" + rel: flags for rel, flags in EXT4_ONLY.items()}
        assert {why for _, _, why in result.flags.dropped} == {"Operation not supported"}
        warnings = result.receipt()["warnings"]
        assert len(warnings) == len(EXT4_ONLY)
        assert any(w.startswith("inode flag s (secure deletion) not kept on 1 entry of the target "
                                "(Operation not supported): /srv/secure") for w in warnings)
        # What xfs keeps, it has.
        assert {rel: lsattr(target / rel) for rel in COMMON} == \
            {rel: expected(f.replace("i", "").replace("a", "")) for rel, f in COMMON.items()}
