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
with that view of the source (flags._expected_entry), so every flag is
either proved on the target or named in the receipt. Before a pass resumes
into a filesystem that already holds data, the deferred flags a later step
set there (`unlock`, and every pending path) are cleared: rsync cannot write
into an immutable file. (A filesystem `prefilled` by blocks in this run is
written by no pass: its flags are set like every other's, afterwards.)

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
limits, are spelled out at SEAL_FORMAT (model.py).

The package: `model` (the receipt's dataclasses, the tools' settings), `commands`
(command lines, filters, small facts about trees), `passes` (one rsync or tar pass
and its processes), `flags` (inode flags), `seal` (the no-change rerun's listings),
`verify` (the manifest check and the repair); this module, copy_tree, puts them
in order.

Progress: what the target filesystems gained in this run (statvfs used bytes
and inodes, every half second) against what the source's use (an estimate: a
resumed copy gains less), so it reads the same for both methods; shown by the
reporter the caller passes (tasks/lib/progress.py).
The full tool output (rsync's itemized changes, tar's warnings) goes to
`log_file`, with the command lines.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from tasks.lib import inodeflags
from tasks.lib.copy.commands import (
    _check_tree,
    _order,
    _used,
    assign,
    filesystem_of,
    holds_data,
    rsync_argv,
    rsync_filters,
    tar_argvs,
    tar_filters,
    tool_versions,
)
from tasks.lib.copy.flags import _expected_entry, _expected_view, _flag_outcome, _restore_flags, _scan_flags, _unlock

# The package's face: what the sync stage, the tests and bench/ import from tasks.lib.copy.
from tasks.lib.copy.model import (
    ALWAYS_EXCLUDED,
    DEFAULT_METHOD,
    METHODS,
    RECEIPT_FORMAT,
    RECEIPT_VERSION,
    SEAL_FORMAT,
    SEAL_VERSION,
    SETTLE_COARSE,
    SETTLE_FINE,
    CopyResult,
    FlagOutcome,
    Method,
    PassResult,
)
from tasks.lib.copy.passes import _copy_rsync, _copy_tar, _failed, _Log, _PassFailed, _prewarm, _Watch
from tasks.lib.copy.seal import (
    Listing,
    _Scope,
    _sealed_result,
    _settled_listings,
    _still_sealed,
    _write_seal,
    list_filesystem,
    target_matches_seal,
)
from tasks.lib.copy.verify import Verified, _compare_trees, _repair, _verification_failed, verify_copy
from tasks.lib.manifest import Entry, normalize
from tasks.lib.progress import Progress, human
from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.copy")


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
    prefilled: Mapping[str, PassResult] | None = None,
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
    anything is copied (see the module doc). `prefilled`: filesystems already
    made from their source's blocks (tasks/lib/copy/blocks.py), whose own pass
    is skipped; the verification covers them like every other.
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
                              Path(scratch), started_at, tool_versions(), defer_flags, unlock, prefilled or {})
    finally:
        log_.close()


