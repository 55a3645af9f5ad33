"""tasks.lib.copy against the plain-bookworm fixture, mounted read-only, into fresh loop-mounted filesystems.

The target's / is xfs and its /boot and /srv ext4, so the copy crosses
filesystem types both ways (the source has ext4 /, /boot and xfs /srv), and
/srv gains a lost+found that the source never had.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.trees import Tree, fixture_tree, scratch_target
from tasks.lib import copy
from tasks.lib.copy import ALWAYS_EXCLUDED, CopyResult, copy_tree
from tasks.lib.manifest import XFS_ACL_XATTRS, build_manifest, compare
from tasks.lib.progress import PlainLines, Progress
from tasks.lib.resources import host_run_dir
from tasks.lib.runner import P2VError, run
from tasks.lib.spec import PROJECT_DIR
from tests.fixtures import oddities
from tests.fixtures.build import FixtureServer, build_server

SERVER = "plain-bookworm"
GIB = 1 << 30
TARGET = (("/", "xfs", 4 * GIB), ("/boot", "ext4", GIB // 2), ("/srv", "ext4", GIB))
# The fixture's swap is a partition; a plain file stands in for a swap file.
SWAP_STAND_IN = "/var/cache/debconf/templates.dat"
EXTRA_EXCLUDED = "/var/cache/apt"  # as a pseudo or network mount point would be


def image_hashes(server: FixtureServer) -> dict[str, str | None]:
    """Content hash (hole-aware SHA-256 hash list) and mtime of every disk image."""
    entries = build_manifest(server.directory).entries
    return {disk.name: f"{entries['/' + disk.name].sha256} {entries['/' + disk.name].mtime_ns}"
            for disk in server.disks}


def source_dir(scratch: Path) -> Path:
    """Where fixture_tree puts the source's spec and its links to the cached images."""
    return scratch / "source"


def leftovers(scratch: Path) -> list[str]:
    """Loop devices on our images (links in `scratch`: another test's loops on the cached images do not
    count), mounts p2v or this test made, and tar/rsync children, right now."""
    loops = run(["losetup", "-a"]).stdout.splitlines()
    found = [line for line in loops if str(scratch) in line]
    mounts = run(["findmnt", "-rn", "-o", "TARGET"]).stdout.splitlines()
    fixture_run_dir = host_run_dir(SERVER, source_dir(scratch) / "work")
    found += [m for m in mounts if m == str(fixture_run_dir) or m.startswith((f"{fixture_run_dir}/", str(scratch)))]
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = status.read_text()
            name, rest = text.split("(", 1)[1].rsplit(")", 1)
            if int(rest.split()[1]) == os.getpid() and name in ("rsync", "tar", "find"):
                found.append(f"child process {name} ({status.parent.name})")
    return found


@contextlib.contextmanager
def source_and_target(scratch: Path, filesystems: tuple[tuple[str, str, int], ...] = TARGET
                      ) -> Iterator[tuple[Tree, Path]]:
    with fixture_tree(SERVER, source_dir(scratch)) as tree, scratch_target(scratch, filesystems) as target:
        yield tree, target


def copy_options(log: Path) -> dict[str, Any]:
    return {"log_file": log, "exclude_contents": [EXTRA_EXCLUDED], "swap_files": [SWAP_STAND_IN]}


@pytest.fixture(scope="module")
def server() -> FixtureServer:
    return build_server(SERVER)


