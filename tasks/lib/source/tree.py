"""`SourceTree`: a read-only view of a mounted source tree whose symlinks never leave it."""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from tasks.lib.paths import resolve_in_root
from tasks.lib.runner import P2VError

# Largest file we read. grub.cfg, modules.dep and friends are far smaller; a
# bigger one is not a configuration file.
MAX_READ = 16 * 1024 * 1024


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


class SourceTree:
    """A read-only view of a tree where every symlink is resolved inside `root`.

    Paths are absolute *tree* paths ("/etc/fstab"). An absolute link target is
    taken relative to `root`, and `..` stops at `root`, as if the tree were
    chrooted. Problems (loops, permissions, huge files) become `warnings`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        """The tree path with every symlink followed inside the tree, or None if missing.

        The walk itself is `tasks.lib.paths.resolve_in_root`, the one place
        that decides how a path inside a server tree is followed.
        """
        try:
            host = resolve_in_root(self.root, path, follow_last=follow_last)
            os.lstat(host)
        except P2VError:
            self.warn(f"{path}: too many levels of symbolic links (ignored)")
            return None
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self.warn(f"{path}: cannot look up ({exc.strerror})")
            return None
        relative = host.relative_to(os.path.abspath(self.root)).as_posix()
        return "/" if relative == "." else "/" + relative

    def host_path(self, path: str) -> Path | None:
        """Where `path` (resolved inside the tree) is on the host, or None if missing."""
        resolved = self.resolve(path)
        if resolved is None:
            return None
        return self.root.joinpath(*_components(resolved))

    def _mode(self, path: str) -> int | None:
        host = self.host_path(path)
        if host is None:
            return None
        try:
            return os.lstat(host).st_mode
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return self._mode(path) is not None

    def is_file(self, path: str) -> bool:
        mode = self._mode(path)
        return mode is not None and stat.S_ISREG(mode)

    def is_dir(self, path: str) -> bool:
        mode = self._mode(path)
        return mode is not None and stat.S_ISDIR(mode)

    def is_symlink(self, path: str) -> bool:
        resolved = self.resolve(path, follow_last=False)
        if resolved is None:
            return False
        try:
            return stat.S_ISLNK(os.lstat(self.root.joinpath(*_components(resolved))).st_mode)
        except OSError:
            return False

    def read_bytes(self, path: str, *, limit: int = MAX_READ) -> bytes | None:
        """The content of a regular file, None when missing (a warning when unreadable)."""
        host = self.host_path(path)
        if host is None:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(host, flags)
        except OSError as exc:
            self.warn(f"{path}: cannot open ({exc.strerror})")
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    self.warn(f"{path}: not a regular file (ignored)")
                return None
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > limit:
                self.warn(f"{path}: larger than {limit} bytes (ignored)")
                return None
            return b"".join(chunks)
        except OSError as exc:
            self.warn(f"{path}: cannot read ({exc.strerror})")
            return None
        finally:
            os.close(fd)

    def read_text(self, path: str, *, limit: int = MAX_READ) -> str | None:
        data = self.read_bytes(path, limit=limit)
        return None if data is None else data.decode("utf-8", errors="replace")

    def listdir(self, path: str) -> list[str]:
        """Names in a directory, sorted; empty when it is missing or not a directory."""
        host = self.host_path(path)
        if host is None:
            return []
        try:
            if not stat.S_ISDIR(os.lstat(host).st_mode):
                return []
            return sorted(os.listdir(host))
        except OSError as exc:
            self.warn(f"{path}: cannot list ({exc.strerror})")
            return []

    def files(self, directory: str, pattern: str = "*") -> list[str]:
        """Regular files (links followed inside the tree) in a directory whose names match."""
        base = directory.rstrip("/")
        return [
            f"{base}/{name}"
            for name in self.listdir(directory)
            if fnmatch.fnmatchcase(name, pattern) and self.is_file(f"{base}/{name}")
        ]

    def first_file(self, paths: Iterable[str]) -> str | None:
        return next((p for p in paths if self.is_file(p)), None)
