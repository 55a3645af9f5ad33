"""The per-host resource journal: every kernel resource a stage makes, recorded as it is made.

A SIGKILLed stage (an OOM kill, a `kill -9`, a CI job cut off) undoes
nothing: its loop devices stay attached, its mounts mounted, its LVs active,
its md arrays assembled, its qemu processes running. A scan of `findmnt` and
`losetup` finds some of that, never an activated LV or an assembled array. So
every context manager that makes a kernel resource (tasks/lib/resources.py,
storage.py, overlay.py, bootcheck.py) goes through `resource()` here, which
appends one JSON record per line to `<run_dir>/resources.journal` as the
resource is made (fsync'ed before anything else happens) and another when its
context manager has undone it. What is made and not released is still held:
the next stage of the host undoes it, newest first (tasks/lib/unwind.py),
before it makes anything itself (tasks/lib/pipeline.py).

The run directory is on tmpfs (/run/p2v/<host>-<key>), and so is the journal:
every resource it can name dies with a reboot too, so a journal that
outlived its resources would only mislead.

The journal is found through a context variable that the stage runner sets
for the host it runs (`journaling`). Without one (tests that call a resource
directly, bench, the live build), nothing is journaled and every context
manager behaves as it always did.

Records (schema: tasks/schemas/resource-journal.schema.json, one per line):

    {"event": "made", "seq": 3, "kind": "loop", "resource": {"device": "/dev/loop7", ...}, "pid": 4711, ...}
    {"event": "released", "seq": 4, "of": 3, "how": "undone", ...}

A resource whose name is known before it is made (a mount point, an md node,
the VGs to activate, an export file) is recorded before it is made, so that a
kill while making it still leaves its record; the undo then checks whether it
is there at all. A loop device's name and a process's pid are known only
afterwards: they are recorded the moment they are known, and the sweep of
`release_stale` stays as a second net for that instant.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import jsonschema

from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.journal")

JOURNAL_NAME = "resources.journal"
FORMAT = "p2v-resource-journal"
VERSION = 1
SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "resource-journal.schema.json"
# What each kind's record holds (the schema says the same, with types).
KINDS: Mapping[str, tuple[str, ...]] = {
    "loop": ("device", "backing", "offset"),
    "mount": ("source", "target"),
    "lvm": ("vgs", "devices", "dm_uuids"),
    "md": ("node", "uuid", "members"),
    "fuse-export": ("export",),
    "process": ("pid", "start_time", "command"),
}
# released.how: undone by its own context manager; never made (making it failed); undone, or
# found gone already, by the next run (unwind).
HOW = ("undone", "never-made", "undone-by-next-run", "gone")

T = TypeVar("T")


class JournalError(P2VError):
    """A journal line that is not a record this p2v writes."""


@dataclass(frozen=True)
class Held:
    """A resource the journal says was made and not released."""

    seq: int
    kind: str
    resource: Mapping[str, Any]

    def describe(self) -> str:
        r = self.resource
        if self.kind == "loop":
            return f"loop {r['device']} on {r['backing']}"
        if self.kind == "mount":
            return f"mount {r['target']}"
        if self.kind == "lvm":
            return f"LVM {', '.join(r['vgs'])} active (devices {','.join(r['devices'])})"
        if self.kind == "md":
            return f"md array {r['node']} (uuid {r['uuid']})"
        if self.kind == "fuse-export":
            return f"FUSE export {r['export']}"
        return f"process {'group ' if r.get('group') else ''}{r['command']} (pid {r['pid']})"


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))


def check_record(record: Any, where: str) -> None:
    """Refuse a record the schema refuses, in one line naming where it is."""
    errors = sorted(_validator().iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        path = ".".join(map(str, errors[0].absolute_path)) or "(record)"
        raise JournalError(f"{where}: {path}: {errors[0].message}",
                           hint="a resource journal of another p2v version, or edited by hand")


def made_record(seq: int, kind: str, resource: Mapping[str, Any], pid: int) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "event": "made", "seq": seq, "kind": kind,
            "resource": dict(resource), "pid": pid}


def released_record(seq: int, of: int, how: str, pid: int) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "event": "released", "seq": seq, "of": of, "how": how,
            "pid": pid}


def parse(text: str, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The journal's records, and a line for each line that is not one (left out, never guessed at).

    A line cut short by a kill in the middle of a write is such a line; the
    release_stale sweep still looks for what it may have named.
    """
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            check_record(record, f"{where}:{number}")
        except ValueError as error:
            problems.append(f"{where}:{number}: not JSON ({error})")
            continue
        except JournalError as error:
            problems.append(str(error))
            continue
        records.append(record)
    return records, problems


