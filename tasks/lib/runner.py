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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("p2v.run")

# Tools print localized messages and dates otherwise; we parse some output.
_PINNED_ENV = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "LANGUAGE": ""}

TAIL_LINES = 20


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
) -> Result:
    """Run a command and return its output; raise CommandError on failure.

    `capture=False` lets the output through to the console (progress bars),
    at the price of an error message without an output tail.
    """
    args = [os.fspath(a) for a in argv]
    if "/" not in args[0]:
        which(args[0])  # a clear "not found" beats FileNotFoundError
    log.debug("+ %s", shlex.join(args))
    full_env = {**os.environ, **_PINNED_ENV, **(env or {})}
    binary_input = isinstance(input, bytes)
    try:
        proc = subprocess.run(
            args,
            input=input,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            text=not binary_input,
            errors=None if binary_input else "replace",
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise CommandError(args, -signal.SIGKILL, text, hint=f"timed out after {timeout} s") from None
    stdout = proc.stdout or ""
    stderr = proc.stderr or ""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, stdout + stderr, hint=hint)
    return Result(args, proc.returncode, stdout, stderr)


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
    """Run a command inside a prepared chroot (see resources.chroot_binds)."""
    chroot_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
    return run(["chroot", str(root), *argv], check=check, env=chroot_env, input=input, timeout=timeout, capture=capture)
