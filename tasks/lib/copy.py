"""Copy a mounted source tree into a mounted target tree, prove it, and say so.

    copy_tree(source, target, ["/", "/boot", "/srv"], log_file=...) -> CopyResult
    result.receipt() -> dict (JSON)

One pass per source filesystem, parents first: `<source>/<mp>/` into
`<target>/<mp>/`, never crossing into another filesystem. Left out: the
*contents* of /proc /sys /dev /run /tmp and of any other directory the caller
names (pseudo and network mount points); the directories themselves are
copied with their modes. Swap files are left out altogether and listed in the
receipt. Kept: owners and groups as numbers, modes with setuid/setgid/sticky,
hard links (across directories), symlinks as they are, POSIX ACLs, every xattr
(security.selinux and security.capability need root, which p2v is, and no
--fake-super), sparse files sparse, FIFOs, sockets and device nodes, and
mtimes in ns, directories included. atimes are not kept: nothing compares
them, tar cannot, and relatime changes them on the first read anyway.

Inode flags (chattr): neither tool copies them, so copy_tree reads the
source's (manifest.scan_flags) and sets them on the target itself after the
tools ran, then reads them back (tasks/lib/inodeflags.py). `defer_flags`
(the sync stage: i and a) are left off and listed as pending, for the step
that sets them later; a flag the target filesystem does not keep is listed
with the kernel's reason as a warning. The verification compares the target
with that view of the source (manifest.Manifest.with_flags), so every flag is
either proved on the target or named in the receipt. Before copying into a
target that already holds data, the deferred flags a later step set there
(`unlock`, and every pending path) are cleared: rsync cannot write into an
immutable file.

Two methods, the same guarantees (both verified by the manifest afterwards):

- "rsync": `rsync -aHAXS --numeric-ids --one-file-system --inplace`. No -z
  (local), no --preallocate (the default is off; it would fill sparse files).
  `--inplace` rather than --partial/--partial-dir: a local copy uses whole
  files, so a partial file is never a delta basis and resuming one gains
  nothing; without --inplace every file is written to a temp name and renamed
  (slower for small files) and a SIGKILL leaves `.name.XXXXXX` temp files
  behind that are not in the source. With --inplace a file cut short keeps its
  name with the wrong size and a fresh mtime (rsync sets the mtime last), so
  the rerun's quick check (size + mtime) copies it again, and only it.
  `--modify-window=-1`: mtimes compared to the nanosecond, as the manifest
  compares them (rsync's default compares whole seconds, so a directory or a
  same-size file changed within the second would be left as it was).
- "tar" (the default): `tar -c | tar -x` with --xattrs --xattrs-include='*'
  --acls --selinux --numeric-owner --sparse into an *empty* target filesystem.
  GNU tar drops sockets ("socket ignored"), so they are found with
  `find -type s` and copied by `rsync --files-from` afterwards (which also
  restores their directories' mtimes). A target filesystem that already holds
  data (a rerun after a failure or a kill) is copied with rsync instead: tar has
  no quick check and would copy everything again.

Why tar is the default (bench/sync.py, this machine: 2 cores, loop devices with
direct I/O, page cache dropped before each run; medians of 3, a shared machine):

    tree                          rsync    tar engine  tar pipe  no-change rerun
    plain-bookworm (16.9k files)  15.5 s   4.9 s       4.4 s     6.0 s rsync + verify; 0.9 s listings; 0.08 s stage seal
    synthetic, 200k small files   45.3 s   28.3 s      26.8 s    38.5 s rsync + verify; 2.6 s listings

rsync 3.5's receiver opens every path component by component (its hardened
path handling), so it loses to tar by about 2x on a first copy of many small
files; it is still the tool for resuming and for a no-change resync.

A no-change rerun (`seal=`): after a verified copy, copy_tree saves a seal
next to the caller's other state (never in the target): the manifest digest
that both trees were proved to share, and for each filesystem of each tree the
digest of a stat-only listing (find -printf: path, type, inode, mode, owner,
link count, size, mtime and ctime in ns), taken after the copy and before the
verification read anything. A rerun lists both trees again (no hashing, no
rsync); if every listing digest is the seal's, the target still equals the
source and the run stops there. Any other outcome removes the seal and runs
rsync and the full verification as before. Why that is a proof, and its
limits, are spelled out at SEAL_FORMAT below.

Progress: what the target filesystems gained in this run (statvfs used bytes
and inodes, every half second) against what the source's use (an estimate: a
resumed copy gains less), so it reads the same for both methods; shown by the
reporter the caller passes (tasks/lib/progress.py).
The full tool output (rsync's itemized changes, tar's warnings) goes to
`log_file`, with the command lines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from tasks.lib import inodeflags
from tasks.lib import manifest as manifests
from tasks.lib.fstab import mount_order
from tasks.lib.manifest import Manifest, compare, normalize, render_differences, shown
from tasks.lib.progress import Progress, human
from tasks.lib.runner import CommandError, P2VError, output, run, which

log = logging.getLogger("p2v.copy")

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


# ---------------------------------------------------------------- running tools


class _Log:
    """The copy's log file, shared with the tools (they write to it directly)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = open(path, "ab", buffering=0)

    def write(self, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.handle.write(f"{stamp} {text}\n".encode(errors="surrogateescape"))

    def offset(self) -> int:
        return os.fstat(self.handle.fileno()).st_size

    def since(self, offset: int, limit: int = LOG_TAIL_BYTES) -> str:
        with open(self.path, "rb") as reader:
            size = os.fstat(reader.fileno()).st_size
            reader.seek(max(offset, size - limit))
            return reader.read().decode(errors="replace")

    def close(self) -> None:
        self.handle.close()


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_logged(pipeline: Sequence[Sequence[str]], log_file: _Log, sample: Callable[[], None]) -> list[int]:
    """Run `a | b | ...` with every stderr (and the last stdout) into the log; sample while it runs.

    runner.run cannot stream into a log while we watch the target, hence Popen
    here; failures are reported like runner's (command line, exit code, tail).
    """
    for argv in pipeline:
        which(argv[0])
    log_file.write("+ " + " | ".join(shlex.join(argv) for argv in pipeline))
    env = {**os.environ, **_TOOL_ENV}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream: IO[bytes] | None = None
        for index, argv in enumerate(pipeline):
            last = index == len(pipeline) - 1
            proc = subprocess.Popen(argv, stdin=upstream if upstream is not None else subprocess.DEVNULL,
                                    stdout=log_file.handle if last else subprocess.PIPE, stderr=log_file.handle,
                                    env=env)
            if upstream is not None:
                upstream.close()  # the next process holds it now; a dead reader gives the writer SIGPIPE
            upstream = proc.stdout
            processes.append(proc)
        while any(proc.poll() is None for proc in processes):
            sample()
            with contextlib.suppress(subprocess.TimeoutExpired):
                processes[-1].wait(timeout=SAMPLE_SECONDS)
        sample()
    except BaseException:
        _stop(processes)
        raise
    codes = [proc.returncode for proc in processes]
    log_file.write("exit codes: " + " ".join(str(code) for code in codes))
    return codes


# ---------------------------------------------------------------- one filesystem


@dataclass
class _Watch:
    """Progress over the whole run, fed by statvfs samples of the pass at work.

    Done is what the target filesystems gained in this run, as statvfs measures
    it, and only that: a finished pass adds its own measured gain, not the
    source's usage, so the figures never go back between filesystems. The
    totals are the source's usage, an estimate (`~`): a resumed copy gains less.
    """

    total_bytes: int
    total_files: int
    callback: Callable[[Progress], None] | None
    started: float = dataclasses.field(default_factory=time.monotonic)
    done_bytes: int = 0  # gained by the passes finished
    done_files: int = 0

    def sampler(self, mountpoint: str, target: Path) -> tuple[Callable[[], None], Callable[[], None]]:
        """sample() while a pass runs; finish() when it is done."""
        base_bytes, base_files, _ = _used(target)

        def gained() -> tuple[int, int]:
            used_bytes, used_files, _ = _used(target)
            return max(0, used_bytes - base_bytes), max(0, used_files - base_files)

        def report(gain: tuple[int, int], final: bool) -> None:
            if self.callback is not None:
                self.callback(Progress(
                    step="copy",
                    bytes_done=self.done_bytes + gain[0],
                    bytes_total=self.total_bytes,
                    files_done=self.done_files + gain[1],
                    files_total=self.total_files,
                    elapsed=time.monotonic() - self.started,
                    estimated=True,  # what the source uses, not exactly what the target will
                    where=mountpoint,
                    final=final,
                ))

        def finish() -> None:
            gain = gained()
            report(gain, final=True)
            self.done_bytes += gain[0]
            self.done_files += gain[1]

        return lambda: report(gained(), final=False), finish


def _stats_number(text: str, label: str) -> int:
    for line in text.splitlines():
        if line.startswith(label + ":"):
            digits = line.split(":", 1)[1].split()[0].replace(",", "")
            if digits.isdigit():
                return int(digits)
    return 0


def _failed(mountpoint: str, argv: Sequence[str], code: int, text: str, free_before: int, needed: int,
            target: Path, log_file: _Log) -> P2VError:
    _, _, free_now = _used(target)
    if any(marker in text for marker in _NO_SPACE):
        info = os.statvfs(target)
        if info.f_files and info.f_ffree == 0:
            what = f"target filesystem out of inodes while copying {mountpoint}"
        else:
            what = f"target filesystem full while copying {mountpoint}"
        log_file.write(f"{what}: the command and its output are above")
        return P2VError(
            f"{what}: {free_before} bytes free of {needed} needed "
            f"({human(free_before)} free before the copy, {human(needed)} used on the source, "
            f"{human(free_now)} free now)",
            hint=f"make the target filesystem for {mountpoint} bigger (spec target.size or headroom); "
                 f"the tool's output is in {log_file.path}",
        )
    return CommandError(argv, code, text, hint=f"full log: {log_file.path}")


def _prewarm(*trees: Path) -> None:
    """Read every inode of the trees at once (du), before rsync's one-file-at-a-time walk of both.

    rsync's sender and generator stat the two trees in turn, in name order:
    on a cold cache each stat waits for its own small read. Two du's issue the
    same reads side by side. On the fixture tree, a cold no-change resync went
    from 3.4 s to 1.4 s (du 0.7 s, then rsync 0.7 s).
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(trees), thread_name_prefix="prewarm") as pool:
        for result in pool.map(lambda tree: run(["du", "-sx", "--", str(tree)], check=False), trees):
            if result.returncode != 0:
                log.debug("prewarm: %s", result.stderr.strip())


@dataclass(frozen=True)
class _Outcome:
    tool: str
    bytes: int | None
    files: int | None
    sockets: int = 0


def _copy_rsync(source: Path, target: Path, excluded: Sequence[str], omitted: Sequence[str], log_file: _Log,
                sample: Callable[[], None]) -> _Outcome:
    """One filesystem by rsync; raises _PassFailed."""
    argv = rsync_argv(source, target, excluded, omitted)
    start = log_file.offset()
    (code,) = _run_logged([argv], log_file, sample)
    text = log_file.since(start)
    if code != 0:
        raise _PassFailed(argv, code, text)
    return _Outcome("rsync", _stats_number(text, "Total transferred file size"),
                    _stats_number(text, "Number of regular files transferred"))


class _PassFailed(Exception):
    def __init__(self, argv: Sequence[str], code: int, text: str):
        super().__init__(f"{argv[0]} failed with {code}")
        self.argv = list(argv)
        self.code = code
        self.text = text


def _find_sockets(source: Path, excluded: Sequence[str], scratch: Path) -> Path | None:
    """A NUL-separated list (relative to `source`) of the sockets tar will not copy, or None."""
    if "/" in excluded:
        return None
    listing = scratch / "sockets"
    prune: list[str] = []
    for relative in excluded:
        prune += [*(["-o"] if prune else []), "-path", "." + _glob_escape(relative)]
    argv = ["find", ".", "-xdev"]
    if prune:
        argv += ["(", *prune, ")", "-prune", "-o"]
    argv += ["-type", "s", "-fprint0", str(listing)]
    run(argv, cwd=source)
    return listing if listing.stat().st_size else None


def _copy_tar(source: Path, target: Path, excluded: Sequence[str], omitted: Sequence[str], log_file: _Log,
              sample: Callable[[], None], scratch: Path) -> _Outcome:
    """One (empty) filesystem by tar, then its sockets by rsync; raises _PassFailed."""
    create, extract = tar_argvs(source, target, excluded, omitted)
    start = log_file.offset()
    codes = _run_logged([create, extract], log_file, sample)
    text = log_file.since(start)
    for argv, code in zip((extract, create), reversed(codes), strict=True):
        # The reader's error first: a writer that lost its reader only says "Broken pipe".
        if code != 0:
            raise _PassFailed(argv, code, text)
    sockets = _find_sockets(source, excluded, scratch)
    count = 0
    tool = "tar"
    if sockets is not None:
        count = sockets.read_bytes().count(b"\0")
        argv = ["rsync", *RSYNC_OPTIONS, "--itemize-changes", "--from0", f"--files-from={sockets}",
                f"{source}/", f"{target}/"]
        (code,) = _run_logged([argv], log_file, sample)
        if code != 0:
            raise _PassFailed(argv, code, log_file.since(start))
        tool = "tar+rsync"
    return _Outcome(tool, None, None, count)


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


def copy_tree(
    source: Path,
    target: Path,
    mountpoints: Sequence[str],
    *,
    log_file: Path,
    method: Method = DEFAULT_METHOD,
    exclude_contents: Sequence[str] = (),
    swap_files: Sequence[str] = (),
    verify: bool = True,
    progress: Callable[[Progress], None] | None = None,
    seal: Path | None = None,
    defer_flags: int = 0,
    unlock: Sequence[str] = (),
) -> CopyResult:
    """Copy every filesystem of `source` (mounted as the server mounts them) into `target`.

    `mountpoints`: the source's mounted filesystems ("/", "/boot", ...); the
    target has the same ones mounted. `exclude_contents`: directories whose
    contents stay behind, on top of ALWAYS_EXCLUDED (pseudo and network mount
    points). `swap_files`: files left out. With `verify`, both trees'
    manifests must be equal, or P2VError lists the differences. A rerun into
    the same target continues a copy that failed or was killed.

    `seal`: a file outside both trees. With `verify`, a verified copy writes
    it, and a later call whose trees are provably unchanged since (see
    SEAL_FORMAT) returns at once with verified_by="seal".

    `defer_flags`: inode flags (inodeflags bits) left off the target and
    listed as pending in the result, for a later step to set. `unlock`: paths
    on which a later step of an earlier run set them; they are cleared before
    anything is copied (see the module doc).
    """
    if method not in METHODS:
        raise P2VError(f"unknown copy method {method!r} (known: {', '.join(METHODS)})")
    points = _order(mountpoints)
    excluded = sorted({normalize(p) for p in (*ALWAYS_EXCLUDED, *exclude_contents)})
    swaps = sorted({normalize(p) for p in swap_files})
    _check_tree("source", source, points)
    _check_tree("target", target, points[:1])
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    excluded_by_fs = assign(excluded, points)
    swaps_by_fs = assign(swaps, points)
    scope = _Scope(points=tuple(points), excluded=excluded_by_fs, omitted=swaps_by_fs,
                   deferred_flags=inodeflags.letters(defer_flags))
    log_ = _Log(log_file)
    try:
        with tempfile.TemporaryDirectory(prefix="p2v-copy-") as scratch:
            if seal is not None and verify:
                started = time.monotonic()
                unchanged = _still_sealed(seal, source, target, scope, Path(scratch), log_)
                if unchanged is not None:  # the tools are the ones that made the sealed copy
                    return _sealed_result(unchanged, scope, method, started_at, time.monotonic() - started,
                                          unchanged.get("tools") or tool_versions(), excluded, swaps)
            return _full_copy(source, target, scope, method, excluded, swaps, verify, progress, seal, log_,
                              Path(scratch), started_at, tool_versions(), defer_flags, unlock)
    finally:
        log_.close()


def _full_copy(source: Path, target: Path, scope: _Scope, method: Method, excluded: Sequence[str],
               swaps: Sequence[str], verify: bool, progress: Callable[[Progress], None] | None, seal: Path | None,
               log_: _Log, scratch: Path, started_at: str, tools: dict[str, str], defer: int,
               unlock: Sequence[str]) -> CopyResult:
    points = scope.points
    if seal is not None:
        seal.unlink(missing_ok=True)  # from here on the target changes: no old seal may vouch for it
    sizes = {mp: _used(source / mp.lstrip("/")) for mp in points}
    watch = _Watch(total_bytes=sum(s[0] for s in sizes.values()), total_files=sum(s[1] for s in sizes.values()),
                   callback=progress)
    log_.write(f"copy {source} -> {target} by {method}: filesystems {' '.join(points)}; "
               f"contents excluded: {' '.join(excluded)}; swap files left out: {' '.join(swaps) or 'none'}; "
               f"{tools['rsync']}; {tools['tar']}")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flags") as pool:
        # The source's flags are read beside the tools (the source is read-only), unless the
        # target holds data: then an earlier fix may have locked entries the copy must write.
        scan = pool.submit(_scan_flags, source, excluded, swaps, points, log_)
        if holds_data(target):
            _unlock(target, [*(p for p, bits in scan.result().items() if bits & inodeflags.DEFERRED), *unlock],
                    log_)
        passes = [_copy_filesystem(source, target, mp, method, scope.excluded[mp], scope.omitted[mp], sizes[mp],
                                   log_, watch, scratch) for mp in points]
        source_flags = scan.result()
    refused = _restore_flags(target, source_flags, defer, log_)
    copy_seconds = time.monotonic() - started
    log.info("copied %s in %.1f s (%s)", " ".join(points), copy_seconds,
             ", ".join(f"{p.mountpoint} by {p.tool}{' (resumed)' if p.resumed else ''}" for p in passes))
    source_manifest = None
    sealed = "no seal asked for"
    flags = _flag_outcome(source_flags, defer, refused)
    if verify:
        def expected(ours: Manifest) -> Manifest:
            return _expected_view(ours, defer, refused)

        # Listed before verification reads anything: see SEAL_FORMAT.
        listings = _settled_listings(source, target, scope, scratch) if seal is not None else None
        raw, source_manifest, differences = _compare_trees(source, target, points, excluded, swaps, log_, expected)
        if differences and any(p.resumed for p in passes):
            # Not a failed copy yet: rsync's quick check cannot see every change (see _repair).
            repaired = _repair(source, target, scope, differences, log_, scratch)
            # rsync sets no inode flags: those of every entry it made or found different, as the view says.
            again = {d.path: inodeflags.bits_of(source_manifest.entries[d.path].flags) for d in differences
                     if d.what != "extra" and d.path in source_manifest.entries}
            refused.update(_restore_flags(target, again, defer, log_))
            log.info("verification found %d difference(s) rsync's quick check missed: copied again", repaired)
            log_.write(f"repaired {repaired} entries; verifying again")
            listings = _settled_listings(source, target, scope, scratch) if seal is not None else None
            raw, source_manifest, differences = _compare_trees(source, target, points, excluded, swaps, log_,
                                                               expected)
        if differences:
            raise _verification_failed(differences, log_)
        flags = _flag_outcome({path: inodeflags.bits_of(e.flags) for path, e in raw.entries.items() if e.flags},
                              defer, refused)
        passes = _with_tar_figures(passes, source_manifest, points)
        if seal is not None and listings is not None:
            sealed = _write_seal(seal, source_manifest, scope, listings, tools, log_, flags)
    elif seal is not None:
        sealed = "not written: the copy was not verified"
    for warning in flags.warnings():
        log.warning("%s", warning)
        log_.write(f"warning: {warning}")
    verify_seconds = time.monotonic() - started - copy_seconds
    return CopyResult(
        method=method, passes=tuple(passes), started=started_at, copy_seconds=copy_seconds,
        verify_seconds=verify_seconds, tools=tools, excluded_contents=tuple(excluded), swap_files=tuple(swaps),
        files=source_manifest.files if source_manifest else None,
        regular_files=source_manifest.regular_files if source_manifest else None,
        bytes=source_manifest.total_bytes if source_manifest else None,
        manifest_digest=source_manifest.digest() if source_manifest else None,
        verified_by="manifests" if source_manifest else None, sealed=sealed, flags=flags,
    )


# ---------------------------------------------------------------- inode flags (see the module doc)


def _scan_flags(source: Path, excluded: Sequence[str], swaps: Sequence[str], points: Sequence[str],
                log_file: _Log) -> dict[str, int]:
    started = time.monotonic()
    found = manifests.scan_flags(source, excluded, omit=swaps, mounts=points[1:])
    log_file.write(f"inode flags: {len(found)} source entries have some (read in {time.monotonic() - started:.1f} s)")
    return found


def _target_entry(target: Path, path: str) -> bytes:
    return os.fsencode(target) + (os.fsencode(path) if path != "/" else b"")


def _unlock(target: Path, paths: Sequence[str], log_file: _Log) -> int:
    """Clear i and a where a later step of an earlier run set them on the target; return how many."""
    cleared = 0
    for path in sorted(set(paths), key=os.fsencode, reverse=True):
        with inodeflags.opened(_target_entry(target, path)) as fd:
            if fd is None or not (inodeflags.get_raw(fd) or 0) & inodeflags.DEFERRED:
                continue
            inodeflags.apply_flags(fd, 0, inodeflags.DEFERRED)
            if (inodeflags.get_raw(fd) or 0) & inodeflags.DEFERRED:
                raise P2VError(f"cannot clear the immutable or append-only flag of {shown(path)} on the target, "
                               "so it cannot be copied into again")
            cleared += 1
    if cleared:
        log_file.write(f"inode flags: cleared i/a on {cleared} target entries that an earlier fix had set")
        log.info("cleared the immutable/append-only flags an earlier fix set on %d entries", cleared)
    return cleared


def _restore_flags(target: Path, wanted: Mapping[str, int], defer: int, log_file: _Log) -> dict[str, dict[int, str]]:
    """Make each entry's recorded flags on the target `wanted` less `defer`; return path -> {flag: why not kept}."""
    refused: dict[str, dict[int, str]] = {}
    done = 0
    for path in sorted(wanted, key=os.fsencode, reverse=True):
        with inodeflags.opened(_target_entry(target, path)) as fd:
            if fd is None:
                continue  # not on the target: the verification says so
            _, lost = inodeflags.apply_flags(fd, wanted[path] & ~defer)
        done += 1
        if lost:
            refused[path] = lost
    if wanted:
        log_file.write(f"inode flags: set on {done} target entries; {len(refused)} with flags the target "
                       f"does not keep")
    return refused


def _expected_view(source: Manifest, defer: int, refused: Mapping[str, Mapping[int, str]]) -> Manifest:
    """The source as the target is to hold it: without the deferred flags and those the target did not keep."""
    changes = {}
    for path, entry in source.entries.items():
        if entry.flags:
            bits = inodeflags.bits_of(entry.flags)
            expected = bits & ~defer & ~sum(refused.get(path, {}))
            if expected != bits:
                changes[path] = inodeflags.letters(expected)
    return source.with_flags(changes)


def _flag_outcome(source_flags: Mapping[str, int], defer: int, refused: Mapping[str, Mapping[int, str]]) -> FlagOutcome:
    kept: dict[str, int] = {}
    pending = []
    dropped = []
    for path in sorted(source_flags, key=os.fsencode):
        bits = source_flags[path]
        lost = refused.get(path, {})
        for letter in inodeflags.letters(bits & ~defer & ~sum(lost)):
            kept[letter] = kept.get(letter, 0) + 1
        if bits & defer:
            pending.append((path, inodeflags.letters(bits & defer)))
        by_reason: dict[str, int] = {}
        for bit, why in lost.items():
            if bits & bit:
                by_reason[why] = by_reason.get(why, 0) | bit
        dropped += [(path, inodeflags.letters(lost_bits), why) for why, lost_bits in sorted(by_reason.items())]
    return FlagOutcome(entries=len(source_flags), kept=kept, pending=tuple(pending), dropped=tuple(dropped))


# ---------------------------------------------------------------- the seal (see SEAL_FORMAT)


@dataclass(frozen=True)
class _Scope:
    """What a copy covers: its filesystems, and per filesystem what is left out (relative to its root)."""

    points: tuple[str, ...]
    excluded: dict[str, list[str]]
    omitted: dict[str, list[str]]
    deferred_flags: str = ""  # inode flags left for a later step: a seal vouches only for the same

    def to_json(self) -> dict[str, Any]:
        return {"mountpoints": list(self.points), "excluded_contents": self.excluded, "omitted": self.omitted,
                "deferred_flags": self.deferred_flags}


@dataclass(frozen=True)
class Listing:
    """A stat-only listing of one filesystem of a tree, reduced to what the seal needs."""

    digest: str
    entries: int
    started_ns: int  # wall clock when find started
    newest_ctime_ns: int
    whole_seconds: bool  # no ctime with a fraction: maybe a filesystem that keeps seconds only

    @property
    def settled(self) -> bool:
        margin = SETTLE_COARSE if self.whole_seconds else SETTLE_FINE
        return self.newest_ctime_ns < self.started_ns - int(margin * 1e9)

    def wait(self) -> float:
        """Seconds from now until a listing of the same entries would be settled."""
        margin = SETTLE_COARSE if self.whole_seconds else SETTLE_FINE
        return max(0.0, (self.newest_ctime_ns + int(margin * 1e9) - time.time_ns()) / 1e9 + 0.01)


def _ns(stamp: bytes) -> int:
    """find's %T@/%C@ ("1700000000.1234567890") in ns."""
    whole, _, fraction = stamp.partition(b".")
    return int(whole) * 1_000_000_000 + int((fraction + b"000000000")[:9])


def list_filesystem(root: Path, excluded: Sequence[str], omitted: Sequence[str], scratch: Path, *,
                    timestamps: bool = True) -> Listing:
    """One filesystem's entries as the manifest sees them (contents of `excluded` and `omitted` left out), stat only.

    `timestamps`: also find the newest ctime, for `settled` (a listing only
    compared with a seal does not need it: parsing 200k records is a third
    of a second).
    """
    handle, name = tempfile.mkstemp(prefix="listing-", dir=scratch)
    os.close(handle)
    listing = Path(name)

    def paths(relatives: Sequence[str]) -> list[str]:
        found: list[str] = []
        for relative in relatives:
            found += [*(["-o"] if found else []), "-path", "." + ("" if relative == "/" else _glob_escape(relative))]
        return found

    argv = ["find", ".", "-xdev"]
    if omitted:
        argv += ["(", *paths(omitted), ")", "-prune", "-o"]
    if excluded:  # the directory itself is listed, its contents are not
        argv += ["(", *paths(excluded), ")", "-fprintf", str(listing), LISTING_FORMAT, "-prune", "-o"]
    argv += ["-fprintf", str(listing), LISTING_FORMAT]
    started_ns = time.time_ns()
    run(argv, cwd=root)
    data = listing.read_bytes()
    listing.unlink()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not timestamps:
        return Listing(digest=digest, entries=data.count(b"\0"), started_ns=started_ns, newest_ctime_ns=started_ns,
                       whole_seconds=True)  # never settled: not for a seal
    ctimes = [record.split(b" ", 9)[8] for record in data.split(b"\0")[:-1]]
    return Listing(digest=digest, entries=len(ctimes), started_ns=started_ns,
                   newest_ctime_ns=max((_ns(c) for c in ctimes), default=0),
                   whole_seconds=all(c.endswith(b".0000000000") for c in ctimes))


Listings = dict[str, dict[str, Listing]]  # "source"/"target" -> mountpoint -> listing


def _list_trees(source: Path, target: Path, scope: _Scope, scratch: Path, *, timestamps: bool = True) -> Listings:
    """Every filesystem of both trees, listed side by side (find per filesystem: two cores, two disks)."""
    jobs = [(side, mp, root / mp.lstrip("/")) for side, root in (("source", source), ("target", target))
            for mp in scope.points]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="listing") as pool:
        done = pool.map(lambda job: list_filesystem(job[2], scope.excluded[job[1]], scope.omitted[job[1]], scratch,
                                                    timestamps=timestamps), jobs)
        found: Listings = {"source": {}, "target": {}}
        for (side, mp, _), listing in zip(jobs, done, strict=True):
            found[side][mp] = listing
    return found