def held(records: Sequence[Mapping[str, Any]]) -> list[Held]:
    """What was made and not released, newest first: the order to undo it in."""
    released = {r["of"] for r in records if r["event"] == "released"}
    return [Held(seq=r["seq"], kind=r["kind"], resource=r["resource"])
            for r in sorted(records, key=lambda r: r["seq"], reverse=True)
            if r["event"] == "made" and r["seq"] not in released]


def read(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], []
    return parse(text, str(path))


class Journal:
    """Appends records to one host's journal file, each one fsync'ed before the caller goes on."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        records, _ = read(path)
        self._seq = max((r["seq"] for r in records), default=0)
        self._held: set[int] = {h.seq for h in held(records)}

    def _append(self, build: Callable[[int], dict[str, Any]]) -> int:
        with self._lock:
            self._seq += 1
            record = build(self._seq)
            check_record(record, str(self.path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._seq

    def made(self, kind: str, resource: Mapping[str, Any]) -> int:
        seq = self._append(lambda seq: made_record(seq, kind, resource, os.getpid()))
        self._held.add(seq)
        return seq

    def released(self, of: int, how: str = "undone") -> None:
        self._append(lambda seq: released_record(seq, of, how, os.getpid()))
        self._held.discard(of)

    def holds_nothing(self) -> bool:
        return not self._held


_current: contextvars.ContextVar[Journal | None] = contextvars.ContextVar("p2v_resource_journal", default=None)


def current() -> Journal | None:
    return _current.get()


def journal_path(run_dir: Path) -> Path:
    return run_dir / JOURNAL_NAME


@contextlib.contextmanager
def journaling(run_dir: Path) -> Iterator[Journal]:
    """Journal every resource made in this block into the host's run dir.

    The file appears with the first record; when the block ends with nothing
    held (every context manager undid what it made) it is removed, and the run
    dir with it if nothing else is there. One whose undo failed stays, for the
    next run to finish.
    """
    journal = Journal(journal_path(run_dir))
    token = _current.set(journal)
    try:
        yield journal
    finally:
        _current.reset(token)
        if journal.holds_nothing():
            journal.path.unlink(missing_ok=True)
            # Left empty (every mount point below it removed): /run/p2v does not gather a directory per
            # host and project ever converted. One that still holds something stays for the next run.
            with contextlib.suppress(OSError):
                run_dir.rmdir()


@contextlib.contextmanager
def resource(kind: str, make: Callable[[], T], undo: Callable[[T], object],
             describe: Mapping[str, Any] | Callable[[T], Mapping[str, Any]], *,
             halfway: Callable[[], object] | None = None) -> Iterator[T]:
    """Make a kernel resource, journal it, yield it; undo it on the way out and journal that.

    `describe` is what the next run needs to undo it after a kill: a mapping
    when that is known before the resource is made (then it is recorded first),
    or a function of what `make` returned (a loop device's name, a process's
    pid; recorded right after). The release is journaled only once `undo`
    has succeeded: a failed undo stays held, for the next run. `halfway` undoes
    what a `make` that failed may have made in part (vgchange activates LV
    after LV).
    """
    journal = current()
    seq = None
    if journal is not None and not callable(describe):
        seq = journal.made(kind, describe)
    try:
        thing = make()
    except BaseException:
        if halfway is not None:
            halfway()  # when this raises too, the record stays held, for the next run
        if journal is not None and seq is not None:
            journal.released(seq, "never-made" if halfway is None else "undone")
        raise
    try:
        if journal is not None and callable(describe):
            seq = journal.made(kind, describe(thing))
        yield thing
    finally:
        undo(thing)
        if journal is not None and seq is not None:
            journal.released(seq)


def process_start_time(pid: int) -> int | None:
    """When a process started, in clock ticks after boot (/proc/<pid>/stat field 22); None when it is gone.

    A pid and its start time name one process: a recycled pid has another.
    """
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rpartition(")")[2].split()
    return int(fields[19])  # fields[0] is field 3 (state)


def process_record(pid: int, command: str) -> dict[str, Any]:
    return {"pid": pid, "start_time": process_start_time(pid) or 0, "command": command}