@pytest.fixture(scope="module")
def copied(server: FixtureServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full copy by the default method, a no-change rerun, and what both left."""
    scratch = tmp_path_factory.mktemp("copy")
    before = image_hashes(server)
    reports: list[Progress] = []
    found: dict[str, Any] = {}
    with source_and_target(scratch) as (tree, target):
        first = copy_tree(tree.root, target, tree.mountpoints, progress=reports.append,
                          **copy_options(scratch / "copy.log"))
        again = copy_tree(tree.root, target, tree.mountpoints, **copy_options(scratch / "again.log"))
        excluded = [*ALWAYS_EXCLUDED, EXTRA_EXCLUDED]
        found["manifests"] = (
            build_manifest(tree.root, excluded, omit=[SWAP_STAND_IN], mounts=tree.mountpoints[1:]),
            build_manifest(target, excluded, omit=[SWAP_STAND_IN, "/srv/lost+found"], mounts=tree.mountpoints[1:]),
        )
        found["oddities"] = {point: oddities.read_manifest(target / point.lstrip("/"), point)
                             for point in server.manifest_entries()}
        found["excluded"] = {path: (sorted(os.listdir(target / path.lstrip("/"))),
                                    os.stat(target / path.lstrip("/")).st_mode,
                                    os.stat(tree.root / path.lstrip("/")).st_mode) for path in excluded}
        found["source_had_contents"] = {path: bool(os.listdir(tree.root / path.lstrip("/"))) for path in excluded}
        found["swap_in_target"] = os.path.lexists(target / SWAP_STAND_IN.lstrip("/"))
        found["swap_in_source"] = os.path.lexists(tree.root / SWAP_STAND_IN.lstrip("/"))
        found["seen_while_mounted"] = leftovers(scratch)
    found.update(first=first, again=again, reports=reports, before=before, after=image_hashes(server),
                 leftovers=leftovers(scratch), log=(scratch / "copy.log").read_text(errors="replace"))
    print(f"\nfirst copy by {first.method}: {first.copy_seconds:.1f} s copy + {first.verify_seconds:.1f} s verify, "
          f"{first.bytes_transferred:,} bytes; no-change rerun: {again.copy_seconds:.1f} s, "
          f"{again.bytes_transferred:,} bytes")
    return found


# ---------------------------------------------------------------- the full copy


def test_copy_is_verified_and_the_manifests_are_equal(copied: dict[str, Any]) -> None:
    first: CopyResult = copied["first"]
    assert first.verified
    source, target = copied["manifests"]
    assert compare(source, target) == []
    assert first.manifest_digest == source.digest() == target.digest()
    assert first.method == copy.DEFAULT_METHOD
    assert [p.mountpoint for p in first.passes] == ["/", "/boot", "/srv"]
    assert not any(p.resumed for p in first.passes)


def test_every_hard_to_copy_file_survives_one_by_one(server: FixtureServer, copied: dict[str, Any]) -> None:
    failures = []
    checked = 0
    for point, expected_entries in server.manifest_entries().items():
        got = {entry["path_hex"]: entry for entry in copied["oddities"][point]}
        for want in expected_entries:
            entry = got.get(want["path_hex"])
            what = f"{want['path']} ({want['purpose'] or want['type']})"
            checked += 1
            if entry is None:
                failures.append(f"{what}: missing")
                continue
            for key in ("type", "mode", "uid", "gid", "nlink", "size", "mtime_ns", "link_group", "acl_access",
                        "acl_default", "xattrs", "target_hex", "rdev"):
                ours, theirs = want[key], entry[key]
                if key == "size" and want["type"] == "dir":
                    continue  # a directory's size is its filesystem's bookkeeping
                if key == "xattrs":  # XFS lists its ACLs as trusted.SGI_ACL_* too: the ACLs are compared above
                    ours, theirs = ({k: v for k, v in x.items() if k not in XFS_ACL_XATTRS} for x in (ours, theirs))
                if ours != theirs:
                    failures.append(f"{what}: {key} {ours!r} != {theirs!r}")
            was_sparse = want["type"] == "file" and want["blocks"] * 512 < want["size"]
            if was_sparse and not entry["blocks"] * 512 < entry["size"]:
                failures.append(f"{what}: no longer sparse ({entry['blocks']} blocks)")
        extra = set(got) - {want["path_hex"] for want in expected_entries}
        failures += [f"extra: {got[h]['path']}" for h in sorted(extra)]
    assert checked > 80
    assert failures == [], "\n".join(failures)


def test_excluded_directories_are_kept_empty_with_their_modes(copied: dict[str, Any]) -> None:
    for path, (children, target_mode, source_mode) in copied["excluded"].items():
        assert children == [], path
        assert target_mode == source_mode, path
    assert copied["source_had_contents"]["/dev"] and copied["source_had_contents"]["/run"]
    assert copied["source_had_contents"][EXTRA_EXCLUDED]


def test_swap_files_are_left_out_and_recorded(copied: dict[str, Any]) -> None:
    assert copied["swap_in_source"] and not copied["swap_in_target"]
    assert copied["first"].receipt()["swap_files_skipped"] == [SWAP_STAND_IN]


def test_receipt(copied: dict[str, Any]) -> None:
    receipt = json.loads(json.dumps(copied["first"].receipt()))
    assert receipt["format"] == "p2v-copy-receipt" and receipt["verified"] is True
    assert receipt["files"] > 16000 and receipt["bytes"] > 700 * 1024**2
    assert receipt["bytes_transferred"] == receipt["bytes"]  # a first copy writes everything
    assert receipt["tools"]["rsync"].startswith("rsync  version")
    assert receipt["tools"]["tar"].startswith("tar (GNU tar)")
    assert receipt["manifest_digest"].startswith("sha256:")
    assert set(receipt["excluded_contents"]) == {*ALWAYS_EXCLUDED, EXTRA_EXCLUDED}
    assert [fs["mountpoint"] for fs in receipt["filesystems"]] == ["/", "/boot", "/srv"]
    by_point = {fs["mountpoint"]: fs for fs in receipt["filesystems"]}
    assert by_point["/"]["sockets"] == 1 and by_point["/srv"]["sockets"] == 1  # the oddities' sockets
    assert EXTRA_EXCLUDED in by_point["/"]["excluded_contents"]


def test_progress_was_reported(copied: dict[str, Any]) -> None:
    reports: list[Progress] = copied["reports"]
    assert reports and reports[-1].final
    assert {r.where for r in reports} == {"/", "/boot", "/srv"}
    assert reports[-1].bytes_total is not None and reports[-1].bytes_done >= 0.8 * reports[-1].bytes_total
    assert "ETA" in reports[-1].line()


def test_progress_reads_as_plain_lines_without_a_terminal(copied: dict[str, Any]) -> None:
    """The copy's reports through the shared reporter as sync gives them without a terminal:
    plain lines, the last of each filesystem always among them, with the copy's own figures."""
    reports: list[Progress] = copied["reports"]
    lines: list[str] = []
    show = PlainLines(lines.append, clock=lambda: 0.0)  # no time passes: only the tenths and finals
    for report in reports:
        show(report)
    finals = [r.line() for r in reports if r.final]
    assert len(finals) == 3 and all(line in lines for line in finals)
    assert all(line.startswith("copy: ") and "\r" not in line and "\x1b" not in line for line in lines)
    assert all(f"{r.files_done:,} of ~{r.files_total:,} files" in r.line() for r in reports)
    assert len(lines) <= 3 + 10  # a line at each tenth of the whole copy, and each filesystem's last
    for last, first in itertools.pairwise(reports):
        if last.final:  # measured gains only: never back from one filesystem to the next
            assert first.bytes_done >= last.bytes_done and (first.files_done or 0) >= (last.files_done or 0)


def test_log_has_the_commands(copied: dict[str, Any]) -> None:
    assert "+ tar --create" in copied["log"] and "| tar --extract" in copied["log"]
    assert "verify: source" in copied["log"]


def test_a_no_change_rerun_copies_nothing(copied: dict[str, Any]) -> None:
    again: CopyResult = copied["again"]
    assert again.verified and all(p.resumed and p.tool == "rsync" for p in again.passes)
    assert again.bytes_transferred == 0
    assert again.manifest_digest == copied["first"].manifest_digest


def test_source_images_unchanged_and_nothing_left(copied: dict[str, Any]) -> None:
    assert copied["seen_while_mounted"], "the check for leftovers sees nothing even while mounted"
    assert copied["before"] == copied["after"]
    assert copied["leftovers"] == []


# ---------------------------------------------------------------- the rsync method


def test_rsync_method_is_lossless_too(server: FixtureServer, tmp_path: Path) -> None:
    with source_and_target(tmp_path) as (tree, target):
        result = copy_tree(tree.root, target, tree.mountpoints, method="rsync", **copy_options(tmp_path / "log"))
    assert result.verified and all(p.tool == "rsync" for p in result.passes)
    assert result.bytes_transferred == result.bytes
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- failures


class Injected(Exception):
    pass


def test_failure_mid_copy_leaves_nothing(server: FixtureServer, tmp_path: Path) -> None:
    seen: list[str] = []

    def explode(progress: Progress) -> None:
        if progress.bytes_done > 100 * 1024**2:
            seen.extend(leftovers(tmp_path))  # mounts, loops and the tar pair are alive here
            raise Injected("injected failure mid-copy")

    with pytest.raises(Injected), source_and_target(tmp_path) as (tree, target):
        copy_tree(tree.root, target, tree.mountpoints, progress=explode, **copy_options(tmp_path / "log"))
    assert any("child process tar" in item for item in seen)
    assert leftovers(tmp_path) == []


def test_disk_full_is_a_clear_error(server: FixtureServer, tmp_path: Path) -> None:
    small = (("/", "ext4", 320 * 1024**2), ("/boot", "ext4", GIB // 2), ("/srv", "ext4", GIB))
    with pytest.raises(P2VError) as failure, source_and_target(tmp_path, small) as (tree, target):
        copy_tree(tree.root, target, tree.mountpoints, **copy_options(tmp_path / "log"))
    message = str(failure.value)
    print("\n" + message)
    assert message.startswith("target filesystem full while copying /: ")
    assert " bytes free of " in message and " needed" in message
    assert "rsync" not in message.split("(hint")[0] and "exit code" not in message
    log = (tmp_path / "log").read_text(errors="replace")
    assert "+ tar --create" in log and "No space left on device" in log
    assert leftovers(tmp_path) == []


def test_killed_copy_resumes_and_copies_less(server: FixtureServer, tmp_path: Path) -> None:
    """SIGKILL the whole copy (python, tar, tar) partway, then run it again."""
    with source_and_target(tmp_path) as (tree, target):
        script = (
            "import sys; from pathlib import Path; from tasks.lib.copy import copy_tree; "
            "copy_tree(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4:], log_file=Path(sys.argv[3]))"
        )
        victim = subprocess.Popen([sys.executable, "-c", script, str(tree.root), str(target),
                                   str(tmp_path / "killed.log"), *tree.mountpoints],
                                  cwd=PROJECT_DIR, start_new_session=True)
        source_used = copy._used(tree.root)[0]
        deadline = time.monotonic() + 120
        while copy._used(target)[0] < 0.4 * source_used and victim.poll() is None:
            assert time.monotonic() < deadline, "the copy made no progress"
            time.sleep(0.05)
        assert victim.poll() is None, "the copy finished before it could be killed"
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        time.sleep(0.5)  # the killed tar pair lets go of the target
        copied_before_kill = copy._used(target)[0]
        rerun = copy_tree(tree.root, target, tree.mountpoints, log_file=tmp_path / "rerun.log")
    root = rerun.passes[0]
    print(f"\nkilled at {copied_before_kill / 1024**2:.0f} MiB used on the target's /; the rerun transferred "
          f"{rerun.bytes_transferred:,} of {rerun.bytes:,} bytes ({root.mountpoint}: {root.bytes_transferred:,} bytes "
          f"by {root.tool}, resumed={root.resumed}) and verified")
    assert rerun.verified
    assert root.resumed and root.tool == "rsync"
    assert rerun.bytes is not None and rerun.bytes_transferred is not None
    assert rerun.bytes_transferred < rerun.bytes
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- options, without copying


def test_exclude_rules() -> None:
    assert copy.assign(["/proc", "/srv/cache", "/srv", "/elsewhere"], ["/", "/srv"]) == {
        "/": ["/proc", "/elsewhere"], "/srv": ["/cache", "/"]}
    assert copy.rsync_filters(["/proc", "/"], ["/swapfile", "/odd*name"]) == [
        "--exclude=/proc/*", "--exclude=/*", "--exclude=/swapfile", "--exclude=/odd\\*name"]
    assert copy.tar_filters(["/proc", "/a[1]"], ["/swapfile"]) == [
        "--anchored", "--exclude=./proc/*", "--exclude=./a\\[1]/*", "--exclude=./swapfile"]


def test_rsync_options_are_the_documented_ones() -> None:
    argv = copy.rsync_argv(Path("/src"), Path("/dst"), ["/proc"], [])
    for option in ("--archive", "--hard-links", "--acls", "--xattrs", "--sparse", "--numeric-ids",
                   "--one-file-system", "--inplace"):
        assert option in argv
    for unwanted in ("-z", "--compress", "--fake-super", "--preallocate", "--atimes"):
        assert unwanted not in argv
    assert argv[-2:] == ["/src/", "/dst/"]


def test_unknown_method_and_missing_mount_point(tmp_path: Path) -> None:
    with pytest.raises(P2VError, match="unknown copy method"):
        copy_tree(tmp_path, tmp_path, ["/"], log_file=tmp_path / "log", method="cpio")  # type: ignore[arg-type]
    with pytest.raises(P2VError, match="is not a directory"):
        copy_tree(tmp_path, tmp_path, ["/", "/nope"], log_file=tmp_path / "log")


def test_a_filesystem_merged_under_a_setgid_mount_point_keeps_its_modes_and_acls(tmp_path: Path) -> None:
    """Debian's /var/mail is 2775 (root:mail): a filesystem mounted there has lost+found 0700 under a setgid root.

    tar -x lets a directory keep the setgid bit it inherited from the directory it was made in, and the
    target's mount point already has the source mount point's mode when the merged filesystem is
    extracted into it. Seen on the bench's mail server (bench/trees.py mail_server). The mount point's
    default ACL must not reach the filesystem's entries either (tar sets ACLs as archived)."""
    layout = (("/", "ext4", 64 << 20), ("/var/mail", "ext4", 32 << 20))
    images = [tmp_path / "root.img", tmp_path / "mail.img"]
    with scratch_target(tmp_path / "source-root", layout[:1], images=images[:1], keep=True) as root:
        (root / "var/mail").mkdir(parents=True)
        os.chmod(root / "var/mail", 0o2775)  # the mount point, hidden once the filesystem is mounted
        run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "var/mail")])
    with scratch_target(tmp_path / "source", layout, images=images, keep=True) as source, \
            scratch_target(tmp_path / "target", layout[:1]) as target:
        spool = source / "var/mail"
        os.chmod(spool, 0o2775)
        (spool / "private").mkdir(mode=0o750)
        (spool / "private/deeper").mkdir(mode=0o700)
        (spool / "alice").write_text("mail\n")
        os.chmod(spool / "private/deeper", 0o700)  # made 2700 in its setgid parent; this one is not
        result = copy_tree(source, target, ["/", "/var/mail"], log_file=tmp_path / "copy.log")
        assert result.verified_by == "manifests"
        names = (".", "lost+found", "private", "private/deeper")
        modes = {name: ((spool / name).stat().st_mode & 0o7777, (target / "var/mail" / name).stat().st_mode & 0o7777)
                 for name in names}
        acls = {name: run(["getfacl", "--omit-header", "--default", str(target / "var/mail" / name)]).stdout.strip()
                for name in names}
    assert modes == {".": (0o2775, 0o2775), "lost+found": (0o700, 0o700), "private": (0o2750, 0o2750),
                     "private/deeper": (0o700, 0o700)}
    assert acls == {name: "" for name in names}  # the hidden mount point's default ACL is nowhere
