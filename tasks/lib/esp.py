"""The EFI system partition (vfat), read and written through its device node with mtools.

This kernel has no vfat driver (containers and this project's CI neither),
so the ESP is never mounted: mtools (`mdir`, `mattrib`, `mcopy`, `mmd`,
`mdel`, `mdeltree`, `minfo`) read and write the FAT filesystem on the
partition node itself, the same way on the live system as here. A source ESP
is only ever opened through a read-only node (a read-only loop device, or a
disk set read-only with blockdev), so mtools cannot write it either.

What the rest of p2v sees:

- `snapshot(node, scratch)`: every directory and file of the ESP, with each
  file's size and sha256 and its FAT attributes (read-only, hidden, system),
  read by extracting the whole ESP (`mcopy -s`) and checked against mtools'
  own listing, so a file the extraction missed is an error, never a gap.
- `extract(node, directory)`: the ESP's files into a local directory, for a
  view of the tree (inspect's description, the fix stage's working copy).
- `write_tree(node, directory, before=...)`: make the ESP hold exactly what
  a local directory holds (files written, directories made, what is gone
  deleted), then set FAT attributes, then prove it with a new snapshot.
- `usage(node)`: size and used bytes, as statvfs would count them.
- `esp_view(node, point)`: the ESP's files on a tmpfs at its mount point in
  a tree, read-only unless asked: what a vfat mount would show, for code
  that reads the tree (inspect's description of the system, fix's planner).

Compared: paths, types, sizes, contents (sha256) and the R/H/S attributes.
Not compared: the archive bit (mcopy sets it on every file it writes, a
backup tool's flag that no bootloader reads) and times (FAT keeps local time
in 2-second steps; `mcopy -m` carries them over as well as FAT can).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.lib.resources import mounted
from tasks.lib.runner import P2VError, Result, run

# No geometry sanity checks (a partition node or image has none), and never ask on a name clash.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
KEPT_ATTRIBUTES = "RHS"  # read-only, hidden, system; the archive bit is not kept (module docstring)


@dataclass(frozen=True)
class EspEntry:
    path: str  # "/EFI/debian/grubx64.efi", as the ESP spells it
    kind: Literal["dir", "file"]
    size: int  # 0 for directories
    sha256: str | None  # None for directories
    attributes: str  # the kept FAT attributes set on it, in KEPT_ATTRIBUTES order ("" for none)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "size": self.size, "sha256": self.sha256,
                "attributes": self.attributes}


@dataclass(frozen=True)
class EspSnapshot:
    entries: tuple[EspEntry, ...]  # sorted by path

    @property
    def by_path(self) -> dict[str, EspEntry]:
        return {entry.path: entry for entry in self.entries}

    @property
    def files(self) -> int:
        return sum(1 for entry in self.entries if entry.kind == "file")

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self.entries)

    def digest(self) -> str:
        text = "".join(f"{e.path}\0{e.kind}\0{e.size}\0{e.sha256}\0{e.attributes}\n" for e in self.entries)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- parsing mtools' output (pure)


def parse_mdir_bare(text: str) -> dict[str, Literal["dir", "file"]]:
    """`mdir -/ -a -b ::/` -> {path: kind}: one `::/path` per line, directories ending in '/'."""
    found: dict[str, Literal["dir", "file"]] = {}
    for line in text.splitlines():
        if not line.startswith("::/"):
            continue
        path = line[2:]
        if path.endswith("/"):
            found[path.rstrip("/")] = "dir"
        else:
            found[path] = "file"
    found.pop("", None)
    return found


_MATTRIB = re.compile(r"^(?P<flags>[ A-Z]*?)\s*(?P<path>::/.*)$")


def parse_mattrib(text: str) -> dict[str, str]:
    """`mattrib -/ ::/` -> {path: kept attributes}: `  A  SH      ::/EFI/x.efi` -> {"/EFI/x.efi": "HS"}."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _MATTRIB.match(line)
        if not match:
            continue
        path = match["path"][2:].rstrip("/")
        if path:
            found[path] = "".join(flag for flag in KEPT_ATTRIBUTES if flag in match["flags"])
    return found


