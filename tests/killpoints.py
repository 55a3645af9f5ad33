"""SIGKILL a real `doit` run at a named point: the kill matrix's harness.

`kill_at` starts a command (`doit <target>`, see `doit_command`, or one
stage in a child process) in a session of its own, as an operator's shell or
a CI job would, waits for the point, and SIGKILLs the whole process group:
nothing of p2v's clean-up runs, exactly as for `kill -9`, a CI job's hard
timeout or a crashed conversion host. What a command started in a group
of its own (the fix stage's chroot commands) is not in that group, and the
next run of the host has to deal with it too.

A point says "now" in one of three ways:

- a line in the stage's log: the runner logs every command as `+ argv`
  before it starts it, so `\\+ chroot \\S+ update-initramfs` is the moment the
  initrd rebuild begins (`settle` seconds later, it is well inside it);
- the target filling up: the copy has put so many bytes into the mounted
  target since the run first saw it (statvfs sees what is still in the page
  cache);
- a gate, for steps too short to be hit from outside (mkfs takes
  milliseconds): a stand-in for the tool, first on doit's PATH, that records
  its arguments and waits instead of running when they match a pattern, and
  runs the real tool otherwise. Only the killed run has it on its PATH.
  A gate with `stop_after_writing` runs the real tool and stops it (SIGSTOP)
  once it has written that many bytes: inside a step whose length depends on
  the machine's load (e2image takes 1 s here when idle, 3 s under the suite),
  where a delay after the step's log line would sometimes come after its end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib.spec import PROJECT_DIR


@dataclass(frozen=True)
class Gate:
    tool: str  # as the runner finds it on PATH: "mkfs.ext4", "mount"
    pattern: str  # a shell `case` pattern on the tool's arguments joined by spaces
    stop_after_writing: int | None = None  # run the real tool, and stop it there (bytes of its write calls)


@dataclass(frozen=True)
class KillPoint:
    name: str
    stage: str  # the stage that is running at the point: it must not leave its target
    log_line: str | None = None  # a regex on the lines the stage's log gains in this run
    gates: tuple[Gate, ...] = ()
    filled: int | None = None  # bytes the copy has put into the target since the run first saw it mounted
    settle: float = 0.0  # seconds after the trigger, to be inside the step rather than at its start
    step: str | None = None  # a regex on the command line of the process that must be running at the kill


@dataclass
class Kill:
    point: KillPoint
    seconds: float  # from the start of the run to the kill
    running: list[str] = field(default_factory=list)  # processes matching point.step alive at the kill
    output: str = ""


def _proc_text(pid: str, name: str) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / pid / name).read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def _state_and_group(pid: str) -> tuple[str, int]:
    fields = _proc_text(pid, "stat").rsplit(")", 1)[-1].split()
    return (fields[0], int(fields[2])) if len(fields) > 2 else ("Z", -1)


def stray_processes(run_dir: Path, workdir: Path) -> list[str]:
    """Live processes that work on this host: chrooted or with their working directory below its
    run directory, or naming the run directory or the workdir on their command line (tar, rsync,
    qemu, qemu-storage-daemon). Zombies hold nothing and are left out."""
    found = []
    marks = (str(run_dir), str(workdir))
    below = (f"{run_dir}/", f"{workdir}/")  # another host's run directory may begin with this one's name
    for entry in Path("/proc").glob("[0-9]*"):
        pid = entry.name
        if int(pid) == os.getpid() or _state_and_group(pid)[0] == "Z":
            continue
        places = []
        for link in ("root", "cwd"):
            with contextlib.suppress(OSError):
                places.append(os.readlink(entry / link))
        cmdline = _proc_text(pid, "cmdline")
        if any(place.startswith(below) for place in places) or any(mark in cmdline for mark in marks):
            found.append(f"process {pid}: {cmdline[:160]}")
    return found


def _gate_dir(directory: Path, gates: tuple[Gate, ...], gate_file: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for gate in gates:
        real = shutil.which(gate.tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        assert real, f"{gate.tool} not found"
        script = directory / gate.tool
        pattern = gate.pattern.replace(" ", chr(92) + " ")
        if gate.stop_after_writing is None:
            hold = f'echo "{gate.tool} $*" > {gate_file}; exec sleep 3600'
        else:
            # The tool runs in the background, in the same process group: the SIGKILL of the group ends it, stopped.
            hold = (f'{real} "$@" & tool=$!\n'
                    '    while :; do\n'
                    '      state=$(sed "s/.*) //" /proc/$tool/stat 2>/dev/null | cut -c1)\n'
                    '      case "$state" in ""|Z|X) break ;; esac\n'
                    '      written=$(sed -n "s/^wchar: //p" /proc/$tool/io 2>/dev/null)\n'
                    f'      if [ "${{written:-0}}" -ge {gate.stop_after_writing} ]; then\n'
                    f'        kill -STOP $tool; echo "{gate.tool} $* (stopped after $written bytes)" > {gate_file}\n'
                    '        exec sleep 3600\n'
                    '      fi\n'
                    '      sleep 0.01\n'
                    '    done\n'
                    '    wait $tool; exit $?')
        script.write_text(
            "#!/bin/sh\n"
            f"# kill matrix gate: hold here (to be SIGKILLed) at {gate.tool} {gate.pattern}\n"
            'case "$*" in\n'
            f"  {pattern}) {hold} ;;\n"
            "esac\n"
            f'exec {real} "$@"\n')
        script.chmod(0o755)
    return directory


def _used_bytes(run_dir: Path) -> int:
    used = 0
    for root in run_dir.glob("target-*"):
        if os.path.ismount(root):
            with contextlib.suppress(OSError):
                usage = os.statvfs(root)
                used = max(used, (usage.f_blocks - usage.f_bfree) * usage.f_frsize)
    return used


def _matching(pattern: str, group: int, run_dir: Path) -> list[str]:
    """Processes of the run (its group, chrooted below its run directory, or naming it: qemu, which
    pexpect starts in a session of its own) whose command line matches."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        state, pgid = _state_and_group(entry.name)
        if state == "Z":
            continue
        root = ""
        with contextlib.suppress(OSError):
            root = os.readlink(entry / "root")
        cmdline = _proc_text(entry.name, "cmdline")
        ours = pgid == group or root.startswith(f"{run_dir}/") or str(run_dir) in cmdline
        if ours and re.search(pattern, cmdline):
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def doit_command(spec_dir: Path, target: str) -> tuple[list[str], dict[str, str]]:
    """`doit <target>` for the specs in `spec_dir`, run from the project: argv and environment."""
    return [sys.executable, "-m", "doit", target], {**os.environ, "P2V_SPECS": str(spec_dir)}


