"""Turn stages and specs into doit tasks, and run one stage for one host.

A stage is declared, not coded, here: its target file in the workdir, the
targets of earlier stages it reads, the part of the spec it depends on, and
the function that does the work. `stage_tasks` expands it to one doit subtask
per host. `run_stage` gives every stage the same guarantees:

- a log per host and stage in `<workdir>/logs/<stage>.log`;
- the target is written as `<target>.partial` and renamed only on success, and
  an old target is removed first so a failed rerun never leaves one behind;
- an operator error (`P2VError`) fails the task with one clear line, not a
  traceback;
- SIGTERM and SIGHUP (a CI job's timeout, a closed terminal) unwind the stage
  like ^C does: every mount, loop device and process it made is released on
  the way out, and the run ends with one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from tasks.lib import journal, state, unwind
from tasks.lib.paths import fsync_directory
from tasks.lib.resources import release_stale
from tasks.lib.runner import P2VError
from tasks.lib.spec import Spec

log = logging.getLogger("p2v")


@dataclass(frozen=True)
class StageRun:
    """What a stage's function gets: the host, where to write, and its inputs."""

    spec: Spec
    stage: str
    partial: Path  # write the target here; the pipeline renames it
    log_path: Path

    def input(self, name: str) -> Path:
        return self.spec.artifact(name)


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    target: str
    inputs: tuple[str, ...]
    run: Callable[[StageRun], None]
    # The spec fields this stage's result depends on; a change reruns it.
    config: Callable[[Spec], Mapping[str, Any]]
    # Further files the stage writes next to its target (each atomically, by
    # itself, before the target is renamed into place), so that later stages
    # can depend on them.
    outputs: tuple[str, ...] = ()
    # What the stage does once its target is in place, and only then: a kill before the rename leaves
    # the stage unfinished, and what it keeps for the run that finishes it must still be there.
    committed: Callable[[Spec], None] | None = None


def _stage_logger(log_path: Path) -> logging.Handler:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    return handler


