"""A manifest of a tree: per entry, everything a faithful copy must keep.

    iter_entries(root, excludes, omit=..., mounts=...) -> Entry, Entry, ... in path byte order
    read_entries(..., apart=True): the same from a child interpreter
    pair_entries(source stream, target stream) -> (Entry | None, Entry | None) per path
    Tally: counts, bytes and the digest of a stream, added up as it goes
    build_manifest(root, excludes, omit=..., mounts=...) -> Manifest (the whole tree in memory)
    scan_flags(root, excludes, omit=..., mounts=...) -> {path: flags}
    compare(source, target) -> list[Difference]
    manifest.digest() -> "sha256:<hex>"

Over 800 lines, kept whole on purpose: it is one format (what a tree holds, and how two
trees differ), read, written and compared by the same `Entry`, whether a stream or a whole
`Manifest` carries it; the parts would only import each other's private helpers.

Streams are what scales: a tree of millions of entries is read in path byte
order and compared with another as both go past (pair_entries), so nothing
holds a whole tree (copy/verify.py: a first sync of 3 million files peaked
at 104 MiB, its tools and readers included; bench/README.md). A `Manifest` holds every entry, for
small trees and the tests, and gives the same entries and the same digest.

One `Entry` per file, directory, symlink, FIFO, socket or device node under
`root`, keyed by its path as the server sees it (`/`, `/etc/shadow`). Paths are
bytes-safe: names that are not UTF-8 are kept as surrogate-escaped `str`
(`os.fsdecode`), which JSON carries as `\\udcXX` escapes and which turns back
into the same bytes.

The walk stays on the root's filesystem. A directory on another device is a
mount point: it is recorded (with the attributes of the mounted root, as
`rsync -x` and `tar --one-file-system` copy it) and entered only when listed in
`mounts`. `excludes` names directories whose *contents* are left out
(`/proc`, `/tmp`: the directory itself stays); `omit` names entries left out
altogether (swap files).

What is recorded, and compared:
- type, mode (with setuid/setgid/sticky), uid and gid as numbers, mtime in ns;
- regular files: size and a SHA-256 hash list of the content (`sha256`, see
  HASH_BLOCK: the same bytes give the same value whatever the holes, and
  holes are not read); symlinks: the target;
  device nodes: major and minor;
- POSIX ACLs (access and default) decoded from their xattrs, and every other
  xattr (`security.selinux`, `security.capability`, `user.*`), sorted, except
  XFS's own copies of the ACLs (XFS_ACL_XATTRS);
- inode flags (chattr/lsattr) of regular files and directories, as lsattr's
  letters: the ones tasks/lib/inodeflags.py calls RECORDED (not e, I, N: the
  filesystem's own bookkeeping). A copy compares them through a view of each
  source entry (copy/flags.py: _expected_entry) that says what the target is
  to hold: it leaves out the flags deferred to the fix stage (i, a) and those
  the target filesystem does not keep, and the receipt lists both;
- hard links: `link`, the first path (in byte order) of the entry's inode
  group, set on every member when at least two recorded paths share an inode.
  Link counts are not compared: a link outside the recorded area changes them.
- sparse files: `sparse`, whether the file has a hole (fewer blocks allocated
  than its size, and SEEK_DATA/SEEK_HOLE find one). It is compared one way only: a sparse source file must stay sparse,
  but a target may be sparser than its source, because `rsync -S` and
  `tar --sparse` punch holes where the source had allocated zeros. Exact
  block counts differ between filesystems anyway.

Directories: the size (a filesystem's bookkeeping) is not recorded; the mtime
is, and compared, because both copy methods set directory times after filling
the directory (copy.py checks this). atime and ctime are never compared: reading
changes the one, and nothing can set the other. The root entry `/` of a tree is
the mounted filesystem's root, so its mode, owner, xattrs and mtime count too.

The digest is the SHA-256 of the canonical JSON of every compared field
(everything but `sparse`, the one-way property), so two trees that compare
equal have the same digest; the view of the source a copy compared with has
the digest of what it says (Tally adds it up as the entries go past).

Entries are read and hashed in batches by a thread pool: hashlib and read()
let go of the GIL, so big files use both cores. For many small files the
Python work per entry holds the GIL as long as the system calls take, so
`read_entries(apart=True)` reads in a child interpreter (its own GIL) that
sends its entries down a pipe: copy/verify.py reads the source and the
target with one each and compares what they send.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from tasks.lib import inodeflags
from tasks.lib.runner import P2VError

MANIFEST_FORMAT = "p2v-manifest"
MANIFEST_VERSION = 2  # 2: inode flags

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
# XFS shows root its on-disk form of the POSIX ACLs as these trusted.* names
# next to the system.posix_acl_* ones: the same ACLs, already recorded. An
# ext4 tree has them only if a copy carried them over as plain xattrs (copy.py
# does not), so they are left out on every filesystem.
XFS_ACL_XATTRS = frozenset({"trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT"})

# Work handed to one pool task: many small files, or one slice of big ones.
BATCH_ENTRIES = 256
BATCH_BYTES = 64 << 20
# File content is hashed per 1 MiB block, then the list of block hashes is
# hashed: a block that lies in a hole is known to hash to _ZERO_BLOCK without
# being read, and a file gets the same hash whatever its holes (rsync -S and
# tar --sparse punch holes where the source had written zeros). Not sha256sum's
# value, on purpose: a 1 TB sparse /var/log/lastlog costs nothing to hash.
HASH_BLOCK = 1 << 20
_ZERO_BLOCK = hashlib.sha256(bytes(HASH_BLOCK)).digest()
DEFAULT_WORKERS = 4
IN_FLIGHT_PER_WORKER = 4  # batches read ahead per worker while the consumer catches up
PIPE_BYTES = 1 << 20  # a child interpreter's pipe (F_SETPIPE_SZ): a few batches of entries
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PR_SET_PDEATHSIG = 1
PROJECT_DIR = Path(__file__).resolve().parents[2]

_TYPES = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
)

# POSIX ACL xattr layout (linux/posix_acl_xattr.h): a version, then (tag, perm, id) entries.
_ACL_VERSION = 2
_ACL_TAGS = {0x01: ("user", False), 0x02: ("user", True), 0x04: ("group", False), 0x08: ("group", True),
             0x10: ("mask", False), 0x20: ("other", False)}  # fmt: skip


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Entry:
    path: str  # "/" or "/etc/shadow", surrogate-escaped
    type: str  # file dir symlink fifo socket char block
    mode: int  # permission bits with setuid/setgid/sticky
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0  # regular files only
    sha256: str | None = None  # regular files only
    target: str | None = None  # symlinks only, surrogate-escaped
    rdev: tuple[int, int] | None = None  # char and block devices: (major, minor)
    acl_access: str | None = None  # "user::rw-,user:4242:rw-,group::r--,mask::rw-,other::r--"
    acl_default: str | None = None
    xattrs: tuple[tuple[str, str], ...] = ()  # (name, hex value), sorted, without the ACLs
    link: str | None = None  # first path of the hard-link group
    sparse: bool = False  # regular file with a hole
    flags: str = ""  # inode flags of files and directories, lsattr's letters ("ia"); see inodeflags.RECORDED

    def to_json(self) -> dict[str, Any]:
        data = self.comparable()
        data["sparse"] = self.sparse
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        rdev = data.get("rdev")
        return cls(**{**data, "rdev": tuple(rdev) if rdev is not None else None,
                      "xattrs": tuple(sorted(data.get("xattrs", {}).items()))})

    def comparable(self) -> dict[str, Any]:
        """The fields that must be equal in a faithful copy (the digest's input): all but `sparse`."""
        return {
            "path": self.path, "type": self.type, "mode": self.mode, "uid": self.uid, "gid": self.gid,
            "mtime_ns": self.mtime_ns, "size": self.size, "sha256": self.sha256, "target": self.target,
            "rdev": list(self.rdev) if self.rdev is not None else None, "acl_access": self.acl_access,
            "acl_default": self.acl_default, "xattrs": dict(self.xattrs), "link": self.link, "flags": self.flags,
        }


@dataclass(frozen=True)
class Manifest:
    root: str  # where it was read, for messages only (not in the digest)
    entries: dict[str, Entry]  # path -> entry, in path byte order
    excludes: tuple[str, ...] = ()
    omit: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ()
    stats: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def files(self) -> int:
        """Entries of every type, the root included."""
        return len(self.entries)

    @property
    def regular_files(self) -> int:
        return sum(1 for e in self.entries.values() if e.type == "file")

    @property
    def total_bytes(self) -> int:
        """Apparent size of the regular files, each inode counted once."""
        return sum(e.size for e in self.entries.values() if e.type == "file" and e.link in (None, e.path))

    def canonical_json(self) -> bytes:
        rows = [entry.comparable() for entry in self.entries.values()]
        return json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def digest(self) -> str:
        """The SHA-256 of canonical_json(), computed as Tally computes it for a stream."""
        tally = Tally()
        for entry in self.entries.values():
            tally.add(entry)
        return tally.digest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "root": self.root, "digest": self.digest(),
            "excludes": list(self.excludes), "omit": list(self.omit), "mounts": list(self.mounts),
            "entries": [entry.to_json() for entry in self.entries.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise P2VError(f"not a version {MANIFEST_VERSION} p2v manifest: format {data.get('format')!r}, "
                           f"version {data.get('version')!r}")
        entries = [Entry.from_json(row) for row in data["entries"]]
        return cls(root=data["root"], entries=_sorted(entries), excludes=tuple(data["excludes"]),
                   omit=tuple(data["omit"]), mounts=tuple(data["mounts"]))

    def write(self, path: Path) -> None:
        # ensure_ascii keeps surrogate-escaped names intact (as \\udcXX).
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_json(json.loads(path.read_text()))


class Tally:
    """What a stream of entries in path order adds up to, without holding it: counts, bytes, the digest.

    The digest is Manifest.digest()'s: the SHA-256 of the canonical JSON list
    of the entries' comparable fields, fed one row at a time (`[`, the rows
    joined by `,`, `]` is what json.dumps writes for the list).
    """

    def __init__(self) -> None:
        self.files = 0  # entries of every type, the root included
        self.regular_files = 0
        self.total_bytes = 0  # apparent size of the regular files, each inode counted once
        self._hash = hashlib.sha256(b"[")
        self._separator = b""

    def add(self, entry: Entry) -> None:
        self.files += 1
        if entry.type == "file":
            self.regular_files += 1
            if entry.link in (None, entry.path):
                self.total_bytes += entry.size
        self._hash.update(self._separator)
        self._hash.update(json.dumps(entry.comparable(), sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=True).encode())
        self._separator = b","

    def digest(self) -> str:
        done = self._hash.copy()
        done.update(b"]")
        return "sha256:" + done.hexdigest()


@dataclass(frozen=True)
class Difference:
    path: str
    what: str  # "missing", "extra", or the field that differs ("mode", "xattr user.x", ...)
    source: str = ""  # rendered values
    target: str = ""

    def __str__(self) -> str:
        if self.what in ("missing", "extra"):
            return f"{self.what}: {shown(self.path)}"
        return f"{shown(self.path)}: {self.what} {self.source} != {self.target}"


# ---------------------------------------------------------------- paths


def shown(path: str) -> str:
    """A path for a message: non-UTF-8 bytes as \\xNN, newlines as \\n."""
    return os.fsencode(path).decode("utf-8", "backslashreplace").replace("\n", "\\n")


def normalize(path: str) -> str:
    """`proc`, `/proc/`, `./proc` -> `/proc`; `` and `.` -> `/`."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise P2VError(f"path {path!r} must not contain '..'")
    return "/" + "/".join(parts)


def _sort_key(path: str) -> bytes:
    return os.fsencode(path)


def _sorted(entries: Iterable[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in sorted(entries, key=lambda e: _sort_key(e.path))}


# ---------------------------------------------------------------- reading one entry


def acl_text(value: bytes) -> str:
    """A POSIX ACL xattr in getfacl's short form; undecodable values as hex."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != _ACL_VERSION:
        return "hex:" + value.hex()
    parts = []
    for offset in range(4, len(value), 8):
        tag, perm, ident = struct.unpack_from("<HHI", value, offset)
        if tag not in _ACL_TAGS:
            return "hex:" + value.hex()
        name, qualified = _ACL_TAGS[tag]
        perms = "".join(char if perm & bit else "-" for bit, char in ((4, "r"), (2, "w"), (1, "x")))
        parts.append(f"{name}:{ident if qualified else ''}:{perms}")
    return ",".join(parts)


def _type_of(mode: int) -> str:
    for test, name in _TYPES:
        if test(mode):
            return name
    return "unknown"


def _xattrs(where: bytes | int) -> tuple[str | None, str | None, tuple[tuple[str, str], ...]]:
    """(access ACL, default ACL, other xattrs) of a path (not followed) or an open file."""
    follow = isinstance(where, int)  # an fd: follow_symlinks must stay True
    try:
        names = os.listxattr(where, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None, None, ()
        raise
    if not names:
        return None, None, ()
    access = default = None
    others = []
    for name in sorted(names):
        if name in XFS_ACL_XATTRS:
            continue
        try:
            value = os.getxattr(where, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
        if name == ACL_ACCESS:
            access = acl_text(value)
        elif name == ACL_DEFAULT:
            default = acl_text(value)
        else:
            others.append((name, value.hex()))
    return access, default, tuple(others)


def _open_for_reading(full: bytes) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(full, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the owner or CAP_FOWNER
        return os.open(full, flags)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of a file that hold data; everything else is a hole."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            offset = end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after offset: the rest is a hole
            return ranges
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here: all data
            return [(0, size)] if size else []
        raise
    return ranges


def _blocks_with_data(ranges: Sequence[tuple[int, int]]) -> set[int]:
    found: set[int] = set()
    for start, end in ranges:
        found.update(range(start // HASH_BLOCK, (end - 1) // HASH_BLOCK + 1))
    return found


def _content(fd: int, full: bytes, info: os.stat_result, view: memoryview) -> tuple[str, bool]:
    """(content hash, has a hole) of an open regular file; see HASH_BLOCK."""
    size = info.st_size
    if info.st_blocks * 512 < size:  # fewer blocks than bytes: look for holes
        ranges = _data_ranges(fd, size)
        sparse = ranges != [(0, size)]
        with_data = _blocks_with_data(ranges)
    else:  # as many blocks as bytes: no hole worth the name
        sparse = False
        with_data = None
    hash_list = hashlib.sha256()
    for block in range((size + HASH_BLOCK - 1) // HASH_BLOCK):
        offset = block * HASH_BLOCK
        length = min(HASH_BLOCK, size - offset)
        if with_data is not None and block not in with_data:
            hash_list.update(_ZERO_BLOCK if length == HASH_BLOCK else hashlib.sha256(bytes(length)).digest())
            continue
        got = 0
        while got < length:
            count = os.preadv(fd, [view[got:length]], offset + got)
            if not count:
                raise P2VError(f"{shown(os.fsdecode(full))} shrank while being read")
            got += count
        hash_list.update(hashlib.sha256(view[:length]).digest())
    return hash_list.hexdigest(), sparse


def _describe(root: bytes, path: bytes, info: os.stat_result, view: memoryview) -> Entry:
    full = root + path if path != b"/" else root  # root "/" gives "//etc": fine for the kernel
    mode = info.st_mode
    size, sha, sparse, target, rdev = 0, None, False, None, None
    if stat.S_ISREG(mode):
        kind = "file"
        fd = _open_for_reading(full)
        try:
            access, default, xattrs = _xattrs(fd)
            flags = inodeflags.read_flags(fd)
            sha, sparse = _content(fd, full, info, view)
        finally:
            os.close(fd)
        size = info.st_size
    else:
        kind = _type_of(mode)
        access, default, xattrs = _xattrs(full)
        flags = _directory_flags(full) if kind == "dir" else 0
        if kind == "symlink":
            target = os.fsdecode(os.readlink(full))
        elif kind in ("char", "block"):
            rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
    return Entry(path=os.fsdecode(path), type=kind, mode=stat.S_IMODE(mode), uid=info.st_uid, gid=info.st_gid,
                 mtime_ns=info.st_mtime_ns, size=size, sha256=sha, target=target, rdev=rdev, acl_access=access,
                 acl_default=default, xattrs=xattrs, sparse=sparse, flags=inodeflags.letters(flags))


def _directory_flags(full: bytes) -> int:
    fd = _open_for_reading(full)
    try:
        return inodeflags.read_flags(fd)
    finally:
        os.close(fd)


def _describe_batch(root: bytes, batch: list[tuple[bytes, os.stat_result]]) -> list[Entry]:
    view = memoryview(bytearray(HASH_BLOCK))
    entries = []
    for path, info in batch:
        try:
            entries.append(_describe(root, path, info, view))
        except FileNotFoundError:
            continue  # removed since the walk saw it (a live tree); the compare will tell
        except OSError as exc:
            raise P2VError(f"cannot read {shown(os.fsdecode(path))} under {os.fsdecode(root)}: {exc.strerror}") \
                from None
    return entries


# ---------------------------------------------------------------- walking


def _walk(root: bytes, excludes: frozenset[bytes], omit: frozenset[bytes],
          mounts: frozenset[bytes]) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path, lstat) of every entry, staying on the filesystems asked for, in path byte order.

    Byte order of whole paths is not a depth-first walk with sorted names
    (`/a.b` < `/a/x`, yet `a` < `a.b`), so each directory's listing sorts its
    entries by name and the subtree of a subdirectory by its name plus `/`:
    every path under `a` starts with `a/`, so the subtree goes exactly there.
    Only the listings of the directories on the current path are held.
    """
    try:
        top = os.lstat(root)
    except OSError as exc:
        raise P2VError(f"cannot read {os.fsdecode(root)}: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        raise P2VError(f"{os.fsdecode(root)} is not a directory")
    yield b"/", top

    def listing(directory: bytes, device: int) -> Iterator[tuple[bytes, bytes, os.stat_result, bool]]:
        """(sort key, path, lstat, whether it is a subtree to enter) of a directory's children."""
        if (directory or b"/") in excludes:
            return iter(())
        try:
            scan = os.scandir(root + directory if directory else root)
        except OSError as exc:
            raise P2VError(f"cannot list {shown(os.fsdecode(directory or b'/'))} under {os.fsdecode(root)}: "
                           f"{exc.strerror}") from None
        items = []
        with scan:
            for child in scan:
                path = directory + b"/" + child.name
                if path in omit:
                    continue
                try:
                    info = child.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                items.append((child.name, path, info, False))
                if stat.S_ISDIR(info.st_mode) and path not in excludes and \
                        (info.st_dev == device or path in mounts):
                    items.append((child.name + b"/", path, info, True))
        items.sort(key=lambda item: item[0])
        return iter(items)

    open_directories = [listing(b"", top.st_dev)]
    while open_directories:
        item = next(open_directories[-1], None)
        if item is None:
            open_directories.pop()
        elif item[3]:
            open_directories.append(listing(item[1], item[2].st_dev))
        else:
            yield item[1], item[2]


def scan_flags(
    root: str | os.PathLike[str],
    excludes: Sequence[str] = (),
    *,
    omit: Sequence[str] = (),
    mounts: Sequence[str] = (),
) -> dict[str, int]:
    """The recorded inode flags of every file and directory that has any, walked as build_manifest walks.

    No content is read: an open, an ioctl and a close per file or directory.
    """
    top = os.fsencode(os.path.abspath(root))
    found: dict[str, int] = {}
    walked = _walk(top, frozenset(os.fsencode(normalize(p)) for p in excludes),
                   frozenset(os.fsencode(normalize(p)) for p in omit),
                   frozenset(os.fsencode(normalize(p)) for p in mounts))
    for path, info in walked:
        if not inodeflags.has_flags(info.st_mode):
            continue
        full = top + path if path != b"/" else top
        try:
            fd = _open_for_reading(full)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise P2VError(f"cannot read the flags of {shown(os.fsdecode(path))} under {os.fsdecode(top)}: "
                           f"{exc.strerror}") from None
        try:
            flags = inodeflags.read_flags(fd)
        finally:
            os.close(fd)
        if flags:
            found[os.fsdecode(path)] = flags
    return found


def _batches(items: Iterable[tuple[bytes, os.stat_result]]) -> Iterator[list[tuple[bytes, os.stat_result]]]:
    batch: list[tuple[bytes, os.stat_result]] = []
    size = 0
    for item in items:
        info = item[1]
        if stat.S_ISREG(info.st_mode):
            size += info.st_size
        batch.append(item)
        if len(batch) >= BATCH_ENTRIES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _link_groups(items: Iterable[tuple[bytes, os.stat_result]]) -> dict[bytes, bytes]:
    """path -> first path of its inode, for inodes that two or more recorded paths share.

    Only entries with a link count above one are held while walking.
    """
    groups: dict[tuple[int, int], list[bytes]] = {}
    for path, info in items:
        if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
            groups.setdefault((info.st_dev, info.st_ino), []).append(path)
    first: dict[bytes, bytes] = {}
    for paths in groups.values():
        if len(paths) > 1:
            leader = min(paths)
            for path in paths:
                first[path] = leader
    return first


def _describe_in_inode_order(root: bytes, batch: list[tuple[bytes, os.stat_result]],
                             links: Mapping[bytes, bytes]) -> list[Entry]:
    """A batch of consecutive entries, read in inode order (a filesystem puts data near its inode, and a
    tree that tar or rsync filled in directory order has its inodes in no name order), returned in path order."""
    order = sorted(range(len(batch)), key=lambda n: (batch[n][1].st_dev, batch[n][1].st_ino))
    described = _describe_batch(root, [batch[n] for n in order])
    described.sort(key=lambda entry: _sort_key(entry.path))
    return [replace(e, link=os.fsdecode(links[key])) if (key := os.fsencode(e.path)) in links else e
            for e in described]


def iter_entries(
    root: str | os.PathLike[str],
    excludes: Sequence[str] = (),
    *,
    omit: Sequence[str] = (),
    mounts: Sequence[str] = (),
    workers: int = DEFAULT_WORKERS,
) -> Generator[Entry, None, None]:
    """Every entry under `root`, as build_manifest records it, in path byte order, without holding the tree.

    Two walks: the first (stat only) finds the hard-link groups, so that each
    entry leaves with its `link`; the second reads the entries, a few batches
    at a time in a thread pool. Held at once: the listings of the directories
    on the walk's path, the entries whose inode has more than one link, and
    the batches in flight.
    """
    top = os.fsencode(os.path.abspath(root))
    sets = (frozenset(os.fsencode(normalize(p)) for p in excludes), frozenset(os.fsencode(normalize(p)) for p in omit),
            frozenset(os.fsencode(normalize(p)) for p in mounts))
    links = _link_groups(_walk(top, *sets))
    in_flight: collections.deque[concurrent.futures.Future[list[Entry]]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="manifest") as pool:
        try:
            for batch in _batches(_walk(top, *sets)):
                in_flight.append(pool.submit(_describe_in_inode_order, top, batch, links))
                while len(in_flight) > IN_FLIGHT_PER_WORKER * max(1, workers):
                    yield from in_flight.popleft().result()
            while in_flight:
                yield from in_flight.popleft().result()
        finally:
            for future in in_flight:  # a consumer that stops early: no more reading
                future.cancel()


def build_manifest(
    root: str | os.PathLike[str],
    excludes: Sequence[str] = (),
    *,
    omit: Sequence[str] = (),
    mounts: Sequence[str] = (),
    workers: int = DEFAULT_WORKERS,
) -> Manifest:
    """Read every entry under `root` into memory (see the module doc for what each argument leaves out).

    For trees of any size, iter_entries (or read_entries) streams the same entries instead.
    """
    return _collected(root, excludes, omit, mounts, lambda: contextlib.nullcontext(
        iter_entries(root, excludes, omit=omit, mounts=mounts, workers=workers)))


def _collected(root: str | os.PathLike[str], excludes: Sequence[str], omit: Sequence[str], mounts: Sequence[str],
               reading: Callable[[], contextlib.AbstractContextManager[Iterator[Entry]]]) -> Manifest:
    started = time.monotonic()
    with reading() as stream:
        entries = {entry.path: entry for entry in stream}
    return Manifest(
        root=os.fsdecode(os.fsencode(os.path.abspath(root))), entries=entries,
        excludes=tuple(normalize(p) for p in excludes), omit=tuple(normalize(p) for p in omit),
        mounts=tuple(normalize(p) for p in mounts), stats={"seconds": time.monotonic() - started},
    )


# ---------------------------------------------------------------- comparing


def _mtime(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    try:
        moment = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{ns} ns"
    return f"{moment}.{fraction:09d}Z"


def _render(name: str, value: Any) -> str:
    if value is None:
        return "(none)"
    if name == "mode":
        return f"{value:04o}"
    if name == "mtime_ns":
        return _mtime(value)
    if name == "sha256":
        return str(value)[:16]
    if name in ("target", "link"):
        return shown(value)
    if name == "rdev":
        return f"{value[0]}:{value[1]}"
    if name == "sparse":
        return "yes" if value else "no"
    if name == "flags":
        return value or "-"
    if name == "xattr":
        return str(value) if len(value) <= 40 else str(value)[:40] + "…"
    return str(value)


_LABELS = {"mtime_ns": "mtime", "acl_access": "access ACL", "acl_default": "default ACL", "link": "hard link to",
           "rdev": "device"}
_COMPARED = ("mode", "uid", "gid", "size", "sha256", "target", "rdev", "acl_access", "acl_default", "link",
             "mtime_ns", "flags")


def compare_entries(source: Entry, target: Entry) -> list[Difference]:
    path = source.path
    if source.type != target.type:
        return [Difference(path, "type", source.type, target.type)]
    found = []
    for name in _COMPARED:
        a, b = getattr(source, name), getattr(target, name)
        if a != b:
            found.append(Difference(path, _LABELS.get(name, name), _render(name, a), _render(name, b)))
    theirs = dict(target.xattrs)
    ours = dict(source.xattrs)
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            found.append(Difference(path, f"xattr {name}", _render("xattr", ours.get(name)),
                                    _render("xattr", theirs.get(name))))
    if source.sparse and not target.sparse:
        found.append(Difference(path, "sparse", "yes", "no"))
    return found


def _in_order(entries: Iterable[Entry], side: str) -> Iterator[tuple[bytes, Entry]]:
    previous: bytes | None = None
    for entry in entries:
        key = _sort_key(entry.path)
        if previous is not None and key <= previous:
            raise P2VError(f"the {side} entries are not in path order: {shown(entry.path)} after "
                           f"{shown(os.fsdecode(previous))}")
        previous = key
        yield key, entry


def pair_entries(source: Iterable[Entry], target: Iterable[Entry]) -> Iterator[tuple[Entry | None, Entry | None]]:
    """Two streams in path byte order, merged: (source entry, target entry) per path, None where a side has none.

    An entry out of order (which would pair wrongly) is a P2VError.
    """
    ours, theirs = _in_order(source, "source"), _in_order(target, "target")
    mine, other = next(ours, None), next(theirs, None)
    while mine is not None or other is not None:
        if other is None or (mine is not None and mine[0] < other[0]):
            assert mine is not None
            yield mine[1], None
            mine = next(ours, None)
        elif mine is None or other[0] < mine[0]:
            yield None, other[1]
            other = next(theirs, None)
        else:
            yield mine[1], other[1]
            mine, other = next(ours, None), next(theirs, None)


def compare_pair(ours: Entry | None, theirs: Entry | None) -> list[Difference]:
    """What differs at one path of pair_entries."""
    if theirs is None:
        assert ours is not None
        return [Difference(ours.path, "missing")]
    if ours is None:
        return [Difference(theirs.path, "extra")]
    return compare_entries(ours, theirs)


def compare(source: Manifest, target: Manifest) -> list[Difference]:
    """What the target lacks or has differently, in path order. Empty when the copy is faithful."""
    def ordered(manifest: Manifest) -> list[Entry]:
        return sorted(manifest.entries.values(), key=lambda entry: _sort_key(entry.path))

    return [difference for ours, theirs in pair_entries(ordered(source), ordered(target))
            for difference in compare_pair(ours, theirs)]


def render_differences(differences: Sequence[Difference], limit: int = 20) -> str:
    lines = [str(d) for d in differences[:limit]]
    if len(differences) > limit:
        lines.append(f"... and {len(differences) - limit} more")
    return "\n".join(lines)


# ---------------------------------------------------------------- in a child interpreter


@contextlib.contextmanager
def read_entries(
    root: str | os.PathLike[str],
    excludes: Sequence[str] = (),
    *,
    omit: Sequence[str] = (),
    mounts: Sequence[str] = (),
    apart: bool = False,
) -> Iterator[Iterator[Entry]]:
    """iter_entries, here or (`apart`) in a child interpreter with its own GIL: two of those use two cores.

    The child sends batches of entries down a pipe as it reads them; a full
    pipe stops it, so neither side holds more than a few batches.
    """
    if not apart:
        stream = iter_entries(root, excludes, omit=omit, mounts=mounts)
        try:
            yield stream
        finally:
            stream.close()
        return
    with tempfile.TemporaryFile(prefix="p2v-manifest-") as errors, _stream_apart(
            [os.fspath(root), "--stream", *(f"--exclude={p}" for p in excludes),
             *(f"--omit={p}" for p in omit), *(f"--mount={p}" for p in mounts)], errors) as pipe:
        yield _received(pipe, errors)


@contextlib.contextmanager
def _stream_apart(arguments: Sequence[str], errors: IO[bytes]) -> Iterator[IO[bytes]]:
    # -c, not -m: `tasks` imports this module before -m would run it again.
    argv = [sys.executable, "-c", "import sys; from tasks.lib.manifest import main; sys.exit(main())", *arguments]
    child = subprocess.Popen(argv, cwd=PROJECT_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
    assert child.stdout is not None
    with contextlib.suppress(OSError):  # room for a few batches: the reader and the child go at their own pace
        fcntl.fcntl(child.stdout.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
    try:
        yield child.stdout
    finally:
        child.stdout.close()  # a child still writing gets EPIPE and stops
        if child.poll() is None:
            child.terminate()
        child.wait()


def _received(pipe: IO[bytes], errors: IO[bytes]) -> Iterator[Entry]:
    while True:
        try:
            # Written by our own child, from our own code: nothing foreign is unpickled.
            batch = pickle.load(pipe)  # noqa: S301
        except EOFError:
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
            raise P2VError(lines[-1].removeprefix("manifest: ") if lines else
                           "the manifest's child interpreter stopped without a word") from None
        if batch is None:
            return
        for row in batch:
            yield Entry(*row)


def _send(entries: Iterable[Entry], pipe: IO[bytes]) -> None:
    batch: list[tuple[Any, ...]] = []
    for entry in entries:
        batch.append(tuple(vars(entry).values()))
        if len(batch) >= BATCH_ENTRIES:
            pickle.dump(batch, pipe, protocol=pickle.HIGHEST_PROTOCOL)
            batch = []
    if batch:
        pickle.dump(batch, pipe, protocol=pickle.HIGHEST_PROTOCOL)
    pickle.dump(None, pipe)  # the end: anything short of it is a failure
    pipe.flush()


def _die_with_reader() -> None:
    """Be killed when the reader (the parent) dies, even while walking without writing: a write would
    fail with EPIPE, but the first walk (hard-link groups) writes nothing for a while."""
    reader = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != reader:  # it died before prctl
        os._exit(1)


def build_manifest_apart(
    root: str | os.PathLike[str],
    excludes: Sequence[str] = (),
    *,
    omit: Sequence[str] = (),
    mounts: Sequence[str] = (),
) -> Manifest:
    """build_manifest in a child interpreter: two of these at once use two cores."""
    return _collected(root, excludes, omit, mounts,
                      lambda: read_entries(root, excludes, omit=omit, mounts=mounts, apart=True))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.lib.manifest",
                                     description="Print the digest of a tree's manifest (and save it).")
    parser.add_argument("root")
    parser.add_argument("--exclude", action="append", default=[], help="leave out this directory's contents")
    parser.add_argument("--omit", action="append", default=[], help="leave out this entry")
    parser.add_argument("--mount", action="append", default=[], help="enter the filesystem mounted here")
    parser.add_argument("--json", type=Path, help="save the manifest as JSON")
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)  # for read_entries(apart=True)
    args = parser.parse_args(argv)
    try:
        if args.stream:
            _die_with_reader()
            try:
                _send(iter_entries(args.root, args.exclude, omit=args.omit, mounts=args.mount), sys.stdout.buffer)
            except BrokenPipeError:  # the reader stopped early
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        manifest = build_manifest(args.root, args.exclude, omit=args.omit, mounts=args.mount)
    except P2VError as error:
        print(f"manifest: {error}", file=sys.stderr)
        return 1
    if args.json:
        manifest.write(args.json)
    print(f"{manifest.digest()} {manifest.files} entries, {manifest.regular_files} files, "
          f"{manifest.total_bytes} bytes, {manifest.stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
