"""Inode flags (what chattr sets and lsattr shows): which ones p2v keeps, and reading and setting them.

    read_flags(fd) -> int                  FS_IOC_GETFLAGS, masked to RECORDED
    letters(bits) -> "ia"                  lsattr's letters, in lsattr's order
    bits_of("ia") -> int
    apply_flags(fd, want, mask) -> (flags, refused)   FS_IOC_SETFLAGS, then read back
    open_entry(root, path) -> fd | None    a file or directory of a tree, never followed out of it

Neither tar nor rsync copies these flags (GNU tar has no notion of them, rsync
only with a BSD patch), so p2v reads them from the source and sets them on the
target itself. What is kept, and why:

- RECORDED: every flag that is an attribute someone gave the file: s u S D i a
  d A c E j t T C x F P V m. The manifest records them and the copy's
  verification compares them.
- Not recorded: e (extents), I (hashed directory index), N (inline data) and
  the flags without a letter (huge file, EA inode, EOF blocks). The filesystem
  sets them itself from its own features (which the disk plan pins to the
  source's), not from anything the server's administrator did; a file copied
  from ext3 into ext4 gets `e`, and that loses nothing.
- DEFERRED: i (immutable) and a (append-only). The fix stage and its package
  installs must still be able to write, so the sync stage leaves them off and
  lists them as pending; the fix stage sets them as its very last act and reads
  them back (tasks/fix.py).

Which target filesystem keeps what is found out by asking it: p2v sets the
flags and reads them back. Measured with Linux 6.x: ext2/3/4 keep s u S i a d
A c j t x on files and also D T P on directories (j needs CAP_SYS_RESOURCE);
xfs keeps S i a d A x, and P on directories. C (no copy-on-write) is btrfs's
alone, E (fscrypt) and V (fs-verity) cannot be set by FS_IOC_SETFLAGS at all,
and F (casefold) only on an empty directory. A flag the target does not keep
is never dropped silently: it is listed, with the kernel's reason, as a
warning in the copy's receipt, and left out of what the verification expects.

Only regular files and directories have flags here (as for lsattr): opening
a device node or a FIFO to ask would open the device or block.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from tasks.lib.paths import resolve_in_root
from tasks.lib.runner import P2VError

# linux/fs.h: _IOR('f', 1, long) and _IOW('f', 2, long); the kernel reads and writes an int.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602

# (bit, letter, what), in lsattr's order (e2fsprogs lib/e2p/pf.c).
FLAGS: tuple[tuple[int, str, str], ...] = (
    (0x00000001, "s", "secure deletion"),
    (0x00000002, "u", "undeletable"),
    (0x00000008, "S", "synchronous updates"),
    (0x00010000, "D", "synchronous directory updates"),
    (0x00000010, "i", "immutable"),
    (0x00000020, "a", "append only"),
    (0x00000040, "d", "no dump"),
    (0x00000080, "A", "no atime updates"),
    (0x00000004, "c", "compressed"),
    (0x00000800, "E", "encrypted"),
    (0x00004000, "j", "data journalling"),
    (0x00001000, "I", "indexed directory"),
    (0x00008000, "t", "no tail-merging"),
    (0x00020000, "T", "top of directory hierarchies"),
    (0x00080000, "e", "extents"),
    (0x00800000, "C", "no copy on write"),
    (0x02000000, "x", "DAX"),
    (0x40000000, "F", "casefold"),
    (0x10000000, "N", "inline data"),
    (0x20000000, "P", "project hierarchy"),
    (0x00100000, "V", "verity"),
    (0x00000400, "m", "no compression"),
)
_BY_LETTER = {letter: bit for bit, letter, _ in FLAGS}
_NAMES = {bit: what for bit, _, what in FLAGS}
# How the filesystem stores the file, set by the filesystem itself: not recorded (module doc).
FORMAT_LETTERS = "IeN"
RECORDED = sum(bit for bit, letter, _ in FLAGS if letter not in FORMAT_LETTERS)
DEFERRED = _BY_LETTER["i"] | _BY_LETTER["a"]

# What a filesystem without flags (or a file type without them) answers.
_NO_FLAGS = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
# What a filesystem answers for a flag it will not take.
_REFUSED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EPERM, errno.ENOTEMPTY, errno.EACCES)


def letters(bits: int) -> str:
    """The flags as lsattr's letters in lsattr's order ("" for none; unnamed bits are left out)."""
    return "".join(letter for bit, letter, _ in FLAGS if bits & bit)


def bits_of(text: str) -> int:
    """lsattr letters -> bits; an unknown letter is an error."""
    bits = 0
    for letter in text:
        if letter not in _BY_LETTER:
            raise ValueError(f"unknown inode flag {letter!r}")
        bits |= _BY_LETTER[letter]
    return bits


def describe(bits: int) -> str:
    """"i (immutable), a (append only)" for messages."""
    return ", ".join(f"{letter} ({_NAMES[bit]})" for bit, letter, _ in FLAGS if bits & bit)


def has_flags(mode: int) -> bool:
    """Whether entries of this type have inode flags p2v reads (regular files and directories)."""
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def get_raw(fd: int) -> int | None:
    """Every flag of an open file or directory, or None where the filesystem has none."""
    buffer = bytearray(4)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buffer, True)
    except OSError as error:
        if error.errno in _NO_FLAGS:
            return None
        raise
    (value,) = struct.unpack("I", buffer)
    return int(value)


def read_flags(fd: int) -> int:
    """The recorded flags of an open file or directory (0 where the filesystem has none)."""
    return (get_raw(fd) or 0) & RECORDED


def _set_raw(fd: int, value: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("I", value))


def apply_flags(fd: int, want: int, mask: int = RECORDED) -> tuple[int, dict[int, str]]:
    """Make the flags under `mask` exactly `want` (others untouched); return (recorded flags now, refused).

    One FS_IOC_SETFLAGS when the filesystem takes the whole set; otherwise one
    flag at a time, so that one it refuses does not cost the others. Every
    wanted flag that is not there when read back is in `refused`, with the
    kernel's reason, or "not kept by this filesystem" where it said nothing
    (ext4 ignores D on a file, xfs P on a file).
    """
    want &= mask
    current = get_raw(fd)
    if current is None:
        return 0, {bit: "this filesystem has no inode flags" for bit, _, _ in FLAGS if want & bit}
    goal = (current & ~mask) | want
    refused: dict[int, str] = {}
    if goal != current:
        try:
            _set_raw(fd, goal)
        except OSError as error:
            if error.errno not in _REFUSED:
                raise
            base = current & ~mask
            if base != current:
                with contextlib.suppress(OSError):
                    _set_raw(fd, base)
            for bit, _, _ in FLAGS:
                if want & bit:
                    now = get_raw(fd) or 0
                    try:
                        _set_raw(fd, now | bit)
                    except OSError as one:
                        if one.errno not in _REFUSED:
                            raise
                        refused[bit] = one.strerror or errno.errorcode.get(one.errno or 0, "refused")
    got = (get_raw(fd) or 0) & RECORDED
    for bit, _, _ in FLAGS:
        if want & bit and not got & bit and bit not in refused:
            refused[bit] = "not kept by this filesystem"
    return got, refused


@contextlib.contextmanager
def opened(path: str | bytes | os.PathLike[str]) -> Iterator[int | None]:
    """An fd on a regular file or directory (never followed, never blocking), or None for other types."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        yield None
        return
    if not has_flags(info.st_mode):
        yield None
        return
    try:
        fd = os.open(path, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the owner or CAP_FOWNER
        fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_entry(root: Path, path: str, devices: frozenset[int] | None = None) -> Iterator[int | None]:
    """An fd on the file or directory `path` of the tree at `root` (None if absent or of another type).

    The parent is resolved inside the tree (tasks/lib/paths.py); the entry
    itself is never followed. With `devices`, an entry on any other
    filesystem (a bind mount over the tree, say) is an error, never touched.
    """
    parent = resolve_in_root(root, os.path.dirname(path) or "/")
    name = os.path.basename(path)
    where = parent / name if name else parent
    with opened(where) as fd:
        if fd is not None and devices is not None and os.fstat(fd).st_dev not in devices:
            raise P2VError(f"{path} under {root} is not on the target's filesystems: its inode flags are not set")
        yield fd