@contextlib.contextmanager
def stage_logging(log_path: Path) -> Iterator[None]:
    root = logging.getLogger()
    handler = _stage_logger(log_path)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def ensure_console_logging() -> None:
    """INFO to stderr for operators; DEBUG (commands run) only in the log files."""
    root = logging.getLogger()
    if not any(getattr(h, "_p2v_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter("%(message)s"))
        console._p2v_console = True  # type: ignore[attr-defined]
        # A stage failure reaches the console once, as doit's TaskFailed line.
        console.addFilter(lambda record: getattr(record, "console", True))
        root.addHandler(console)


@contextlib.contextmanager
def host_lock(spec: Spec) -> Iterator[None]:
    """One p2v stage per host at a time, across processes and machines sharing the
    workdir where the filesystem supports locks. Held for one stage: with
    `doit -n N`, the next stage of a host may run in another worker process.
    It also makes releasing a killed run's leftovers safe: nobody else is using them."""
    lock_path = spec.state_dir / "lock"
    try:
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise P2VError(f"cannot create {lock_path}: {error.strerror}", hint="the workdir must be writable") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise P2VError(f"another p2v run is working on host {spec.host} (lock {spec.state_dir / 'lock'})",
                           hint="wait for it to finish; two runs on one host would corrupt its image") from None
        yield
    finally:
        os.close(fd)  # releases the lock


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(SystemExit):
    """A signal asked the run to stop. A SystemExit, so that no `except Exception`
    swallows it and doit ends the run (and its workers) as for ^C; every context
    manager on the way out releases what it made."""


def _stop(signum: int, frame: object) -> None:
    # One orderly stop: a second signal must not cut the clean-up short (SIGKILL still can).
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(f"p2v: stopped by {signal.Signals(signum).name}; what the running stage had mounted or "
                  "attached was released (rerun the same command to resume)")


def stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise `Stopped` (only the main thread may set handlers).
    Returns the handlers they had, for `restore_signals`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}


def restore_signals(previous: Mapping[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def run_stage(stage: Stage, spec: Spec) -> TaskFailed | None:
    ensure_console_logging()
    # For the stage's time only: a caller in the same process (a test) keeps its own handlers.
    previous = stop_on_signals()
    try:
        return _run_stage(stage, spec)
    finally:
        restore_signals(previous)


def _run_stage(stage: Stage, spec: Spec) -> TaskFailed | None:
    target = spec.artifact(stage.target)
    log_path = spec.log_dir / f"{stage.name}.log"
    try:
        spec.log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return TaskFailed(f"{stage.name}:{spec.host}: cannot create the log directory {spec.log_dir}: "
                          f"{error.strerror} (hint: the workdir must be writable)")
    with stage_logging(log_path):
        log.info("== %s:%s (log: %s)", stage.name, spec.host, log_path)
        started = time.monotonic()
        try:
            with host_lock(spec):
                _run_locked(stage, spec, target, log_path)
        except (P2VError, OSError) as error:
            log.error("%s:%s failed: %s", stage.name, spec.host, error, extra={"console": False})
            return TaskFailed(f"{stage.name}:{spec.host}: {error} [log: {log_path}]")
        except Stopped as stopped:
            log.error("%s:%s %s", stage.name, spec.host, str(stopped.code).removeprefix("p2v: "),
                      extra={"console": False})
            raise
        log.info("== %s:%s done in %.1f s -> %s", stage.name, spec.host, time.monotonic() - started, target)
    return None


def _run_locked(stage: Stage, spec: Spec, target: Path, log_path: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    # What a killed run left: first what its resource journal names (LVs and md arrays too), newest
    # first; then a sweep for what a journal cannot name (a loop or a chroot command's group made in
    # the instant before its record, a run of a p2v without journal).
    unwind.undo_journal(spec.run_dir)
    released = release_stale(spec.run_dir, [spec.artifact("disk.img"), spec.artifact("disk.img.partial")],
                             scratch_dir=spec.scratch_dir, source_images=spec.source.images)
    if released:
        log.warning("released what an interrupted run left: %s", ", ".join(released))
    for stale in (target, *(spec.artifact(name) for name in stage.outputs)):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    spec.workdir.mkdir(parents=True, exist_ok=True)
    with journal.journaling(spec.run_dir):
        stage.run(StageRun(spec=spec, stage=stage.name, partial=partial, log_path=log_path))
    for written in (partial, *(spec.artifact(name) for name in stage.outputs)):
        if not written.exists():
            raise P2VError(f"stage {stage.name} finished without writing {written.name}")
    os.replace(partial, target)
    # The stamp is what tells a rerun (and the live runner's power-off) that the stage is done:
    # its rename must reach the disk, or the NFS server, before anything acts on it.
    fsync_directory(target.parent)
    # Only once the rename is durable: what the stage keeps for a rerun must outlive a power cut too.
    if stage.committed is not None:
        stage.committed(spec)


def stage_tasks(stage: Stage, specs: Sequence[Spec], after: Stage | None = None) -> Iterator[dict[str, Any]]:
    """One doit group per stage, one subtask per host, chained by files.

    `after` is the stage before this one in pipeline order. Files already order
    most stages, but two stages that read the same input (report and upload
    both read verified.stamp) would otherwise be scheduled side by side by
    `doit -n N`, and one would fail on the other's host lock. A task_dep orders
    them without making the later stage depend on the earlier one's content.
    """
    yield {"basename": stage.name, "name": None, "doc": stage.doc}
    for spec in specs:
        state.register_host(spec.host, spec.state_dir)
        yield {
            "basename": stage.name,
            "name": spec.host,
            "doc": f"{stage.doc} ({spec.host})",
            "actions": [(run_stage, [stage, spec])],
            "file_dep": [str(spec.artifact(name)) for name in stage.inputs],
            "task_dep": [f"{after.name}:{spec.host}"] if after is not None else [],
            "targets": [str(spec.artifact(name)) for name in (stage.target, *stage.outputs)],
            "uptodate": [config_changed(dict(stage.config(spec)))],
            "clean": True,
            "verbosity": 2,
        }


def convert_tasks(stages: Sequence[Stage], specs: Sequence[Spec]) -> Iterator[dict[str, Any]]:
    """`convert:<host>`: the whole chain for one host, up to the last stage."""
    yield {"basename": "convert", "name": None, "doc": "convert a host end to end (all stages)"}
    for spec in specs:
        state.register_host(spec.host, spec.state_dir)
        task: dict[str, Any] = {
            "basename": "convert",
            "name": spec.host,
            "doc": f"convert {spec.host} end to end",
            "actions": [(_report_done, [stages, spec])],
            "uptodate": [False],  # only prints where the host stands; the stages decide what runs
            "verbosity": 2,
        }
        if stages:
            # Every stage, not just the last: side products such as the report
            # are not inputs of the last stage but belong to a conversion.
            task["task_dep"] = [f"{stage.name}:{spec.host}" for stage in stages]
        yield task


def _report_done(stages: Sequence[Stage], spec: Spec) -> None:
    if not stages:
        print(f"{spec.host}: no stages exist yet; nothing to run")
        return
    last = spec.artifact(stages[-1].target)
    print(f"{spec.host}: {' -> '.join(s.target for s in stages)} complete ({last})")
