"""What the copy engine reports (its receipt's dataclasses) and the settings its tools run with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tasks.lib import inodeflags
from tasks.lib.manifest import shown

Method = Literal["rsync", "tar"]
METHODS: tuple[Method, ...] = ("rsync", "tar")
DEFAULT_METHOD: Method = "tar"

# Recreated empty on the target: the running system fills them.
ALWAYS_EXCLUDED = ("/proc", "/sys", "/dev", "/run", "/tmp")

RECEIPT_FORMAT = "p2v-copy-receipt"
RECEIPT_VERSION = 1

# The seal: proof, cheaper than the manifests, that a verified copy still holds.
#
# Sound because of ctime. Every change made through a filesystem to an inode
# (content, size, mode, owner, ACL, xattr, link count, rename) sets its ctime
# to the current time, and nothing short of the clock can set it back: writing
# a file and restoring its mtime with touch/utimes leaves a new ctime. Adding,
# removing or renaming an entry also changes its directory's mtime and ctime,
# and the path set itself is listed. So a listing whose (path, type, inode,
# mode, uid, gid, links, size, mtime, ctime) are all as before means nothing
# was changed through the filesystem in between; symlink targets and device
# numbers cannot change without a new inode.
#
# The one race, as in git's "racily clean" index: timestamps come from a
# coarse clock (a jiffy, or a whole second on filesystems with 128-byte ext
# inodes), so a change in the same tick as the previous one can leave ctime
# as it was. Hence a listing only counts when every ctime in it lies a margin
# (SETTLE_*) before the listing started: a change after the listing then
# always gets a later ctime. copy_tree waits that margin after the tools exit
# before it lists the target; a source still changing that close to the
# listing (a live server) gets no seal. The listing is taken after the copy
# and *before* verification reads anything, so a change during verification
# shows up as a new ctime next time: the rerun takes the full path.
#
# What it cannot see, like any ctime-based check (rsync's, make's, git's):
# writes that bypass the filesystem (dd onto the device, debugfs), and a wall
# clock set back past the seal. Neither happens to a source that p2v mounts
# read-only or to the image p2v owns in its workdir.
SEAL_FORMAT = "p2v-copy-seal"
SEAL_VERSION = 2  # 2: inode flags
LISTING_FORMAT = r"%y %i %m %U %G %n %s %T@ %C@ %P\0"
SETTLE_FINE = 0.05  # several coarse clock ticks (HZ >= 100: 10 ms or less)
SETTLE_COARSE = 1.05  # filesystems that keep whole seconds only

# XFS lists its on-disk ACLs as trusted.SGI_ACL_FILE/DEFAULT for root. Copied,
# they would be junk xattrs on ext4; worse, an rsync rerun into XFS from a
# source without them deletes them, and with them the target's ACLs. Neither
# tool copies or deletes them: the ACLs travel as ACLs. An rsync xattr filter
# replaces rsync's own "everything but system.*" rule, so that is restated.
XATTRS_NOT_COPIED = ("system.*", "trusted.SGI_ACL_*")
RSYNC_OPTIONS = (
    "--archive", "--hard-links", "--acls", "--xattrs", "--sparse", "--numeric-ids", "--one-file-system",
    "--inplace", "--modify-window=-1", *(f"--filter=-x {name}" for name in XATTRS_NOT_COPIED),
)
TAR_COMMON = ("--xattrs", "--xattrs-include=*", "--xattrs-exclude=trusted.SGI_ACL_*", "--acls", "--selinux",
              "--numeric-owner")
# 1 MiB records instead of 10 KiB: fewer pipe round trips, 6-10% faster on 200k small files.
TAR_RECORDS = "--blocking-factor=2048"
TAR_CREATE = ("--create", "--file=-", TAR_RECORDS, "--format=posix", "--one-file-system", "--sparse", "--totals",
              *TAR_COMMON)
# -p and --same-owner are tar's defaults for root; said here so that nobody wonders.
TAR_EXTRACT = ("--extract", "--file=-", TAR_RECORDS, "--read-full-records", "--preserve-permissions",
               "--same-owner", "--warning=no-timestamp", *TAR_COMMON)

SAMPLE_SECONDS = 0.5
APART_INODES = 50_000  # verify reads trees this big in child interpreters
LOG_TAIL_BYTES = 64 << 10
# Same locale as runner.run: tools print messages we parse.
_TOOL_ENV = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "LANGUAGE": ""}
_NO_SPACE = ("No space left on device", "ENOSPC", "Disk quota exceeded")


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class PassResult:
    """One filesystem's copy."""

    mountpoint: str
    tool: str  # "rsync", "tar", or "tar+rsync" (tar, then rsync for the sockets)
    resumed: bool  # the target already held data: rsync's quick check copied what was missing
    seconds: float
    # Regular-file bytes (apparent size) and regular files this pass wrote: rsync's
    # figures, or for tar (which writes them all) the source manifest's; None
    # for a tar pass without verification.
    bytes_transferred: int | None
    files_transferred: int | None
    excluded_contents: tuple[str, ...]
    swap_files: tuple[str, ...]
    sockets: int = 0