def _settled_listings(source: Path, target: Path, scope: _Scope, scratch: Path) -> Listings:
    """Listings of both trees that a seal may use: the target's last writes a margin in the past."""
    time.sleep(SETTLE_FINE)
    listings = _list_trees(source, target, scope, scratch)
    pause = max(listing.wait() for listing in listings["target"].values())
    if pause > 0 and not all(listing.settled for listing in listings["target"].values()):
        time.sleep(pause)  # a filesystem with whole-second timestamps: one more second
        listings = _list_trees(source, target, scope, scratch)
    return listings


def _write_seal(path: Path, manifest: Manifest, scope: _Scope, listings: Listings, tools: dict[str, str],
                log_file: _Log, flags: FlagOutcome) -> str:
    unsettled = [f"{side} {mp}" for side, by_point in listings.items() for mp, listing in by_point.items()
                 if not listing.settled]
    if unsettled:
        note = f"not written: {', '.join(unsettled)} changed while being copied (a live source?)"
        log_file.write(f"seal {note}")
        return note
    seal = {
        "format": SEAL_FORMAT, "version": SEAL_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "scope": scope.to_json(),
        "manifest_digest": manifest.digest(), "files": manifest.files, "tools": tools,
        "regular_files": manifest.regular_files, "bytes": manifest.total_bytes,
        "inode_flags": flags.receipt(),
        "listings": {side: {mp: {"digest": listing.digest, "entries": listing.entries}
                            for mp, listing in by_point.items()} for side, by_point in listings.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(seal, indent=1, sort_keys=True) + "\n")
    partial.replace(path)
    log_file.write(f"seal written to {path}: manifest {seal['manifest_digest']}")
    return "written"


def _still_sealed(path: Path, source: Path, target: Path, scope: _Scope, scratch: Path,
                  log_file: _Log) -> dict[str, Any] | None:
    """The seal, if both trees are provably as they were when it was written; None otherwise (and why, in the log)."""
    try:
        seal = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log_file.write(f"seal {path} unreadable ({error}): full copy")
        return None
    if seal.get("format") != SEAL_FORMAT or seal.get("version") != SEAL_VERSION:
        log_file.write(f"seal {path} is not a version {SEAL_VERSION} seal: full copy")
        return None
    if seal.get("scope") != json.loads(json.dumps(scope.to_json())):
        log_file.write(f"seal {path} covers other filesystems or exclusions: full copy")
        return None
    listings = _list_trees(source, target, scope, scratch, timestamps=False)
    changed = [f"{side} {mp}" for side, by_point in listings.items() for mp, listing in by_point.items()
               if seal["listings"].get(side, {}).get(mp, {}).get("digest") != listing.digest]
    if changed:
        log_file.write(f"seal {path}: changed since: {', '.join(changed)}: full copy")
        return None
    log_file.write(f"seal {path} of {seal['created']} holds: every listing unchanged "
                   f"({sum(x.entries for by_point in listings.values() for x in by_point.values())} entries); "
                   f"manifest {seal['manifest_digest']}")
    return dict(seal)


def target_matches_seal(seal: Path, target: Path, mountpoints: Sequence[str], *, exclude_contents: Sequence[str] = (),
                        swap_files: Sequence[str] = (), defer_flags: int = 0) -> bool:
    """Whether the target, listed now, is still what the seal's verified copy left (same arguments as copy_tree).

    For a caller that wants to vouch for the target beyond this run (the sync
    stage, which then fingerprints the image file): call it with the target
    mounted read-only, so that nothing can change it after the listing.
    """
    points = _order(mountpoints)
    excluded = sorted({normalize(p) for p in (*ALWAYS_EXCLUDED, *exclude_contents)})
    swaps = sorted({normalize(p) for p in swap_files})
    scope = _Scope(points=tuple(points), excluded=assign(excluded, points), omitted=assign(swaps, points),
                   deferred_flags=inodeflags.letters(defer_flags))
    try:
        sealed = json.loads(seal.read_text())
    except (OSError, ValueError):
        return False
    if sealed.get("format") != SEAL_FORMAT or sealed.get("scope") != json.loads(json.dumps(scope.to_json())):
        return False
    with tempfile.TemporaryDirectory(prefix="p2v-copy-") as scratch:
        for mp in points:
            listing = list_filesystem(target / mp.lstrip("/"), scope.excluded[mp], scope.omitted[mp], Path(scratch),
                                      timestamps=False)
            if sealed["listings"]["target"].get(mp, {}).get("digest") != listing.digest:
                return False
    return True


def _sealed_result(seal: Mapping[str, Any], scope: _Scope, method: Method, started_at: str, seconds: float,
                   tools: dict[str, str], excluded: Sequence[str], swaps: Sequence[str]) -> CopyResult:
    log.info("source and target unchanged since the verified copy of %s: nothing to copy", seal["created"])
    passes = tuple(PassResult(mountpoint=mp, tool="none (sealed)", resumed=True, seconds=0.0, bytes_transferred=0,
                              files_transferred=0, excluded_contents=tuple(scope.excluded[mp]),
                              swap_files=tuple(scope.omitted[mp])) for mp in scope.points)
    return CopyResult(
        method=method, passes=passes, started=started_at, copy_seconds=seconds, verify_seconds=0.0, tools=tools,
        excluded_contents=tuple(excluded), swap_files=tuple(swaps), files=seal["files"],
        regular_files=seal["regular_files"], bytes=seal["bytes"], manifest_digest=seal["manifest_digest"],
        verified_by="seal", sealed=f"held (written {seal['created']})",
        flags=FlagOutcome.from_receipt(seal.get("inode_flags", {})),
    )


def _copy_filesystem(source_root: Path, target_root: Path, mp: str, method: Method, excluded: Sequence[str],
                     omitted: Sequence[str], size: tuple[int, int, int], log_file: _Log, watch: _Watch,
                     scratch: Path) -> PassResult:
    source = source_root / mp.lstrip("/")
    target = target_root / mp.lstrip("/")
    target.mkdir(exist_ok=True)  # normally a mount point already; a plain directory if the plan merged it
    _, _, free_before = _used(target)
    resumed = holds_data(target)
    tool = "rsync" if method == "rsync" or resumed else "tar"
    if size[0] > free_before and not resumed:
        log.warning("the source's %s uses %s, the target has %s free: the copy may not fit", mp, human(size[0]),
                    human(free_before))
    log.info("copying %s by %s%s", mp, tool, " (the target holds data: resuming)" if resumed else "")
    log_file.write(f"== {mp}: {source} -> {target} by {tool}{' (resuming)' if resumed else ''}")
    sample, finish = watch.sampler(mp, target)
    started = time.monotonic()
    try:
        if tool == "rsync":
            if resumed:
                _prewarm(source, target)
            outcome = _copy_rsync(source, target, excluded, omitted, log_file, sample)
        else:
            outcome = _copy_tar(source, target, excluded, omitted, log_file, sample, scratch)
    except _PassFailed as failure:
        raise _failed(mp, failure.argv, failure.code, failure.text, free_before, size[0], target, log_file) \
            from None
    finish()
    seconds = time.monotonic() - started
    log_file.write(f"== {mp}: done by {outcome.tool} in {seconds:.1f} s")
    return PassResult(mountpoint=mp, tool=outcome.tool, resumed=resumed, seconds=seconds,
                      bytes_transferred=outcome.bytes, files_transferred=outcome.files,
                      excluded_contents=tuple(excluded), swap_files=tuple(omitted), sockets=outcome.sockets)


def _with_tar_figures(passes: Sequence[PassResult], source: Manifest, points: Sequence[str]) -> list[PassResult]:
    """A tar pass wrote every regular file of its filesystem: count them from the source manifest."""
    owner: dict[str, list[int]] = {}
    for entry in source.entries.values():
        if entry.type == "file" and entry.link in (None, entry.path):
            holder = filesystem_of(entry.path, points)
            if holder is not None:
                owner.setdefault(holder, []).append(entry.size)
    result = []
    for item in passes:
        if item.tool.startswith("tar"):
            sizes = owner.get(item.mountpoint, [])
            item = dataclasses.replace(item, bytes_transferred=sum(sizes), files_transferred=len(sizes))
        result.append(item)
    return result


def verify_copy(source: Path, target: Path, mountpoints: Sequence[str], *, log_file: Path,
                exclude_contents: Sequence[str] = (), swap_files: Sequence[str] = (), defer_flags: int = 0) -> Manifest:
    """Check a copy made by copy_tree (same arguments) again; return the source's manifest, as compared.

    Every inode flag but `defer_flags` must be on the target: one the target
    filesystem did not keep is a difference here.
    """
    points = _order(mountpoints)
    excluded = sorted({normalize(p) for p in (*ALWAYS_EXCLUDED, *exclude_contents)})
    swaps = sorted({normalize(p) for p in swap_files})
    log_ = _Log(log_file)
    try:
        _, ours, differences = _compare_trees(source, target, points, excluded, swaps, log_,
                                              lambda manifest: _expected_view(manifest, defer_flags, {}))
        if differences:
            raise _verification_failed(differences, log_)
        return ours
    finally:
        log_.close()


def _verification_failed(differences: Sequence[manifests.Difference], log_file: _Log) -> P2VError:
    return P2VError(
        f"copy verification failed: {len(differences)} difference(s) between the source and the target:\n"
        + render_differences(differences, 20),
        hint=f"every difference is listed in {log_file.path}",
    )


def _compare_trees(source: Path, target: Path, points: Sequence[str], excluded: Sequence[str],
                   swaps: Sequence[str], log_file: _Log, expected: Callable[[Manifest], Manifest]
                   ) -> tuple[Manifest, Manifest, list[manifests.Difference]]:
    """Both trees' manifests, restricted the same way: the source's as read, the view of it the target
    is compared with (`expected`: see _expected_view), and what differs."""
    # mkfs.ext4 makes lost+found; a source filesystem without one (xfs) does not need it copied.
    made_by_mkfs = [f"{mp.rstrip('/')}/lost+found" for mp in points
                    if not os.path.lexists(source / mp.lstrip("/") / "lost+found")]
    # Both trees at once: one side hashes while the other waits for its disk. Many small files
    # keep one interpreter's GIL busy, so big trees get a child interpreter each (two cores);
    # below APART_INODES, starting them costs more than it saves.
    inodes = sum(_used(source / mp.lstrip("/"))[1] for mp in points)
    build = manifests.build_manifest_apart if inodes >= APART_INODES else manifests.build_manifest
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="verify") as pool:
        source_job = pool.submit(build, source, excluded, omit=swaps, mounts=points[1:])
        target_job = pool.submit(build, target, excluded, omit=[*swaps, *made_by_mkfs], mounts=points[1:])
        ours, theirs = source_job.result(), target_job.result()
    view = expected(ours)
    differences = compare(view, theirs)
    log_file.write(f"verify: source {ours.files} entries ({ours.stats.get('seconds', 0):.1f} s), "
                   f"target {theirs.files} entries ({theirs.stats.get('seconds', 0):.1f} s), "
                   f"{len(differences)} difference(s); source digest {view.digest()}")
    for difference in differences:
        log_file.write(f"  {difference}")
    return ours, view, differences


