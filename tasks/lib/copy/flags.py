"""Inode flags (chattr): read on the source, set on the target after the tools ran, read back."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from tasks.lib import inodeflags
from tasks.lib import manifest as manifests
from tasks.lib.copy.model import FlagOutcome
from tasks.lib.copy.passes import _Log
from tasks.lib.manifest import Entry, Manifest, shown
from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.copy")


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


def _expected_entry(entry: Entry, defer: int, refused: Mapping[str, Mapping[int, str]]) -> Entry:
    """A source entry as the target is to hold it: without the deferred flags and those the target did not keep."""
    if not entry.flags:
        return entry
    bits = inodeflags.bits_of(entry.flags)
    expected = bits & ~defer & ~sum(refused.get(entry.path, {}))
    return replace(entry, flags=inodeflags.letters(expected)) if expected != bits else entry


def _expected_view(source: Manifest, defer: int, refused: Mapping[str, Mapping[int, str]]) -> Manifest:
    """The whole source as the target is to hold it (_expected_entry of every entry)."""
    return replace(source, entries={path: _expected_entry(entry, defer, refused)
                                    for path, entry in source.entries.items()})


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
