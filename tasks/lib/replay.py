"""A source filesystem that was not shut down cleanly, read with its journal replayed, and never written.

A server power-cycled into PXE (a BMC reset, a hang) leaves ext3/4 with
`needs_recovery` and xfs with a dirty log. p2v's read-only mounts (`ro,noload`,
`ro,norecovery`) skip the journal, so whatever was committed only there (a
file fsync'ed just before the cut, a rename) is missing from that view, and a
copy of it agrees with its own manifest check: the loss would be silent. The
kernel replays a journal only into a writable device, and the source must
never be written. So such a filesystem is read through a throw-away
copy-on-write layer, as verify boots disk.img (tasks/lib/overlay.py):

    the source node, read-only (a loop on a partition or an LV, or on the live
    system /dev/sda2, /dev/mapper/..., /dev/md...: any block device)
      <- a qcow2 overlay whose backing file is that node (qemu opens a backing
         file read-only, and probes a block device as host_device)
      <- exported as a plain file over FUSE by qemu-storage-daemon
      <- a read-write loop device, mounted once `ro` without noload or
         norecovery: the kernel replays the journal into the overlay
      <- unmounted, checked clean, and from then on a read-only loop device
         on the export stands for the filesystem (DeviceMap), so every later
         mount of it sees the replayed view.

The overlay lives in the host's scratch dir on the work area, the export and
the daemon's pid file in its run dir, so that release_stale frees what a
killed run left; the overlay is deleted on the way out. A replay that fails
is an error naming the filesystem, never a fallback to the view without the
journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.overlay import create_overlay, fuse_export
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import P2VError, run
from tasks.lib.storage import unreplayed_journal

log = logging.getLogger("p2v.replay")

REPLAY_HINT = ("the server was not shut down cleanly and its journal does not replay (the kernel's reason is in "
               "dmesg); p2v will not read the filesystem without it, which would silently lose what was written "
               "last: boot the server once so that it recovers the filesystem itself, shut it down cleanly, and rerun")


@dataclass(frozen=True)
class ReplayedFilesystem:
    device: str  # stable name: disk1p2, lv:vg/root
    fstype: str
    source: str  # the source's read-only node in this run
    view: str  # the read-only loop device over the replayed overlay
    reason: str  # what said the journal needed recovery


def replay_mount_options(fstype: str) -> list[str]:
    """Read-only for the filesystem, but without noload/norecovery: on a writable
    device the kernel then replays the journal before it mounts (and writes
    nothing else: no mount count, no lazy inode table init as `rw` would)."""
    if fstype == "xfs":
        return ["ro", "nouuid"]  # nouuid: see resources.read_only_mount_options
    return ["ro"]


def _slug(device: str) -> str:
    """A file name for a device name, unique (lv:a-b/c and lv:a/b-c differ)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", device) + "-" + hashlib.sha256(device.encode()).hexdigest()[:6]


def _kernel_log() -> list[str]:
    return run(["dmesg"], check=False).stdout.splitlines()  # empty where the kernel log is not readable


def _kernel_lines(node: str, since: int) -> str:
    """What the kernel said about a device since line `since` (a failed mount says only `dmesg(1) may have more
    information`): the filesystem's own reason, `EXT4-fs (loop7): Could not load journal inode`."""
    tag = f"({os.path.basename(node)})"
    return "\n".join([line for line in _kernel_log()[since:] if tag in line][-5:])


@contextlib.contextmanager
def replayed_journal(device: str, fstype: str, node: str, reason: str, *, scratch_dir: Path, run_dir: Path,
                     called: str = "") -> Iterator[ReplayedFilesystem]:
    """The filesystem on `node` with its journal replayed in a throw-away overlay; the source is only read.

    `called` is how messages name it besides its device (its mountpoint).
    Raises P2VError, naming the filesystem, when the replay fails.
    """
    slug = _slug(device)
    overlay = scratch_dir / f"replay-{slug}.qcow2"
    export = run_dir / f"replay-{slug}.export"
    pidfile = run_dir / f"replay-{slug}.pid"
    point = run_dir / f"replay-{slug}.mnt"
    label = f"{device} ({', '.join(filter(None, [called, fstype]))})"
    scratch_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    overlay.unlink(missing_ok=True)
    log.info("%s was not shut down cleanly (%s): replaying its journal in a throw-away overlay", label, reason)
    with contextlib.ExitStack() as stack:
        stack.callback(overlay.unlink, missing_ok=True)
        try:
            create_overlay(Path(node), overlay)
            exported = stack.enter_context(fuse_export(overlay, export, pidfile=pidfile))
            with loop_device(exported, read_only=False) as writable:
                # A `blockdev --setro` that someone left on this /dev/loopN would outlive its
                # detach; the replay needs the device writable.
                run(["blockdev", "--setrw", writable.path])
                point.mkdir(exist_ok=True)
                logged = len(_kernel_log())
                try:
                    with mounted(writable.path, point, fstype=fstype, options=replay_mount_options(fstype)):
                        pass
                except P2VError as error:
                    said = _kernel_lines(writable.path, logged)
                    raise P2VError(error.args[0] + (f"\n--- kernel ---\n{said}" if said else "")) from None
                finally:
                    with contextlib.suppress(OSError):
                        point.rmdir()
                left = unreplayed_journal(fstype, writable.path)
                if left:
                    raise P2VError(f"after the replay the journal still needs recovery ({left})")
            view = stack.enter_context(loop_device(exported, read_only=True))
        except P2VError as error:
            raise P2VError(f"{label}: the journal could not be replayed in a throw-away overlay: {error.args[0]}",
                           hint=REPLAY_HINT) from None
        log.info("%s: journal replayed; read from now on through %s (overlay %s)", label, view.path, overlay)
        yield ReplayedFilesystem(device=device, fstype=fstype, source=node, view=view.path, reason=reason)