def kill_at(point: KillPoint, argv: Sequence[str], env: Mapping[str, str], *, workdir: Path, run_dir: Path,
            scratch: Path, timeout: float = 900) -> Kill:
    """Run `argv` (from the project directory) until `point`, then SIGKILL its process group; the run
    must not end first."""
    env = dict(env)
    gate_file = scratch / f"{point.name}.gate"
    if point.gates:
        gates = _gate_dir(scratch / f"{point.name}-bin", point.gates, gate_file)
        env["PATH"] = f"{gates}:{env.get('PATH', '')}"
    log_path = workdir / "logs" / f"{point.stage}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    out_path = scratch / f"{point.name}.out"
    started = time.monotonic()
    with open(out_path, "w") as out:
        victim = subprocess.Popen(list(argv), cwd=PROJECT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
    try:
        trigger = _Trigger(point, log_path, offset, gate_file, run_dir)
        while not trigger.reached():
            if victim.poll() is not None:
                raise AssertionError(f"{point.name}: {shlex.join(argv[-2:])} ended (exit {victim.returncode}) "
                                     f"before the point:\n{out_path.read_text()[-3000:]}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{point.name}: not reached in {timeout:.0f} s")
            time.sleep(0.02)
        if point.settle:
            time.sleep(point.settle)
        assert victim.poll() is None, f"{point.name}: the run ended during the settle time"
        running = _matching(point.step, victim.pid, run_dir) if point.step else []
        # The runner logs a command just before it starts it: give a short step a moment to exist.
        deadline = time.monotonic() + 2
        while point.step and not running and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.01)
            running = _matching(point.step, victim.pid, run_dir)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    return Kill(point=point, seconds=time.monotonic() - started, running=running, output=out_path.read_text())


class _Trigger:
    def __init__(self, point: KillPoint, log_path: Path, offset: int, gate_file: Path, run_dir: Path):
        self.point, self.log_path, self.offset = point, log_path, offset
        self.gate_file, self.run_dir = gate_file, run_dir
        self.baseline: int | None = None  # the target's used bytes when first seen mounted

    def reached(self) -> bool:
        point = self.point
        if point.gates:
            return self.gate_file.exists()
        if point.filled is not None:
            used = _used_bytes(self.run_dir)
            if used and self.baseline is None:
                self.baseline = used
            return self.baseline is not None and used - self.baseline >= point.filled
        assert point.log_line is not None, point
        if not self.log_path.exists():
            return False
        with open(self.log_path, "rb") as handle:
            handle.seek(self.offset)
            text = handle.read().decode(errors="replace")
        return re.search(point.log_line, text, re.MULTILINE) is not None
