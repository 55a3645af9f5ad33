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
