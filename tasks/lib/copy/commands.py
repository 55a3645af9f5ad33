"""The copy's command lines and filters, and the small facts about trees it decides by (pure, or a statvfs)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tasks.lib.copy.model import RSYNC_OPTIONS, TAR_CREATE, TAR_EXTRACT
from tasks.lib.fstab import mount_order
from tasks.lib.manifest import normalize, shown
from tasks.lib.runner import P2VError, output

# ---------------------------------------------------------------- small helpers


def tool_versions() -> dict[str, str]:
    return {tool: output([tool, "--version"]).splitlines()[0].strip() for tool in ("rsync", "tar")}


def _glob_escape(path: str) -> str:
    """Escape the wildcard characters of rsync, tar and find patterns."""
    return "".join("\\" + char if char in "\\*?[" else char for char in path)


def _within(path: str, mountpoint: str) -> str | None:
    """`path` relative to `mountpoint` ("/" for the mountpoint itself), or None if outside."""
    if mountpoint == "/":
        return path
    if path == mountpoint:
        return "/"
    if path.startswith(mountpoint + "/"):
        return path[len(mountpoint):]
    return None


def filesystem_of(path: str, mountpoints: Sequence[str]) -> str | None:
    """The deepest mount point that holds `path`, or None."""
    holders = [mp for mp in mountpoints if _within(path, mp) is not None]
    return max(holders, key=lambda mp: 0 if mp == "/" else mp.count("/") + 1) if holders else None


def assign(paths: Sequence[str], mountpoints: Sequence[str]) -> dict[str, list[str]]:
    """Each path (as the server sees it) to the filesystem that holds it, relative to that filesystem's root."""
    found: dict[str, list[str]] = {mp: [] for mp in mountpoints}
    for path in paths:
        holder = filesystem_of(path, mountpoints)
        if holder is not None:
            relative = _within(path, holder)
            assert relative is not None
            found[holder].append(relative)
    return found


def rsync_filters(excluded_contents: Sequence[str], omitted: Sequence[str]) -> list[str]:
    """rsync --exclude options, anchored at the transfer root (one filesystem)."""
    rules = []
    for relative in excluded_contents:
        prefix = "" if relative == "/" else _glob_escape(relative)
        rules.append(f"--exclude={prefix}/*")
    for relative in omitted:
        # rsync reads a backslash as an escape only in a pattern that has a wildcard.
        literal = _glob_escape(relative) if any(c in relative for c in "*?[") else relative
        rules.append(f"--exclude={literal}")
    return rules


def tar_filters(excluded_contents: Sequence[str], omitted: Sequence[str]) -> list[str]:
    """tar --exclude options for members named ./path."""
    rules = ["--anchored"]
    for relative in excluded_contents:
        prefix = "." if relative == "/" else "." + _glob_escape(relative)
        rules.append(f"--exclude={prefix}/*")
    for relative in omitted:
        rules.append(f"--exclude=.{_glob_escape(relative)}")
    return rules


def rsync_argv(source: Path, target: Path, excluded_contents: Sequence[str], omitted: Sequence[str]) -> list[str]:
    return ["rsync", *RSYNC_OPTIONS, "--itemize-changes", "--stats",
            *rsync_filters(excluded_contents, omitted), f"{source}/", f"{target}/"]


def tar_argvs(source: Path, target: Path, excluded_contents: Sequence[str],
              omitted: Sequence[str]) -> tuple[list[str], list[str]]:
    create = ["tar", *TAR_CREATE, *tar_filters(excluded_contents, omitted), f"--directory={source}", "."]
    extract = ["tar", *TAR_EXTRACT, f"--directory={target}"]
    return create, extract


def _used(path: Path) -> tuple[int, int, int]:
    """(used bytes, used inodes, available bytes) of the filesystem holding `path`."""
    info = os.statvfs(path)
    return ((info.f_blocks - info.f_bfree) * info.f_frsize, info.f_files - info.f_ffree,
            info.f_bavail * info.f_frsize)


def holds_data(directory: Path) -> bool:
    """True when a target filesystem has more than mkfs leaves: lost+found, empty directories, mount points."""
    device = directory.stat().st_dev
    pending = [directory]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if current == directory and entry.name == "lost+found":
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    return True
                if entry.stat(follow_symlinks=False).st_dev == device:
                    pending.append(Path(entry.path))
    return False


# ---------------------------------------------------------------- the copy


def _check_tree(kind: str, root: Path, mountpoints: Sequence[str]) -> None:
    for mp in mountpoints:
        path = root / mp.lstrip("/")
        if not path.is_dir():
            raise P2VError(f"{kind} {shown(str(path))} is not a directory (mount point {mp})")


def _order(mountpoints: Sequence[str]) -> list[str]:
    """Normalized, parents first, no duplicates."""
    normal = [normalize(mp) for mp in mountpoints]
    if len(set(normal)) != len(normal):
        raise P2VError(f"a mount point is listed twice: {', '.join(normal)}")
    return mount_order(normal)