def parse_minfo(text: str) -> dict[str, int]:
    """The numbers of `minfo` that size a FAT filesystem."""
    wanted = {"sector size": "sector_size", "cluster size": "cluster_sectors", "reserved (boot) sectors": "reserved",
              "fats": "fats", "max available root directory slots": "root_slots", "small size": "small_size",
              "big size": "big_size", "sectors per fat": "fat_sectors", "Big fatlen": "big_fatlen",
              "free clusters": "free_clusters"}
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":") if ":" in line else line.partition("=")
        if not sep:
            continue
        name = wanted.get(key.strip())
        number = re.match(r"\s*(\d+)", rest)
        if name and number:
            values[name] = int(number.group(1))
    return values


def parse_free_bytes(text: str) -> int | None:
    """The last `N bytes free` of an mdir listing (digits may be grouped by spaces)."""
    found = re.findall(r"([\d ]+) bytes free", text)
    return int(found[-1].replace(" ", "")) if found else None


def fat_usage(minfo: Mapping[str, int], free_bytes: int) -> tuple[int, int]:
    """(size, used) in bytes as statvfs counts them: data clusters, and those not free."""
    sector = minfo["sector_size"]
    total = minfo.get("small_size") or minfo["big_size"]
    fat = minfo.get("fat_sectors") or minfo.get("big_fatlen", 0)
    root_dir = -(-minfo.get("root_slots", 0) * 32 // sector)
    data_sectors = total - minfo["reserved"] - minfo["fats"] * fat - root_dir
    cluster = minfo["cluster_sectors"] * sector
    size = data_sectors // minfo["cluster_sectors"] * cluster
    return size, max(0, size - free_bytes)


def differences(expected: EspSnapshot, found: EspSnapshot) -> list[str]:
    """What `found` lacks, has in excess or holds differently, one line each (empty: equal)."""
    want, have = expected.by_path, found.by_path
    lines = [f"{path}: missing" for path in sorted(want.keys() - have.keys())]
    lines += [f"{path}: not on the source" for path in sorted(have.keys() - want.keys())]
    for path in sorted(want.keys() & have.keys()):
        a, b = want[path], have[path]
        if a.kind != b.kind:
            lines.append(f"{path}: a {b.kind}, not a {a.kind}")
        elif (a.size, a.sha256) != (b.size, b.sha256):
            lines.append(f"{path}: {b.size} bytes sha256 {b.sha256}, not {a.size} bytes sha256 {a.sha256}")
        if a.attributes != b.attributes:
            lines.append(f"{path}: attributes {b.attributes or '-'}, not {a.attributes or '-'}")
    return lines


def local_entries(directory: Path, attributes: Mapping[str, str] | None = None) -> EspSnapshot:
    """A local directory as an ESP snapshot (FAT attributes from `attributes`, by path)."""
    entries = []
    for current, dirs, files in os.walk(directory):
        base = "/" + os.path.relpath(current, directory) if current != str(directory) else ""
        for name in dirs:
            path = f"{base}/{name}"
            if Path(current, name).is_symlink():
                raise P2VError(f"{path}: only files and directories can be written to a FAT filesystem")
            entries.append(EspEntry(path, "dir", 0, None, (attributes or {}).get(path, "")))
        for name in files:
            path = f"{base}/{name}"
            local = Path(current, name)
            if local.is_symlink() or not local.is_file():
                raise P2VError(f"{path}: only files and directories can be written to a FAT filesystem")
            digest = hashlib.sha256(local.read_bytes()).hexdigest()
            entries.append(EspEntry(path, "file", local.stat().st_size, digest, (attributes or {}).get(path, "")))
    return EspSnapshot(tuple(sorted(entries, key=lambda e: e.path)))


# ---------------------------------------------------------------- commands


def _mtools(argv: Sequence[str], *, check: bool = True) -> Result:
    return run(argv, env=MTOOLS_ENV, check=check, hint="mtools reads the FAT filesystem on the partition node itself")


def _is_empty(node: str) -> bool:
    # The recursive listings fail with "File ::/ not found" on an empty root; this one does not.
    return not _mtools(["mdir", "-i", node, "-a", "-b", "::/"]).stdout.strip()


def listing(node: str) -> dict[str, Literal["dir", "file"]]:
    if _is_empty(node):
        return {}
    return parse_mdir_bare(_mtools(["mdir", "-i", node, "-/", "-a", "-b", "::/"]).stdout)


def attributes(node: str) -> dict[str, str]:
    if _is_empty(node):
        return {}
    return parse_mattrib(_mtools(["mattrib", "-i", node, "-/", "::/"]).stdout)


def usage(node: str) -> tuple[int, int]:
    """(filesystem size, used bytes) of the FAT filesystem on `node`."""
    info = parse_minfo(_mtools(["minfo", "-i", node, "::"]).stdout)
    free = parse_free_bytes(_mtools(["mdir", "-i", node, "-a", "::/"]).stdout)
    if free is None or "sector_size" not in info:
        raise P2VError(f"mtools did not report the size of the FAT filesystem on {node}")
    return fat_usage(info, free)


def extract(node: str, directory: Path) -> dict[str, Literal["dir", "file"]]:
    """Copy every file of the ESP into `directory` (empty), and prove none was missed; return the listing."""
    found = listing(node)
    if found:
        _mtools(["mcopy", "-i", node, "-s", "-p", "-m", "-n", "-Q", "::/*", f"{directory}/"])
    extracted = {entry.path: entry.kind for entry in local_entries(directory).entries}
    if extracted != found:
        missing = sorted(set(found) - set(extracted))
        extra = sorted(set(extracted) - set(found))
        raise P2VError(f"reading the FAT filesystem on {node} was incomplete: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}", hint="check it with fsck.fat -n on the live system")
    return found


def snapshot(node: str, scratch: Path) -> EspSnapshot:
    """Every entry of the ESP with its contents' sha256 and FAT attributes (read through `scratch`)."""
    with tempfile.TemporaryDirectory(prefix="esp-", dir=scratch) as directory:
        extract(node, Path(directory))
        return local_entries(Path(directory), attributes(node))


def write_tree(node: str, directory: Path, *, before: EspSnapshot, attributes_of: Mapping[str, str],
               scratch: Path) -> EspSnapshot:
    """Make the ESP on `node` hold exactly `directory`; return its snapshot, proven equal.

    `before` is what the ESP holds now (an empty snapshot for a new ESP):
    only what differs is written, so untouched files keep their clusters and
    their attributes. `attributes_of` gives the FAT attributes each path must
    end up with (by path; missing means none).
    """
    wanted = local_entries(directory, attributes_of)
    want, have = wanted.by_path, before.by_path
    gone = [path for path, entry in have.items() if path not in want or want[path].kind != entry.kind]
    # Deepest first; a directory goes with everything in it.
    for path in sorted(gone, key=lambda p: p.count("/"), reverse=True):
        if any(path.startswith(other + "/") for other in gone if have[other].kind == "dir"):
            continue
        if have[path].kind == "dir":
            _mtools(["mdeltree", "-i", node, f"::{path}"])
        else:
            _mtools(["mattrib", "-i", node, "-r", f"::{path}"])  # mdel refuses a read-only file
            _mtools(["mdel", "-i", node, f"::{path}"])
    new_dirs = sorted((p for p, e in want.items() if e.kind == "dir" and (p in gone or p not in have)),
                      key=lambda p: (p.count("/"), p))
    if new_dirs:
        _mtools(["mmd", "-i", node, *(f"::{path}" for path in new_dirs)])
    def differs(entry: EspEntry) -> bool:
        old = have.get(entry.path)
        return entry.path in gone or old is None or (old.size, old.sha256) != (entry.size, entry.sha256)

    changed = [entry for entry in want.values() if entry.kind == "file" and differs(entry)]
    by_parent: dict[str, list[str]] = {}
    for entry in changed:
        by_parent.setdefault(entry.path.rsplit("/", 1)[0], []).append(entry.path)
    for parent, paths in sorted(by_parent.items()):
        for path in paths:  # a read-only file is not overwritten: clear the flag first
            if path in have and "R" in have[path].attributes:
                _mtools(["mattrib", "-i", node, "-r", f"::{path}"])
        _mtools(["mcopy", "-i", node, "-p", "-m", "-Q", "-D", "o",
                 *(str(directory) + path for path in sorted(paths)), f"::{parent}/"])
    _set_attributes(node, wanted.entries, attributes(node))
    found = snapshot(node, scratch)
    problems = differences(wanted, found)
    if problems:
        raise P2VError(f"the ESP on {node} does not hold what was written: {'; '.join(problems[:5])}"
                       + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return found


def _set_attributes(node: str, entries: Iterable[EspEntry], current: Mapping[str, str]) -> None:
    for entry in entries:
        now = current.get(entry.path, "")
        changes = [f"+{flag.lower()}" for flag in KEPT_ATTRIBUTES if flag in entry.attributes and flag not in now]
        changes += [f"-{flag.lower()}" for flag in KEPT_ATTRIBUTES if flag in now and flag not in entry.attributes]
        if changes:
            _mtools(["mattrib", "-i", node, *changes, f"::{entry.path}"])


EMPTY = EspSnapshot(())

# A mounted ESP as Debian's fstab has it (umask=0077): only root reads it.
VIEW_MODE = "0700"


def copy_esp(source_node: str, target_node: str, scratch: Path) -> dict[str, Any]:
    """Make the target ESP hold what the source ESP holds, proven against the source; return the receipt."""
    with tempfile.TemporaryDirectory(prefix="esp-copy-", dir=scratch) as directory:
        files = Path(directory) / "files"
        files.mkdir()
        extract(source_node, files)
        source_attributes = attributes(source_node)
        before = snapshot(target_node, scratch)
        written = write_tree(target_node, files, before=before, attributes_of=source_attributes, scratch=scratch)
    # Read the source again, independently of the copy that was written from.
    source = snapshot(source_node, scratch)
    problems = differences(source, written)
    if problems:
        raise P2VError(f"the copied ESP differs from the source ESP: {'; '.join(problems[:5])}")
    changed = len(differences(before, written))
    return {"files": source.files, "bytes": source.bytes, "entries": len(source.entries), "digest": source.digest(),
            "changed_entries": changed, "verified": True,
            "verified_by": "listing, sizes, sha256 and R/H/S attributes of every entry against the source ESP"}


@contextlib.contextmanager
def esp_working_copy(node: str, point: Path, scratch: Path) -> Iterator[Path]:
    """A writable view of the ESP at `point`; on success what changed there is written back and proven.

    On an exception nothing is written: the ESP stays as it was.
    """
    before = snapshot(node, scratch)
    with esp_view(node, point, writable=True) as view:
        yield view
        write_tree(node, view, before=before, attributes_of={e.path: e.attributes for e in before.entries},
                   scratch=scratch)


@contextlib.contextmanager
def esp_view(node: str, point: Path, *, writable: bool = False) -> Iterator[Path]:
    """The ESP's files extracted onto a tmpfs mounted at `point` (unmounted afterwards).

    Writing to a writable view changes nothing on the ESP: `write_tree` does
    that, from the view, when the caller is done.
    """
    with mounted("tmpfs", point, fstype="tmpfs", options=[f"mode={VIEW_MODE}"]) as view:
        extract(node, view)
        if not writable:
            run(["mount", "-o", "remount,ro", os.fspath(view)])
        yield view
