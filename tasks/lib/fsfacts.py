"""Filesystem facts read from a block device without mounting it: its features (what the target's
mkfs must match) and whether its journal is clean (ext4 by tune2fs, XFS by xfs_logprint and xfs_db)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tasks.lib.runner import CommandError, P2VError, output, run


class UnknownFeatures(P2VError):
    """A filesystem this machine's tools refuse to open: the message says why, the caller names the filesystem."""


def tune2fs_fields(node: str) -> dict[str, str]:
    """An ext2/3/4 superblock as `tune2fs -l` prints it: field name -> value."""
    result = run(["tune2fs", "-l", node], check=False)
    if result.returncode != 0:
        if "unsupported feature" in result.stderr:
            raise UnknownFeatures(
                "features this machine does not know (tune2fs: Filesystem has unsupported feature(s))",
                hint="convert it from a live system whose kernel and e2fsprogs are at least as new as the server's")
        raise CommandError(result.argv, result.returncode, result.stdout + result.stderr)
    fields = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def xfs_log_state(node: str) -> str:
    """The xfs log's head and tail as `xfs_logprint -t` finds them: `log tail: 2 head: 11 state: <DIRTY>`."""
    lines = [line.strip() for line in output(["xfs_logprint", "-t", node]).splitlines()
             if line.strip().startswith("log tail:")]
    if len(lines) != 1:
        raise P2VError(f"xfs_logprint -t {node} printed {len(lines)} log state lines, not one",
                       hint="is the log external? p2v reads xfs with an internal log only")
    return lines[0]


def ext_needs_recovery(fields: Mapping[str, str]) -> bool:
    return "needs_recovery" in fields.get("Filesystem features", "").split()


def xfs_log_is_clean(state: str) -> bool:
    return state.endswith("state: <CLEAN>")


def unreplayed_journal(fstype: str, node: str) -> str | None:
    """What says that the filesystem's journal holds changes not yet in place; None when it holds none.

    Such changes (a file fsync'ed just before a power cut, a rename) are
    missing from a `ro,noload` / `ro,norecovery` mount: only a journal replay
    puts them where a reader finds them. ext3/4: the needs_recovery feature,
    set while mounted read-write and cleared on a clean unmount; xfs: a log
    whose head is not a clean unmount record.
    """
    if fstype in ("ext2", "ext3", "ext4"):
        return "ext feature needs_recovery" if ext_needs_recovery(tune2fs_fields(node)) else None
    if fstype == "xfs":
        state = xfs_log_state(node)
        return None if xfs_log_is_clean(state) else f"xfs {state}"
    return None


def ext_features(node: str) -> dict[str, Any]:
    fields = tune2fs_fields(node)
    return {
        "features": sorted(fields.get("Filesystem features", "").split()),
        "block_size": int(fields.get("Block size", "0") or 0),
        "inode_size": int(fields.get("Inode size", "0") or 0),
        "revision": fields.get("Filesystem revision #", ""),
    }


_XFS_KEYS = ("crc", "finobt", "sparse", "rmapbt", "reflink", "bigtime", "inobtcount", "nrext64", "ftype", "isize",
             "bsize", "attr", "projid32bit")


def xfs_features(node: str) -> dict[str, Any]:
    text = output(["xfs_db", "-r", "-c", "info", node])
    values: dict[str, Any] = {}
    section = ""
    for line in text.splitlines():
        head = re.match(r"^(\S+)\s*=", line)
        if head:
            section = head.group(1)
        for key, raw in re.findall(r"([a-z0-9_-]+)=([^\s,]+)", line):
            value = raw.strip()
            name = f"{section}.{key}" if key == "bsize" else key
            if key in _XFS_KEYS and name not in values:
                values[name] = int(value) if value.isdigit() else value
    return {"features": {k: values[k] for k in sorted(values)}}


def fs_features(fstype: str, node: str) -> dict[str, Any]:
    if fstype in ("ext2", "ext3", "ext4"):
        return ext_features(node)
    if fstype == "xfs":
        return xfs_features(node)
    return {}
