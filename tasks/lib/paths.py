"""Paths inside a mounted server tree that can never escape it.

A source or target tree is full of absolute symlinks that mean something only
inside that server (`/etc/grub.conf -> /boot/grub/grub.conf`). Followed on the
host, `/etc/fstab -> /etc/shadow` would read or write the host's file, and a
mount point `/srv -> /mnt` would mount over the host's /mnt. Every path into a
tree goes through `resolve_in_root`, which follows links the way the server
itself would, with the tree as `/`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

from tasks.lib.runner import P2VError

MAX_SYMLINKS = 40  # as the kernel's ELOOP limit


def resolve_in_root(root: Path, path: str | PurePosixPath, *, follow_last: bool = True) -> Path:
    """Resolve `path` (absolute, as the server sees it) to a host path under `root`.

    `..` never climbs above `root`, and absolute link targets restart at
    `root`. Components that do not exist yet are kept as they are.
    """
    root = Path(os.path.abspath(root))
    pending = [p for p in PurePosixPath("/", path).parts[1:]]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        is_last = not pending
        if candidate.is_symlink() and (follow_last or not is_last):
            links += 1
            if links > MAX_SYMLINKS:
                raise P2VError(f"too many levels of symbolic links resolving {path} under {root}")
            target = os.readlink(candidate)
            target_parts = list(PurePosixPath(target).parts)
            if target.startswith("/"):
                resolved = []
                target_parts = target_parts[1:]
            pending = target_parts + pending
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def read_text_in_root(root: Path, path: str) -> str | None:
    """A file's text as the server sees it, or None if absent (never the host's)."""
    try:
        real = resolve_in_root(root, path)
        return real.read_text(errors="surrogateescape")
    except (P2VError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None  # absent, or a symlink loop: unreadable on the server too


def _copy_xattrs(source: Path, fd: int) -> None:
    """The replaced file's extended attributes (its SELinux label, capabilities) onto the new one."""
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError:
        return  # no xattr support here: nothing to carry
    for name in names:
        try:
            os.setxattr(fd, name, os.getxattr(source, name, follow_symlinks=False))
        except OSError:
            continue  # e.g. trusted.* without CAP_SYS_ADMIN: a label the copy could not have kept either


def write_text_in_root(root: Path, path: str, text: str, mode: int | None = None) -> Path:
    """Replace `path` (as the server sees it) with `text`, atomically, inside `root`.

    Symlinks are followed inside the tree: a `/etc/fstab -> /etc/shadow`
    writes the tree's /etc/shadow, never the host's. The new content goes to
    a temporary file in the same directory, gets the existing file's mode,
    owner and xattrs (or `mode`, default 0644, for a new file), is synced and
    renamed over the old one, so a crash leaves the old or the new file,
    never half of one. Missing parent directories are made (0755).
    Returns the host path written.
    """
    real = resolve_in_root(root, path)
    if real.is_dir():
        raise P2VError(f"{path} is a directory in the target tree; cannot write it as a file")
    real.parent.mkdir(parents=True, exist_ok=True)
    try:
        existing: os.stat_result | None = os.lstat(real)
    except FileNotFoundError:
        existing = None
    fd, temporary = tempfile.mkstemp(prefix=f".{real.name}.p2v-", dir=real.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8", errors="surrogateescape"))
            handle.flush()
            if existing is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(existing.st_mode))
                if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(handle.fileno(), existing.st_uid, existing.st_gid)
                _copy_xattrs(real, handle.fileno())
            else:
                os.fchmod(handle.fileno(), 0o644 if mode is None else mode)
            os.fsync(handle.fileno())
        os.replace(temporary, real)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(real.parent)
    return real


def remove_in_root(root: Path, path: str) -> bool:
    """Delete `path` inside `root`; a symlink itself is removed, never what it points at.

    Returns whether there was something to delete.
    """
    real = resolve_in_root(root, path, follow_last=False)
    try:
        mode = os.lstat(real).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        raise P2VError(f"{path} is a directory in the target tree; p2v deletes files only")
    real.unlink()
    fsync_directory(real.parent)
    return True


def write_file_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `<path>.partial`, fsync, rename, fsync the directory: readers see the old file or the
    new one, and after a power cut the new name stays (a stamp or doit's state says a stage is done).

    The file is created with `mode` (less the umask): a secret written 0600 is never readable by
    others, not even as the partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # one left by a kill would keep its own mode
    try:
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or an unlink in `directory` durable (the file's own fsync does not)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RootTreeReader:
    """A `tasks.lib.fixes.TreeReader` over a mounted tree: every path resolved inside `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, path: str) -> str | None:
        return read_text_in_root(self.root, path)

    def exists(self, path: str) -> bool:
        try:
            return os.path.lexists(resolve_in_root(self.root, path))
        except P2VError:
            return False

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(resolve_in_root(self.root, path)))
        except (P2VError, OSError):
            return []