def _repair(source: Path, target: Path, scope: _Scope, differences: Sequence[manifests.Difference],
            log_file: _Log, scratch: Path) -> int:
    """Make the target's differing entries the source's again, ignoring rsync's quick check; return how many.

    rsync's quick check (size and mtime) misses a file whose content changed
    with its size kept and its mtime put back: verification finds it, and
    this copies exactly those entries again. Entries the source no longer has
    are removed (a resumed rsync never deletes).
    """
    count = 0
    for mp in scope.points:
        mine = [d for d in differences if filesystem_of(d.path, scope.points) == mp]
        extra = sorted({d.path for d in mine if d.what == "extra"}, key=os.fsencode, reverse=True)
        # Removing an extra entry changes its directory's mtime: that directory's attributes are copied again.
        # (Not the directories that go too: a nested extra tree names its own parents.)
        again = sorted({d.path for d in mine if d.what != "extra"}
                       | ({os.path.dirname(path) for path in extra if filesystem_of(os.path.dirname(path),
                                                                                    scope.points) == mp}
                          - set(extra)),
                       key=os.fsencode)
        for path in extra:  # children before their directories
            relative = _within(path, mp)
            assert relative is not None
            victim = target / mp.lstrip("/") / relative.lstrip("/")
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim)
            else:
                victim.unlink(missing_ok=True)
        if again:
            listing = scratch / f"repair-{count}"
            listing.write_bytes(b"".join(os.fsencode("." + (_within(path, mp) or "/")) + b"\0" for path in again))
            argv = ["rsync", *RSYNC_OPTIONS, "--ignore-times", "--itemize-changes", "--from0",
                    f"--files-from={listing}", f"{source / mp.lstrip('/')}/", f"{target / mp.lstrip('/')}/"]
            (code,) = _run_logged([argv], log_file, lambda: None)
            if code != 0:
                raise CommandError(argv, code, log_file.since(0), hint=f"full log: {log_file.path}")
        count += len(extra) + len(again)
    return count