def _full_copy(source: Path, target: Path, scope: _Scope, method: Method, excluded: Sequence[str],
               swaps: Sequence[str], verify: bool, progress: Callable[[Progress], None] | None, seal: Path | None,
               log_: _Log, scratch: Path, started_at: str, tools: dict[str, str], defer: int,
               unlock: Sequence[str], prefilled: Mapping[str, PassResult]) -> CopyResult:
    points = scope.points
    if seal is not None:
        seal.unlink(missing_ok=True)  # from here on the target changes: no old seal may vouch for it
    sizes = {mp: _used(source / mp.lstrip("/")) for mp in points}
    to_copy = [size for mp, size in sizes.items() if mp not in prefilled]  # what this run's passes copy
    watch = _Watch(total_bytes=sum(s[0] for s in to_copy), total_files=sum(s[1] for s in to_copy), callback=progress)
    log_.write(f"copy {source} -> {target} by {method}: filesystems {' '.join(points)}; "
               f"contents excluded: {' '.join(excluded)}; swap files left out: {' '.join(swaps) or 'none'}; "
               f"{tools['rsync']}; {tools['tar']}")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flags") as pool:
        # The source's flags are read beside the tools (the source is read-only), unless a pass
        # resumes into data: then an earlier fix may have locked entries that pass must write. A
        # filesystem this run made by blocks is not written by any pass (the mount points in it
        # that passes write into were cleared of their flags: blocks.py), and its flags are set
        # as the source's once the passes are done, like every other's.
        scan = pool.submit(_scan_flags, source, excluded, swaps, points, log_)
        if any(mp not in prefilled and (into := target / mp.lstrip("/")).is_dir() and holds_data(into)
               for mp in points):
            _unlock(target, [*(p for p, bits in scan.result().items() if bits & inodeflags.DEFERRED), *unlock],
                    log_)
        # A prefilled filesystem's contents were cleared of the same exclusions (tasks/lib/copy/blocks.py).
        passes = [dataclasses.replace(prefilled[mp], excluded_contents=tuple(scope.excluded[mp]),
                                      swap_files=tuple(scope.omitted[mp])) if mp in prefilled else
                  _copy_filesystem(source, target, mp, method, scope.excluded[mp], scope.omitted[mp], sizes[mp],
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
        def expected(ours: Entry) -> Entry:
            return _expected_entry(ours, defer, refused)

        # Listed before verification reads anything: see SEAL_FORMAT.
        listings = _settled_listings(source, target, scope, scratch) if seal is not None else None
        verified, differences = _compare_trees(source, target, points, excluded, swaps, log_, expected)
        if differences and any(p.resumed for p in passes):
            # Not a failed copy yet: rsync's quick check cannot see every change (see _repair).
            repaired = _repair(source, target, scope, differences, log_, scratch)
            # rsync sets no inode flags: those of every entry it made or found different, as the view says.
            again = {d.path: verified.expected_flags[d.path] for d in differences if d.what != "extra"}
            refused.update(_restore_flags(target, again, defer, log_))
            log.info("verification found %d difference(s) rsync's quick check missed: copied again", repaired)
            log_.write(f"repaired {repaired} entries; verifying again")
            listings = _settled_listings(source, target, scope, scratch) if seal is not None else None
            verified, differences = _compare_trees(source, target, points, excluded, swaps, log_, expected)
        if differences:
            raise _verification_failed(differences, log_)
        flags = _flag_outcome(verified.source_flags, defer, refused)
        passes = _with_tar_figures(passes, verified)
        source_manifest = verified.source
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


def _with_tar_figures(passes: Sequence[PassResult], verified: Verified) -> list[PassResult]:
    """A tar pass wrote every regular file of its filesystem: count them from the source's side of the verification."""
    result = []
    for item in passes:
        if item.tool.startswith("tar"):
            count, size = verified.by_filesystem.get(item.mountpoint, (0, 0))
            item = dataclasses.replace(item, bytes_transferred=size, files_transferred=count)
        result.append(item)
    return result

__all__ = [
    "ALWAYS_EXCLUDED",
    "DEFAULT_METHOD",
    "METHODS",
    "RECEIPT_FORMAT",
    "RECEIPT_VERSION",
    "SEAL_FORMAT",
    "SEAL_VERSION",
    "SETTLE_COARSE",
    "SETTLE_FINE",
    "CopyResult",
    "FlagOutcome",
    "Listing",
    "Method",
    "PassResult",
    "_expected_view",
    "_flag_outcome",
    "_used",
    "assign",
    "copy_tree",
    "filesystem_of",
    "holds_data",
    "human",
    "list_filesystem",
    "rsync_argv",
    "rsync_filters",
    "tar_argvs",
    "tar_filters",
    "target_matches_seal",
    "tool_versions",
    "verify_copy",
]
