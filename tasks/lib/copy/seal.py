"""The seal: stat-only listings of both trees that let a no-change rerun stop without copying (see SEAL_FORMAT)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.lib import inodeflags
from tasks.lib.copy.commands import _glob_escape, _order, assign
from tasks.lib.copy.model import (
    ALWAYS_EXCLUDED,
    LISTING_FORMAT,
    SEAL_FORMAT,
    SEAL_VERSION,
    SETTLE_COARSE,
    SETTLE_FINE,
    CopyResult,
    FlagOutcome,
    Method,
    PassResult,
)
from tasks.lib.copy.passes import _Log
from tasks.lib.manifest import Tally, normalize
from tasks.lib.paths import write_file_atomically
from tasks.lib.runner import run

log = logging.getLogger("p2v.copy")

LISTING_CHUNK = 1 << 20


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
    try:
        return _read_listing(listing, started_ns, timestamps)
    finally:
        listing.unlink()


def _read_listing(listing: Path, started_ns: int, timestamps: bool) -> Listing:
    """Digest, count and (`timestamps`) newest ctime of a listing, read a chunk at a time (millions of records)."""
    digest = hashlib.sha256()
    entries = 0
    newest = 0
    whole_seconds = True
    tail = b""
    with open(listing, "rb") as handle:
        while chunk := handle.read(LISTING_CHUNK):
            digest.update(chunk)
            entries += chunk.count(b"\0")
            if not timestamps:
                continue
            records = (tail + chunk).split(b"\0")
            tail = records.pop()  # the start of the next chunk's first record
            for record in records:
                ctime = record.split(b" ", 9)[8]
                newest = max(newest, _ns(ctime))
                whole_seconds = whole_seconds and ctime.endswith(b".0000000000")
    if not timestamps:
        return Listing(digest="sha256:" + digest.hexdigest(), entries=entries, started_ns=started_ns,
                       newest_ctime_ns=started_ns, whole_seconds=True)  # never settled: not for a seal
    return Listing(digest="sha256:" + digest.hexdigest(), entries=entries, started_ns=started_ns,
                   newest_ctime_ns=newest, whole_seconds=whole_seconds)


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


def _write_seal(path: Path, manifest: Tally, scope: _Scope, listings: Listings, tools: dict[str, str],
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
    write_file_atomically(path, json.dumps(seal, indent=1, sort_keys=True) + "\n")
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
