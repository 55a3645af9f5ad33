"""The one place p2v runs external commands.

Every failure becomes a `CommandError` that carries the command line, the exit
code (or signal) and the tail of its output, so that the message alone tells an
operator what broke. Commands are logged as `+ cmd` before they run.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("p2v.run")

# Tools print localized messages and dates otherwise; we parse some output.
_PINNED_ENV = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "LANGUAGE": ""}

TAIL_LINES = 20

# What a command in a chroot sees of the environment, besides the pinned locale.
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "TERM": "dumb",
              "DEBIAN_FRONTEND": "noninteractive"}


class P2VError(Exception):
    """An error meant for the operator: the message says what and what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


class CommandError(P2VError):
    def __init__(self, argv: Sequence[str], returncode: int, output: str, hint: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        if returncode < 0:
            how = f"killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exit code {returncode}"
        tail = "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])
        message = f"command failed ({how}): {shlex.join(self.argv)}"
        if tail:
            message += "\n--- output tail ---\n" + tail
        super().__init__(message, hint)


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def which(tool: str) -> str:
    found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise P2VError(f"{tool} not found", hint="run bin/install, or install the package that provides it")
    return found


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    capture: bool = True,
    hint: str | None = None,
    inherit_env: bool = True,
    own_group: bool = False,
) -> Result:
    """Run a command and return its output; raise CommandError on failure.

    `capture=False` lets the output through to the console (progress bars),
    at the price of an error message without an output tail.
    `inherit_env=False` gives the command `env` (and the pinned locale) alone.
    `own_group=True` runs it in a process group of its own, which is killed
    whole when the command ends, times out or is interrupted: what it started
    in the background (a package scriptlet's daemon) ends with it.
    """
    args = [os.fspath(a) for a in argv]
    if "/" not in args[0]:
        which(args[0])  # a clear "not found" beats FileNotFoundError
    log.debug("+ %s", shlex.join(args))
    full_env = {**(os.environ if inherit_env else {}), **_PINNED_ENV, **(env or {})}
    binary_input = isinstance(input, bytes)
    try:
        with subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else None,
            env=full_env,
            cwd=cwd,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            text=not binary_input,
            errors=None if binary_input else "replace",
            process_group=0 if own_group else None,
        ) as proc:
            released = _journal_group(proc.pid, args[0]) if own_group else _nothing
            try:
                raw_stdout, raw_stderr = proc.communicate(input, timeout=timeout)
            except BaseException:  # a timeout, or ^C: nothing of it may outlive us
                _kill(proc, own_group)
                released()
                raise
            if own_group:
                _kill(proc, own_group)
                released()
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise CommandError(args, -signal.SIGKILL, text, hint=f"timed out after {timeout} s") from None
    stdout = raw_stdout or ""
    stderr = raw_stderr or ""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, stdout + stderr, hint=hint)
    return Result(args, proc.returncode, stdout, stderr)


def _nothing() -> None:
    pass


def _journal_group(pid: int, command: str) -> Callable[[], None]:
    """Record a process group in the host's resource journal (tasks/lib/journal.py); returns what marks it
    released. A chroot command's group is not the stage's: a SIGKILL of the stage leaves it running, and
    holding the chroot's mounts, until the next run kills it."""
    from tasks.lib import journal  # here: journal uses this module's errors

    writer = journal.current()
    if writer is None:
        return _nothing
    seq = writer.made("process", {**journal.process_record(pid, command), "group": True})
    return lambda: writer.released(seq)


def kill_group(pgid: int) -> None:
    """SIGKILL a process group and wait until it has exited."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_group_gone(pgid)


def group_members(pgid: int) -> list[int]:
    return _group_members(pgid)


def _kill(proc: subprocess.Popen[Any], own_group: bool) -> None:
    """Kill the command (its whole group when it has one) and reap it."""
    try:
        if own_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()
    if own_group:
        _wait_group_gone(proc.pid)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat_file.parent.name))
    return members


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL is delivered asynchronously: wait until the group has exited, so that
    what comes next (unmounting a chroot's binds) does not find it still there."""
    deadline = time.monotonic() + timeout
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def output(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float | None = None) -> str:
    """Run and return stdout only, stripped of the trailing newline."""
    return run(argv, check=check, timeout=timeout).stdout.rstrip("\n")


def chroot_run(
    root: Path,
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float | None = None,
    capture: bool = True,
) -> Result:
    """Run a command inside a prepared chroot (see resources.chroot_binds).

    The command (package scriptlets, dracut, grub) gets a clean environment,
    `env` and a minimal base, never ours: no OS_* credential or other secret of
    the operator's shell reaches code from the source's packages. It runs in
    its own process group, killed whole on a timeout and when it ends.
    """
    chroot_env = {**CHROOT_ENV, **(env or {})}
    return run(["chroot", str(root), *argv], check=check, env=chroot_env, input=input, timeout=timeout,
               capture=capture, inherit_env=False, own_group=True)
