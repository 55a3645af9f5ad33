"""tasks.lib.manifest on small trees in tmp_path: what is recorded, what compare says, digest stability."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.manifest import (
    HASH_BLOCK,
    PROJECT_DIR,
    Difference,
    Entry,
    Manifest,
    acl_text,
    build_manifest,
    build_manifest_apart,
    compare,
    iter_entries,
    normalize,
    pair_entries,
    read_entries,
    render_differences,
    shown,
)
from tasks.lib.runner import P2VError, run

MTIME = 1_234_567_890_123_456_789


def user_xattrs_work(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.p2v.probe", b"1")
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return False
        raise
    finally:
        probe.unlink()


def make_tree(root: Path) -> Path:
    """A small tree with one of each kind that a user (no root) can make."""
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "shadow").chmod(0o640)
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + bytes(100))
    tool.chmod(0o4755)
    sticky = root / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    # hard links: three names, two directories
    (root / "links").mkdir()
    (root / "links" / "other").mkdir()
    first = root / "links" / "a"
    first.write_text("one inode\n")
    os.link(first, root / "links" / "b")
    os.link(first, root / "links" / "other" / "c")
    # symlinks, one dangling, one to a directory
    os.symlink("../etc/shadow", root / "bin" / "relative")
    os.symlink("/nowhere", root / "bin" / "dangling")
    os.symlink("links", root / "to-dir")
    os.mkfifo(root / "fifo", 0o600)
    # a name that is not UTF-8
    (root / os.fsdecode(b"caf\xe9")).write_text("latin-1\n")
    # sparse: data at the start and in the last block, a hole between
    sparse = root / "sparse.img"
    with sparse.open("wb") as handle:
        handle.write(b"head")
        handle.seek(8 * HASH_BLOCK)
        handle.write(b"tail")
    (root / "empty").write_bytes(b"")
    (root / "proc").mkdir()
    (root / "proc" / "1").mkdir()
    (root / "proc" / "1" / "status").write_text("pid 1\n")
    (root / "swapfile").write_bytes(bytes(4096))
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(MTIME, MTIME), follow_symlinks=False)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


def cp_a(tree: Path, where: Path) -> Path:
    """A faithful copy by the obvious tool: links, modes, times, xattrs and holes kept."""
    run(["cp", "-a", "--sparse=always", str(tree), str(where)])
    return where


# ---------------------------------------------------------------- what is recorded


def test_entries_of_every_kind(tree: Path) -> None:
    manifest = build_manifest(tree)
    entries = manifest.entries
    assert entries["/"].type == "dir"
    assert entries["/etc/shadow"].mode == 0o640
    assert entries["/bin/tool"].mode == 0o4755
    assert entries["/shared"].mode == 0o1777
    assert entries["/bin/relative"].type == "symlink" and entries["/bin/relative"].target == "../etc/shadow"
    assert entries["/bin/dangling"].target == "/nowhere"
    assert entries["/to-dir"].type == "symlink"
    assert entries["/fifo"].type == "fifo" and entries["/fifo"].mode == 0o600
    assert entries["/etc/shadow"].uid == os.getuid() and entries["/etc/shadow"].gid == os.getgid()
    assert entries["/etc/shadow"].mtime_ns == MTIME
    assert entries["/etc"].mtime_ns == MTIME  # directory mtimes are recorded
    assert entries["/empty"].size == 0 and entries["/empty"].sha256 is not None
    assert not entries["/empty"].sparse
    assert entries["/bin/tool"].size == 104


def test_non_utf8_names_round_trip(tree: Path, tmp_path: Path) -> None:
    manifest = build_manifest(tree)
    name = os.fsdecode(b"/caf\xe9")
    assert name in manifest.entries
    assert shown(name) == "/caf\\xe9"
    saved = tmp_path / "manifest.json"
    manifest.write(saved)
    json.loads(saved.read_text())  # plain ASCII JSON
    again = Manifest.read(saved)
    assert again.entries == manifest.entries
    assert again.digest() == manifest.digest()


def test_hard_link_groups_name_their_first_path(tree: Path) -> None:
    entries = build_manifest(tree).entries
    assert entries["/links/a"].link == "/links/a"
    assert entries["/links/b"].link == "/links/a"
    assert entries["/links/other/c"].link == "/links/a"
    assert entries["/etc/shadow"].link is None


def test_a_link_outside_the_recorded_area_is_not_a_group(tree: Path) -> None:
    manifest = build_manifest(tree, omit=["/links/b", "/links/other/c"])
    assert manifest.entries["/links/a"].link is None


def test_sparse_file_is_sparse_and_hashed_without_reading_holes(tree: Path) -> None:
    entries = build_manifest(tree).entries
    sparse = entries["/sparse.img"]
    assert sparse.size == 8 * HASH_BLOCK + 4
    if os.stat(tree / "sparse.img").st_blocks * 512 >= sparse.size:
        pytest.skip("this filesystem does not keep holes")
    assert sparse.sparse
    # Same bytes, no holes: same hash.
    dense = tree / "dense.img"
    dense.write_bytes((tree / "sparse.img").read_bytes())
    assert build_manifest(tree).entries["/dense.img"].sha256 == sparse.sha256
    assert not build_manifest(tree).entries["/dense.img"].sparse


def test_excludes_keep_the_directory_and_omit_drops_the_entry(tree: Path) -> None:
    manifest = build_manifest(tree, ["proc"], omit=["/swapfile"])
    assert "/proc" in manifest.entries
    assert "/proc/1" not in manifest.entries
    assert "/swapfile" not in manifest.entries
    assert manifest.excludes == ("/proc",) and manifest.omit == ("/swapfile",)


def test_user_xattrs_sorted(tree: Path) -> None:
    if not user_xattrs_work(tree):
        pytest.skip("no user xattrs on this filesystem")
    os.setxattr(tree / "etc" / "shadow", "user.z", b"\x00\xff")
    os.setxattr(tree / "etc" / "shadow", "user.a", b"text")
    entry = build_manifest(tree).entries["/etc/shadow"]
    assert entry.xattrs == (("user.a", b"text".hex()), ("user.z", "00ff"))


def acl_value(text: str) -> bytes:
    tags = {"user": (0x01, 0x02), "group": (0x04, 0x08), "mask": (0x10, 0x10), "other": (0x20, 0x20)}
    body = b""
    for item in text.split(","):
        tag, qualifier, perms = item.split(":")
        bits = sum(bit for bit, char in zip((4, 2, 1), perms, strict=True) if char != "-")
        body += struct.pack("<HHI", tags[tag][1 if qualifier else 0], bits,
                            int(qualifier) if qualifier else 0xFFFFFFFF)
    return struct.pack("<I", 2) + body


def test_acl_text_decodes_the_xattr() -> None:
    text = "user::rw-,user:4242:rw-,group::r--,group:4343:r--,mask::rw-,other::r--"
    assert acl_text(acl_value(text)) == text
    assert acl_text(b"\x01\x02").startswith("hex:")


def test_posix_acls_recorded_apart_from_xattrs(tree: Path) -> None:
    value = acl_value(f"user::rw-,user:{os.getuid() + 1}:rw-,group::r--,mask::rw-,other::---")
    try:
        os.setxattr(tree / "etc" / "shadow", "system.posix_acl_access", value)
    except OSError:
        pytest.skip("no POSIX ACLs here")
    entry = build_manifest(tree).entries["/etc/shadow"]
    assert entry.acl_access is not None and f"user:{os.getuid() + 1}:rw-" in entry.acl_access
    assert all(not name.startswith("system.posix_acl") for name, _ in entry.xattrs)


def test_socket_recorded(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        assert build_manifest(root).entries["/sock"].type == "socket"


# ---------------------------------------------------------------- compare


def test_a_faithful_copy_compares_equal_with_the_same_digest(tree: Path, tmp_path: Path) -> None:
    copy = cp_a(tree, tmp_path / "copy")
    source, target = build_manifest(tree), build_manifest(copy)
    assert compare(source, target) == []
    assert source.digest() == target.digest()
    assert source.digest().startswith("sha256:")


def test_differences_read_well(tree: Path, tmp_path: Path) -> None:
    copy = cp_a(tree, tmp_path / "copy")
    (copy / "etc" / "shadow").chmod(0o600)
    os.utime(copy / "etc" / "shadow", ns=(MTIME, MTIME))
    (copy / "bin" / "relative").unlink()
    (copy / "extra").write_text("x")
    os.utime(copy, ns=(MTIME, MTIME))
    os.utime(copy / "bin", ns=(MTIME, MTIME))
    (copy / "links" / "b").unlink()
    shutil.copy2(copy / "links" / "a", copy / "links" / "b")  # same content, no longer a link
    os.utime(copy / "links", ns=(MTIME, MTIME))
    lines = [str(d) for d in compare(build_manifest(tree), build_manifest(copy))]
    assert "/etc/shadow: mode 0640 != 0600" in lines
    assert "missing: /bin/relative" in lines
    assert "extra: /extra" in lines
    assert "/links/b: hard link to /links/a != (none)" in lines


def test_content_size_mtime_and_type_differences(tree: Path, tmp_path: Path) -> None:
    copy = cp_a(tree, tmp_path / "copy")
    (copy / "etc" / "shadow").write_text("root:changed\n")
    os.utime(copy / "etc" / "shadow", ns=(MTIME, MTIME))
    os.utime(copy / "bin" / "tool", ns=(0, 0))
    os.unlink(copy / "fifo")
    (copy / "fifo").write_text("")
    os.utime(copy / "fifo", ns=(MTIME, MTIME))
    os.utime(copy, ns=(MTIME, MTIME))
    found = {(d.path, d.what): d for d in compare(build_manifest(tree), build_manifest(copy))}
    assert ("/etc/shadow", "sha256") in found and ("/etc/shadow", "size") in found
    assert str(found[("/bin/tool", "mtime")]) == \
        "/bin/tool: mtime 2009-02-13T23:31:30.123456789Z != 1970-01-01T00:00:00.000000000Z"
    assert str(found[("/fifo", "type")]) == "/fifo: type fifo != file"


def test_sparse_is_compared_one_way() -> None:
    base = Entry(path="/f", type="file", mode=0o644, uid=0, gid=0, mtime_ns=0, size=10, sha256="x")
    holey = Entry(**{**base.__dict__, "sparse": True})
    one = Manifest(root="a", entries={"/f": holey})
    other = Manifest(root="b", entries={"/f": base})
    assert [str(d) for d in compare(one, other)] == ["/f: sparse yes != no"]
    assert compare(other, one) == []  # a target sparser than its source is fine
    assert one.digest() == other.digest()  # sparse-ness is not in the digest


def test_xattr_differences_name_the_attribute() -> None:
    base = Entry(path="/f", type="file", mode=0o644, uid=0, gid=0, mtime_ns=0,
                 xattrs=(("security.selinux", b"system_u:object_r:etc_t:s0\x00".hex()),))
    bare = Entry(**{**base.__dict__, "xattrs": ()})
    (difference,) = compare(Manifest("a", {"/f": base}), Manifest("b", {"/f": bare}))
    assert difference.what == "xattr security.selinux"
    assert str(difference).endswith("!= (none)")


def test_render_differences_keeps_the_first_lines_and_counts() -> None:
    many = [Difference(f"/f{i}", "missing") for i in range(25)]
    text = render_differences(many, 20)
    assert text.splitlines()[0] == "missing: /f0"
    assert text.splitlines()[-1] == "... and 5 more"
    assert len(text.splitlines()) == 21


# ---------------------------------------------------------------- digest


def test_digest_is_stable_and_ignores_where_the_tree_is(tree: Path, tmp_path: Path) -> None:
    first = build_manifest(tree)
    again = build_manifest(tree, workers=1)
    assert first.digest() == again.digest()
    moved = tmp_path / "elsewhere"
    tree.rename(moved)
    assert build_manifest(moved).digest() == first.digest()


def test_digest_changes_with_any_compared_field(tree: Path) -> None:
    before = build_manifest(tree).digest()
    os.chmod(tree / "etc" / "shadow", 0o600)
    assert build_manifest(tree).digest() != before


def test_the_running_digest_is_the_hash_of_the_canonical_json(tree: Path) -> None:
    """The receipts' and seals' manifest digest kept its value when it began to be computed row by row."""
    manifest = build_manifest(tree)
    assert manifest.digest() == "sha256:" + hashlib.sha256(manifest.canonical_json()).hexdigest()
    empty = Manifest(root="/nowhere", entries={})
    assert empty.digest() == "sha256:" + hashlib.sha256(b"[]").hexdigest()


def test_canonical_json_is_sorted_by_path_bytes(tree: Path) -> None:
    rows = json.loads(build_manifest(tree).canonical_json())
    paths = [os.fsencode(row["path"]) for row in rows]
    assert paths == sorted(paths)
    assert paths[0] == b"/"


# ---------------------------------------------------------------- walking


def test_normalize() -> None:
    assert normalize("proc") == "/proc"
    assert normalize("./var//log/") == "/var/log"
    assert normalize("") == "/"
    with pytest.raises(P2VError):
        normalize("/var/../etc")


def test_root_must_be_a_directory(tree: Path) -> None:
    with pytest.raises(P2VError, match="is not a directory"):
        build_manifest(tree / "etc" / "shadow")


def test_modes_of_special_kinds_are_permission_bits_only(tree: Path) -> None:
    for entry in build_manifest(tree).entries.values():
        assert entry.mode == stat.S_IMODE(entry.mode)


def test_a_build_in_a_child_interpreter_is_the_same(tree: Path) -> None:
    here = build_manifest(tree, ["/proc"], omit=["/swapfile"])
    apart = build_manifest_apart(tree, ["/proc"], omit=["/swapfile"])
    assert apart.entries == here.entries
    assert apart.digest() == here.digest()


def test_the_walk_streams_in_path_byte_order(tmp_path: Path) -> None:
    """Byte order of whole paths, not a depth-first walk of sorted names: `/a.b` < `/a/x` although `a` < `a.b`."""
    root = tmp_path / "order"
    for relative in ("a/x", "a/x.y/z", "a/x-/q", "a.b/c", "a-/d", "a0", "b", "a/\udcff"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.fsencode(relative))
    paths = [os.fsencode(entry.path) for entry in iter_entries(root)]
    assert paths == sorted(paths)
    assert paths[:6] == [b"/", b"/a", b"/a-", b"/a-/d", b"/a.b", b"/a.b/c"]
    assert len(paths) == len(set(paths)) == 14
    assert [e.path for e in iter_entries(root)] == list(build_manifest(root).entries)


def test_pairing_refuses_a_stream_out_of_order() -> None:
    def entry(path: str) -> Entry:
        return Entry(path=path, type="dir", mode=0o755, uid=0, gid=0, mtime_ns=0)

    with pytest.raises(P2VError, match=r"not in path order: /a after /a\.b"):
        list(pair_entries([entry("/"), entry("/a.b"), entry("/a")], [entry("/")]))
    pairs = list(pair_entries([entry("/"), entry("/a"), entry("/c")], [entry("/"), entry("/b"), entry("/c")]))
    assert [(o and o.path, t and t.path) for o, t in pairs] == [("/", "/"), ("/a", None), (None, "/b"),
                                                                 ("/c", "/c")]


def test_a_child_stream_stopped_early_leaves_no_process(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stream's own child, not every child of this process: under xdist a worker also holds
    # what earlier tests' session fixtures started (servers, services), and those rightly live on.
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    with read_entries(tree, apart=True) as stream:
        first = next(stream)
    assert first.path == "/"
    assert len(started) == 1
    assert started[0].returncode is not None, "the stream's child was not waited for"
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    assert str(started[0].pid) not in children


def test_a_stream_child_dies_with_its_reader() -> None:
    """Even while it writes nothing (its first walk), so that a killed stage leaves no reader of its trees."""
    reader = textwrap.dedent("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time; from tasks.lib.manifest import _die_with_reader; "
                                  "_die_with_reader(); print('armed', flush=True); time.sleep(60)"],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "armed\\n"
        print(child.pid, flush=True)
        import time; time.sleep(60)
    """)
    with subprocess.Popen([sys.executable, "-c", reader], cwd=PROJECT_DIR, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        proc.kill()
    for _ in range(100):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # dead, not yet reaped by its new parent
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the stream's child outlived its reader")


def test_a_failing_child_build_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(P2VError, match=r"^cannot read .*/missing: No such file or directory$"):
        build_manifest_apart(tmp_path / "missing")