@dataclass(frozen=True)
class FlagOutcome:
    """The copy's inode flags: what was set on the target, what is left for a later step, what the target lost."""

    entries: int = 0  # source files and directories with recorded flags
    kept: dict[str, int] = dataclasses.field(default_factory=dict)  # flag letter -> entries that have it on the target
    pending: tuple[tuple[str, str], ...] = ()  # (path, letters) deferred to a later step
    dropped: tuple[tuple[str, str, str], ...] = ()  # (path, letters, why) the target filesystem does not keep

    def receipt(self) -> dict[str, Any]:
        return {"entries": self.entries, "kept": dict(self.kept),
                "pending": [{"path": path, "flags": flags} for path, flags in self.pending],
                "dropped": [{"path": path, "flags": flags, "reason": why} for path, flags, why in self.dropped]}

    @classmethod
    def from_receipt(cls, data: Mapping[str, Any]) -> FlagOutcome:
        return cls(entries=int(data.get("entries", 0)), kept=dict(data.get("kept", {})),
                   pending=tuple((row["path"], row["flags"]) for row in data.get("pending", [])),
                   dropped=tuple((row["path"], row["flags"], row["reason"]) for row in data.get("dropped", [])))

    def warnings(self) -> list[str]:
        """One line per flag and reason the target did not keep (never silent)."""
        by_flag: dict[tuple[str, str], list[str]] = {}
        for path, flags, why in self.dropped:
            for letter in flags:
                by_flag.setdefault((letter, why), []).append(path)
        lines = []
        for (letter, why), paths in sorted(by_flag.items()):
            shown_paths = ", ".join(shown(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5
                                                                    else "")
            lines.append(f"inode flag {inodeflags.describe(inodeflags.bits_of(letter))} not kept on "
                         f"{len(paths)} entr{'y' if len(paths) == 1 else 'ies'} of the target ({why}): {shown_paths}")
        return lines


@dataclass(frozen=True)
class CopyResult:
    method: Method
    passes: tuple[PassResult, ...]
    started: str
    copy_seconds: float
    verify_seconds: float
    files: int | None  # manifest entries (every type); None without verification
    regular_files: int | None
    bytes: int | None  # regular-file bytes, each inode once
    manifest_digest: str | None
    tools: dict[str, str]
    excluded_contents: tuple[str, ...]
    swap_files: tuple[str, ...]
    # "manifests": both trees hashed and compared in this run; "seal": nothing
    # changed on either side since a run that did (see SEAL_FORMAT).
    verified_by: str | None = None
    sealed: str = "no seal asked for"  # what became of the seal in this run
    flags: FlagOutcome = dataclasses.field(default_factory=FlagOutcome)

    @property
    def fast_path(self) -> bool:
        return self.verified_by == "seal"

    @property
    def verified(self) -> bool:
        return self.manifest_digest is not None

    @property
    def bytes_transferred(self) -> int | None:
        figures = [p.bytes_transferred for p in self.passes]
        return None if None in figures else sum(f for f in figures if f is not None)

    @property
    def duration(self) -> float:
        return self.copy_seconds + self.verify_seconds

    def receipt(self) -> dict[str, Any]:
        return {
            "format": RECEIPT_FORMAT,
            "version": RECEIPT_VERSION,
            "method": self.method,
            "started": self.started,
            "duration_seconds": round(self.duration, 3),
            "copy_seconds": round(self.copy_seconds, 3),
            "verify_seconds": round(self.verify_seconds, 3),
            "files": self.files,
            "regular_files": self.regular_files,
            "bytes": self.bytes,
            "bytes_transferred": self.bytes_transferred,
            "verified": self.verified,
            "verified_by": self.verified_by,
            "fast_path": self.fast_path,
            "seal": self.sealed,
            "manifest_digest": self.manifest_digest,
            "tools": dict(self.tools),
            "excluded_contents": list(self.excluded_contents),
            "swap_files_skipped": list(self.swap_files),
            "atimes": "not kept",
            "inode_flags": self.flags.receipt(),
            "warnings": self.flags.warnings(),
            "filesystems": [
                {**dataclasses.asdict(p), "seconds": round(p.seconds, 3),
                 "excluded_contents": list(p.excluded_contents), "swap_files": list(p.swap_files)}
                for p in self.passes
            ],
        }
