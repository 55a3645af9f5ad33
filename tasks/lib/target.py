"""The target image, attached and mounted the way its plan says.

Used by the stages after `disk` (sync now, fix later): disk.img on a loop
device (direct I/O where it suits the work area: `loop_direct_io`), each planned filesystem
mounted at its mountpoint under one scratch directory, parents first, all of
it released on the way out, also on failure. The ESP (vfat) is not mounted,
only its mount point made: its partition node is `loop.partition(n)`, for
mtools (tasks/lib/esp.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.paths import resolve_in_root
from tasks.lib.planning.model import DiskPlan
from tasks.lib.resources import LoopDevice, loop_device, mounted
from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.target")

# statfs(2) f_type of the network filesystems a work area may live on (linux/magic.h).
NETWORK_FILESYSTEMS = {0x6969: "nfs", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x65735546: "fuse"}


def filesystem_magic(directory: Path) -> int | None:
    """statfs(2)'s f_type for `directory` (None where libc will not say)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.statfs(os.fsencode(directory), buffer) != 0:
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF  # f_type is the first member


def takes_direct_io(directory: Path) -> bool:
    """Whether files in `directory` take O_DIRECT writes of 512-byte sectors (tmpfs and some
    network filesystems refuse them, or want larger alignment)."""
    handle, name = tempfile.mkstemp(prefix=".p2v-direct-io-", dir=directory)
    os.close(handle)
    try:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            return False
        try:
            with mmap.mmap(-1, mmap.PAGESIZE) as buffer:  # page-aligned, as O_DIRECT wants
                os.write(fd, memoryview(buffer)[:512])
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
    finally:
        os.unlink(name)


def loop_direct_io(directory: Path) -> bool:
    """Whether the loop device over an image in `directory` should bypass the page cache.

    On a local filesystem, yes where it can: buffered loop writeback can be a hundred times
    slower (P2V-NOTES). On a network filesystem, no: with direct I/O the NFS client sends each
    loop request as its own synchronous WRITE (and COMMIT) and waits for it; buffered, it
    gathers writes up to its wsize and commits them together. Not measured as a gain here: in
    the PXE tests the guest's copy onto NFS ran at about 4.5 MiB/s either way, probably bound by its
    emulated CPU (TCG), not by the NFS round trips.
    """
    network = NETWORK_FILESYSTEMS.get(filesystem_magic(directory) or 0)
    direct = network is None and takes_direct_io(directory)
    log.info("loop device over an image in %s: direct I/O %s%s", directory, "on" if direct else "off",
             f" ({network}: buffered, so the client gathers writes)" if network else "")
    return direct



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
