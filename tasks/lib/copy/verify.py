"""The verification of a copy against the source's manifest, and the repair of what differs."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib import inodeflags
from tasks.lib import manifest as manifests
from tasks.lib.copy.commands import _order, _used, _within, filesystem_of
from tasks.lib.copy.flags import _expected_entry
from tasks.lib.copy.model import ALWAYS_EXCLUDED, APART_INODES, RSYNC_OPTIONS
from tasks.lib.copy.passes import _Log, _run_logged
from tasks.lib.copy.seal import _Scope
from tasks.lib.manifest import Entry, normalize, render_differences
from tasks.lib.runner import CommandError, P2VError


@dataclass
class Verified:
    """What a verification leaves for copy_tree: figures added up as both trees streamed past, not the trees."""

    source: manifests.Tally  # the view of the source that the target was compared with (its digest: the receipt's)
    target_entries: int = 0
    source_flags: dict[str, int] = field(default_factory=dict)  # path -> flags as read, of the entries that have any
    expected_flags: dict[str, int] = field(default_factory=dict)  # path -> the view's flags, of the entries that differ
    by_filesystem: dict[str, tuple[int, int]] = field(default_factory=dict)  # mountpoint -> (regular files, bytes)
    seconds: float = 0.0


def verify_copy(source: Path, target: Path, mountpoints: Sequence[str], *, log_file: Path,
                exclude_contents: Sequence[str] = (), swap_files: Sequence[str] = (), defer_flags: int = 0
                ) -> Verified:
    """Check a copy made by copy_tree (same arguments) again; return what the source's side added up to.

    Every inode flag but `defer_flags` must be on the target: one the target
    filesystem did not keep is a difference here.
    """
    points = _order(mountpoints)
    excluded = sorted({normalize(p) for p in (*ALWAYS_EXCLUDED, *exclude_contents)})
    swaps = sorted({normalize(p) for p in swap_files})
    log_ = _Log(log_file)
    try:
        verified, differences = _compare_trees(source, target, points, excluded, swaps, log_,
                                               lambda entry: _expected_entry(entry, defer_flags, {}))
        if differences:
            raise _verification_failed(differences, log_)
        return verified
    finally:
        log_.close()


def _verification_failed(differences: Sequence[manifests.Difference], log_file: _Log) -> P2VError:
    return P2VError(
        f"copy verification failed: {len(differences)} difference(s) between the source and the target:\n"
        + render_differences(differences, 20),
        hint=f"every difference is listed in {log_file.path}",
    )


def _compare_trees(source: Path, target: Path, points: Sequence[str], excluded: Sequence[str],
                   swaps: Sequence[str], log_file: _Log, expected: Callable[[Entry], Entry]
                   ) -> tuple[Verified, list[manifests.Difference]]:
    """Both trees read the same way and compared path by path as they stream past (see manifest.pair_entries);
    each source entry is first made what the target is to hold (`expected`: see _expected_entry).

    Held at once: the batches in flight, the entries whose inode has more than
    one link, the flags of the source entries that have any, and the differences.
    """
    # mkfs.ext4 makes lost+found; a source filesystem without one (xfs) does not need it copied.
    made_by_mkfs = [f"{mp.rstrip('/')}/lost+found" for mp in points
                    if not os.path.lexists(source / mp.lstrip("/") / "lost+found")]
    # Both trees at once: one side hashes while the other waits for its disk. Many small files
    # keep one interpreter's GIL busy, so big trees get a child interpreter each (two cores);
    # below APART_INODES, starting them costs more than it saves.
    inodes = sum(_used(source / mp.lstrip("/"))[1] for mp in points)
    apart = inodes >= APART_INODES
    started = time.monotonic()
    verified = Verified(source=manifests.Tally())
    differences: list[manifests.Difference] = []
    per_filesystem: dict[str, list[int]] = {mp: [0, 0] for mp in points}
    with manifests.read_entries(source, excluded, omit=swaps, mounts=points[1:], apart=apart) as ours, \
            manifests.read_entries(target, excluded, omit=[*swaps, *made_by_mkfs], mounts=points[1:],
                                   apart=apart) as theirs:
        for mine, other in manifests.pair_entries(ours, theirs):
            if mine is not None:
                if mine.flags:
                    verified.source_flags[mine.path] = inodeflags.bits_of(mine.flags)
                mine = expected(mine)
                verified.source.add(mine)
                if mine.type == "file" and mine.link in (None, mine.path):
                    holder = filesystem_of(mine.path, points)
                    if holder is not None:
                        per_filesystem[holder][0] += 1
                        per_filesystem[holder][1] += mine.size
            if other is not None:
                verified.target_entries += 1
            found = manifests.compare_pair(mine, other)
            if found:
                differences += found
                if mine is not None:
                    verified.expected_flags[mine.path] = inodeflags.bits_of(mine.flags)
    verified.by_filesystem = {mp: (count, size) for mp, (count, size) in per_filesystem.items()}
    verified.seconds = time.monotonic() - started
    log_file.write(f"verify: source {verified.source.files} entries, target {verified.target_entries} entries, "
                   f"compared in {verified.seconds:.1f} s ({'child interpreters' if apart else 'this process'}), "
                   f"{len(differences)} difference(s); source digest {verified.source.digest()}")
    for difference in differences:
        log_file.write(f"  {difference}")
    return verified, differences


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
