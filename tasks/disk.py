"""Disk stage: an empty target disk, partitioned and formatted as planned.

    disk:<host>  layout.json  ->  disk.img (+ disk-plan.json, the completed plan)

The planner (tasks/lib/planning/) decides everything; this stage carries it out:

1. plan from layout.json and the spec;
2. a sparse raw file of the planned size;
3. the partition table, written with pyparted into the file itself (so no
   partition nodes of a loop device are involved yet);
4. a loop device over the file (direct I/O where it suits the work area's
   filesystem: tasks/lib/target.py), with its partitions (partx);
5. mkfs/mkswap per partition, exactly as the plan spells it;
6. blkid and tune2fs/xfs_db read back: type, label, UUID and features must be
   what the plan says (a newer mkfs default cannot slip in unnoticed);
7. disk-plan.json, the plan with the new UUIDs, written atomically before the
   pipeline renames disk.img.partial to disk.img: disk.img never exists
   without its plan.

A failure detaches everything (context managers) and leaves neither
disk.img, nor its partial file, nor disk-plan.json.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import _ped  # type: ignore[import-not-found]
import parted

from tasks import plan as plan_io
from tasks.lib import outputs, storage
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.features import made_differences
from tasks.lib.planning.model import PLAN_VERSION, DiskPlan, PartitionPlan
from tasks.lib.planning.render import render_plan
from tasks.lib.resources import LoopDevice, loop_device
from tasks.lib.runner import P2VError, run
from tasks.lib.spec import Spec
from tasks.lib.target import loop_direct_io

log = logging.getLogger("p2v.disk")

_PARTED_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(_ped, name) for name in dir(_ped) if name.endswith("Exception")
)
_PARTITION_KINDS = {
    "primary": parted.PARTITION_NORMAL,
    "extended": parted.PARTITION_EXTENDED,
    "logical": parted.PARTITION_LOGICAL,
}
_FLAGS = {name: number for number, name in parted.partitionFlag.items()}


# ---------------------------------------------------------------- steps


def create_sparse(path: Path, size: int) -> None:
    """A new file of `size` bytes that takes no space until written."""
    path.unlink(missing_ok=True)
    try:
        with open(path, "xb") as handle:
            handle.truncate(size)
    except OSError as error:
        raise P2VError(f"cannot create the disk image {path}: {error.strerror}",
                       hint=f"make {path.parent} writable, on a filesystem with sparse files") from None


def write_partition_table(image: Path, plan: DiskPlan) -> None:
    """The plan's partitions, exactly where planned, with optimal alignment checked."""
    try:
        device = parted.getDevice(str(image))
        try:
            sector = device.sectorSize
            disk = parted.freshDisk(device, plan.label)
            for part in plan.partitions:
                _add_partition(device, disk, part, sector)
            disk.commit()
        finally:
            device.removeFromCache()
    except _PARTED_ERRORS as error:
        raise P2VError(f"writing the {plan.label} partition table into {image} failed: {error}") from None


def _add_partition(device: parted.Device, disk: parted.Disk, part: PartitionPlan, sector: int) -> None:
    geometry = parted.Geometry(device=device, start=part.start // sector, length=part.size // sector)
    # The filesystem hint only sets the type id: 83 / "Linux filesystem", 82 / "Linux swap".
    hint = {"swap": "linux-swap(v1)", "filesystem": "ext4"}.get(part.role)
    fs = parted.FileSystem(type=hint, geometry=geometry) if hint else None
    partition = parted.Partition(disk=disk, type=_PARTITION_KINDS[part.kind], fs=fs, geometry=geometry)
    disk.addPartition(partition, constraint=device.optimalAlignedConstraint)
    for flag in part.flags:
        partition.setFlag(_FLAGS[flag])
    got = (partition.number, partition.geometry.start * sector, partition.geometry.length * sector)
    if got != (part.number, part.start, part.size):
        raise P2VError(f"parted placed partition {part.number} at {got}, not at the planned "
                       f"{(part.number, part.start, part.size)}")


def make_filesystem(node: str, part: PartitionPlan) -> None:
    """mkfs or mkswap, exactly as planned."""
    if part.filesystem is not None:
        run([*part.filesystem.mkfs, node])
    elif part.swap is not None:
        run([*part.swap.mkswap, node])


def read_back(loop: LoopDevice, plan: DiskPlan) -> dict[int, str]:
    """The UUIDs mkfs made, after checking type, label and features against the plan."""
    uuids: dict[int, str] = {}
    for part in plan.partitions:
        if part.filesystem is None and part.swap is None:
            continue
        node = loop.partition(part.number)
        probe = storage.probe(node)
        fstype = part.filesystem.fstype if part.filesystem is not None else "swap"
        found = storage.fs_features(fstype, node)
        problems = made_differences(part, probe, found)
        if problems:
            raise P2VError(f"partition {part.number} ({fstype}) is not as planned: {'; '.join(problems)}",
                           hint="the local mkfs may be too old or too new for the plan's options")
        uuids[part.number] = probe["UUID"].lower() if fstype != "vfat" else probe["UUID"]
    return uuids


def _flush(loop: LoopDevice, plan: DiskPlan) -> None:
    nodes = [loop.partition(p.number) for p in plan.partitions if p.role != "extended"]
    for node in [*nodes, loop.path]:
        run(["blockdev", "--flushbufs", node])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn_about_space(spec: Spec, plan: DiskPlan) -> None:
    usage = os.statvfs(spec.workdir)
    free = usage.f_bavail * usage.f_frsize
    data = sum(fs.used_bytes for fs in plan.filesystems)
    if free < data:
        log.warning("the work area has %d MiB free; the image will hold about %d MiB of data once synced",
                    free >> 20, data >> 20)


def make_disk(stage_run: StageRun) -> None:
    spec = stage_run.spec
    image = stage_run.partial
    plan_path = spec.artifact(plan_io.PLAN_FILE)  # the pipeline removed the old one
    plan = plan_io.plan_for(spec)
    log.info("%s", render_plan(plan))
    _warn_about_space(spec, plan)
    try:
        create_sparse(image, plan.size)
        write_partition_table(image, plan)
        with loop_device(image, read_only=False, partitions=True, direct_io=loop_direct_io(image.parent)) as loop:
            for part in plan.partitions:
                make_filesystem(loop.partition(part.number), part)
            uuids = read_back(loop, plan)
            _flush(loop, plan)
        _fsync(image)
        outputs.write_disk_plan(plan_path, plan.with_uuids(uuids))
    except BaseException:
        for leftover in (image, plan_path):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        raise
    log.info("disk image: %d MiB, %d partition(s); completed plan in %s", plan.size >> 20, len(plan.partitions),
             plan_path.name)


def _config(spec: Spec) -> dict[str, object]:
    target = spec.target
    return {
        "target": [target.layout, target.root_fs, target.label, target.swap, target.size, target.headroom_percent,
                   target.min_headroom, target.keep_uuids, target.copy],
        "plan_version": PLAN_VERSION,
    }


STAGE = Stage(
    name="disk",
    doc="partition and format an empty target disk as planned -> disk.img (+ disk-plan.json)",
    target="disk.img",
    inputs=("layout.json",),
    run=make_disk,
    config=_config,
    outputs=(plan_io.PLAN_FILE,),
)
