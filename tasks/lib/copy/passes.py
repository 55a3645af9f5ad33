"""One pass of one filesystem by rsync or by a tar pipe: the processes, their log, progress and failures."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from tasks.lib.copy.commands import _glob_escape, _used, rsync_argv, tar_argvs
from tasks.lib.copy.model import _NO_SPACE, _TOOL_ENV, LOG_TAIL_BYTES, RSYNC_OPTIONS, SAMPLE_SECONDS
from tasks.lib.progress import Progress, human
from tasks.lib.runner import CommandError, P2VError, run, which

log = logging.getLogger("p2v.copy")


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


def _nothing_to_inherit(target: Path) -> None:
    """Clear the setgid bit of the directory tar extracts into, until tar sets the directory's own mode.

    A directory made in a setgid directory is setgid (and so are those made in it), and GNU tar -x
    leaves that inherited bit on, whatever mode the archive gives (1.34, measured; its ACLs it does
    set as archived). The directory a filesystem is extracted into is its mount point on the target,
    which already has the mode of the source's mount point directory (hidden under the mount on the
    server): Debian's /var/mail is 2775, and a filesystem mounted there has lost+found 0700. The
    archive's "." member gives the directory its own mode once its contents are extracted.
    Verification would catch the difference; this is so that there is none.
    """
    mode = target.stat().st_mode
    if mode & stat.S_ISGID:
        os.chmod(target, stat.S_IMODE(mode) & ~stat.S_ISGID)


def _copy_tar(source: Path, target: Path, excluded: Sequence[str], omitted: Sequence[str], log_file: _Log,
              sample: Callable[[], None], scratch: Path) -> _Outcome:
    """One (empty) filesystem by tar, then its sockets by rsync; raises _PassFailed."""
    _nothing_to_inherit(target)
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
