"""The target image, attached and mounted the way its plan says.

Used by the stages after `disk` (sync now, fix later): disk.img on a loop
device (direct I/O where the work area takes it), each planned filesystem
mounted at its mountpoint under one scratch directory, parents first, all of
it released on the way out, also on failure. The ESP (vfat) is not mounted,
only its mount point made: its partition node is `loop.partition(n)`, for
mtools (tasks/lib/esp.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.paths import resolve_in_root
from tasks.lib.plan import DiskPlan
from tasks.lib.resources import LoopDevice, loop_device, mounted
from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.target")



@dataclass(frozen=True)
class MountedTarget:
    loop: LoopDevice
    root: Path


def target_mount_options(fstype: str, keep_uuid: bool) -> list[str]:
    # A kept UUID is also the source's, which may be mounted at the same time.
    return ["nouuid"] if fstype == "xfs" and keep_uuid else []


@contextlib.contextmanager
def mounted_target(image: Path, plan: DiskPlan, *, run_dir: Path, direct_io: bool) -> Iterator[MountedTarget]:
    if not image.is_file():
        raise P2VError(f"{image} does not exist", hint=f"run disk:{plan.host} first")
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(loop_device(image, read_only=False, partitions=True, direct_io=direct_io))
        root = Path(tempfile.mkdtemp(prefix="target-", dir=run_dir))
        stack.callback(_remove_empty_dir, root)
        for mountpoint in plan.mount_order:
            part = plan.partition_of(mountpoint)
            fs = part.filesystem
            assert fs is not None
            point = resolve_in_root(root, mountpoint)
            # Mount points of child filesystems are made in their parent (the
            # target is ours to write); the copy gives them the source's modes.
            point.mkdir(parents=True, exist_ok=True)
            if fs.fstype == "vfat":
                continue  # the ESP is never mounted: tasks/lib/esp.py reads and writes it by mtools
            stack.enter_context(mounted(loop.partition(part.number), point, fstype=fs.fstype,
                                        options=target_mount_options(fs.fstype, fs.keep_uuid)))
        yield MountedTarget(loop=loop, root=root)


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)
