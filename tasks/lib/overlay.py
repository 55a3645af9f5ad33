"""A writable, throw-away view of an image: a qcow2 overlay exported as a file over FUSE.

The verify stage must log in to the converted server, whose root password we
do not know, and must never change the image it verifies. So it writes a
one-time login into a qcow2 overlay whose backing file is disk.img: the
overlay is exported as a plain file by qemu-storage-daemon (FUSE), attached
to a loop device like any image, mounted, edited, released; then qemu boots
the overlay. disk.img is opened read-only the whole time, and the overlay is
deleted afterwards. (No NBD or device-mapper is needed, which this kernel
lacks.) Inspect and sync use the same parts to replay the journal of a source
filesystem that was not shut down cleanly (tasks/lib/replay.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.lib import journal
from tasks.lib.runner import CommandError, P2VError, run, which

log = logging.getLogger("p2v.overlay")


def create_overlay(image: Path, overlay: Path) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()), str(overlay)])


@contextlib.contextmanager
def fuse_export(overlay: Path, export: Path, *, timeout: float = 20, pidfile: Path | None = None) -> Iterator[Path]:
    """Export a qcow2 file as a raw, writable file at `export` until the block exits.

    With `pidfile` (in the host's run dir) the daemon writes its pid there, so
    that release_stale can stop it after a killed run: a daemon outlives the
    stage that started it, and one whose export was unmounted spins.
    """
    which("qemu-storage-daemon")
    size = _virtual_size(overlay)  # before the daemon holds the image's lock
    argv = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={overlay}",
        "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
        "--export", f"type=fuse,id=export0,node-name=disk0,mountpoint={export},writable=on",
        *(["--pidfile", str(pidfile)] if pidfile is not None else []),
    ]
    # Journaled as two resources (tasks/lib/journal.py): the export file, then the daemon, which
    # goes first on the way out.
    with journal.resource("fuse-export", export.touch, lambda _: release_export(export),
                          {"export": os.path.abspath(export)}), \
            journal.resource("process", lambda: _start_daemon(argv), _stop_daemon,
                             lambda daemon: journal.process_record(daemon.pid, argv[0])) as daemon:
        _wait_for_export(export, overlay, size, daemon, timeout)
        yield export


def _start_daemon(argv: list[str]) -> subprocess.Popen[bytes]:
    log.debug("+ %s", " ".join(argv))
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the daemon flushes the overlay and unmounts its export on the way out."""
    daemon.terminate()
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def export_present(export: Path) -> bool:
    """A FUSE mount at `export` (even a dead one) or the empty file it is mounted on.

    Asked of mountinfo first: once a killed daemon's attributes expire from the
    kernel's cache (a second), any stat of its export fails with ENOTCONN.
    """
    return _is_fuse_mount(export) or os.path.lexists(export)


def release_export(export: Path) -> None:
    """The export's mount (a killed daemon leaves it behind) and the empty file it was mounted on."""
    _detach_fuse(export)
    with contextlib.suppress(FileNotFoundError):
        export.unlink()


def _wait_for_export(export: Path, overlay: Path, wanted: int, daemon: subprocess.Popen[bytes],
                     timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            tail = daemon.stdout.read().decode(errors="replace")[-2000:] if daemon.stdout else ""
            raise CommandError(["qemu-storage-daemon", "--export", f"type=fuse,mountpoint={export}"],
                               daemon.returncode, tail, hint="FUSE (/dev/fuse) is needed to verify an image")
        if _is_fuse_mount(export) and os.stat(export).st_size == wanted:
            return
        time.sleep(0.1)
    raise P2VError(f"qemu-storage-daemon did not export {overlay} at {export} within {timeout:.0f} s")


def _virtual_size(image: Path) -> int:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    return int(info["virtual-size"])


def _is_fuse_mount(path: Path) -> bool:
    real = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == real and "fuse" in line.split(" - ", 1)[1].split()[0]:
            return True
    return False


def _detach_fuse(export: Path) -> None:
    # The daemon unmounts its export when it exits; a killed one leaves it behind.
    if _is_fuse_mount(export):
        run(["umount", "-l", str(export)], check=False)
