"""The copy's verification streams both trees in path order and compares them entry by entry (issue 14: scale).

Real trees on loop-mounted ext4 images: a copy by copy_tree, then a target changed at the very start
and the very end of the sort order, in a hard-link group, with an extra and a missing entry. The
streaming comparison, in this process and in child interpreters, must say exactly what the
whole-tree comparison (build_manifest + compare) says, and add up to the same figures and digest.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.trees import scratch_target
from tasks.lib.copy import ALWAYS_EXCLUDED, copy_tree, verify, verify_copy
from tasks.lib.copy.passes import _Log
from tasks.lib.manifest import build_manifest, compare, normalize
from tasks.lib.runner import P2VError, run

MIB = 1 << 20
MTIME = 1_600_000_000_123_456_789
LAST = os.fsdecode(b"\xffend")  # not UTF-8, and the last name in byte order


def fill(root: Path) -> None:
    for relative in ("a/x", "a/x.y/z", "a.b/c", "a-/d", "a0", "links/z", LAST, "!first"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.fsencode(relative) * 3)
        path.chmod(0o644)
    os.link(root / "links" / "z", root / "links" / "a")  # the group's first path is /links/a, met first
    os.link(root / "links" / "z", root / "a" / "also")  # and one in another directory
    for pseudo in ("proc", "sys", "dev", "run", "tmp"):
        (root / pseudo).mkdir(exist_ok=True)
    (root / "proc" / "ignored").write_text("contents of /proc are not copied\n")
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(MTIME, MTIME), follow_symlinks=False)


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    with scratch_target(tmp_path / "source", [("/", "ext4", 64 * MIB)]) as source, \
            scratch_target(tmp_path / "target", [("/", "ext4", 64 * MIB)]) as target:
        fill(source)
        yield source, target
    mounts = [line for line in run(["findmnt", "-rn", "-o", "TARGET"]).stdout.splitlines()
              if line.startswith(str(tmp_path))]
    assert mounts == []
    for _ in range(50):  # a loop device udev still holds goes once udev lets go (autoclear)
        attached = [line for line in run(["losetup", "-a"]).stdout.splitlines() if str(tmp_path) in line]
        if not attached:
            break
        time.sleep(0.1)
    assert attached == []


def excluded() -> list[str]:
    return sorted({normalize(p) for p in ALWAYS_EXCLUDED})


def streamed(source: Path, target: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch, *, apart: bool
             ) -> tuple[verify.Verified, list[str]]:
    monkeypatch.setattr(verify, "APART_INODES", 0 if apart else 1 << 40)
    log = _Log(scratch / f"verify-{apart}.log")
    try:
        verified, differences = verify._compare_trees(source, target, ["/"], excluded(), [], log, lambda e: e)
    finally:
        log.close()
    return verified, [str(d) for d in differences]


def keep_time(*paths: Path) -> None:
    for path in paths:
        os.utime(path, ns=(MTIME, MTIME), follow_symlinks=False)


def test_a_faithful_copy_verifies_with_the_whole_tree_digest(trees: tuple[Path, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = trees
    result = copy_tree(source, target, ["/"], log_file=tmp_path / "copy.log")
    whole = build_manifest(source, excluded())
    assert result.verified_by == "manifests"
    assert result.manifest_digest == whole.digest()  # the receipt's value, as when both trees were held
    assert (result.files, result.regular_files, result.bytes) == (whole.files, whole.regular_files,
                                                                  whole.total_bytes)
    assert whole.entries["/a/also"].link == whole.entries["/links/z"].link == "/a/also"
    for apart in (False, True):
        verified, differences = streamed(source, target, tmp_path, monkeypatch, apart=apart)
        assert differences == []
        assert verified.source.digest() == whole.digest()
        assert verified.target_entries == whole.files
        assert verified.by_filesystem == {"/": (whole.regular_files - 2, whole.total_bytes)}  # 3 names, 1 inode
    assert verify_copy(source, target, ["/"], log_file=tmp_path / "verify.log").source.digest() == whole.digest()


def test_differences_at_both_ends_in_a_link_group_extra_and_missing(trees: tuple[Path, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = trees
    copy_tree(source, target, ["/"], log_file=tmp_path / "copy.log")
    target.chmod(0o700)  # the first entry of all: /
    (target / LAST).chmod(0o600)  # the last
    (target / "!first").write_bytes(b"!FIRST" * 3)  # the first after /: same size, same mtime, other bytes
    keep_time(target / "!first")
    shutil.copy2(target / "links" / "a", target / "links" / "a.new")  # /links/a leaves the group
    os.replace(target / "links" / "a.new", target / "links" / "a")
    (target / "a" / "extra").write_text("not in the source\n")
    (target / "a.b" / "c").unlink()
    keep_time(target / "links", target / "a", target / "a.b")

    hashes = [build_manifest(tree).entries["/!first"].sha256 or "" for tree in (source, target)]
    whole = [str(d) for d in compare(build_manifest(source, excluded()), build_manifest(target, excluded()))]
    assert whole == [  # the whole-tree comparison, in path byte order: "." < "/" < "l" < 0xff
        "/: mode 0755 != 0700",
        f"/!first: sha256 {hashes[0][:16]} != {hashes[1][:16]}",
        "missing: /a.b/c",
        "extra: /a/extra",
        "/links/a: hard link to /a/also != (none)",  # the rest of its group still agree
        "/\\xffend: mode 0644 != 0600",
    ]
    for apart in (False, True):
        verified, differences = streamed(source, target, tmp_path, monkeypatch, apart=apart)
        assert differences == whole
        assert verified.source.digest() == build_manifest(source, excluded()).digest()
        assert set(verified.expected_flags) == {"/", "/!first", "/a.b/c", "/links/a", "/" + LAST}
    with pytest.raises(P2VError, match=r"copy verification failed: 6 difference\(s\)"):
        verify_copy(source, target, ["/"], log_file=tmp_path / "verify.log")
