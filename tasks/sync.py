"""Sync stage: every file of the source server into the target image.

    sync:<host>  layout.json + disk-plan.json  ->  rootfs-synced.stamp

The source tree is mounted read-only as inspect found it, the target as the
disk plan says; the copy engine (tasks/lib/copy.py) copies each source
filesystem, proves the copy with a manifest of both trees, and its receipt is
the stamp. A rerun after a failure or a kill continues the copy in the same
disk.img instead of starting over.

The stamp depends on disk-plan.json rather than on disk.img: later stages
write into disk.img, and that must not make the copy run again. A new disk
(a new plan, with new UUIDs) does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.disk import supports_direct_io
from tasks.inspect import source_tree
from tasks.lib.copy import console_progress, copy_tree
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.plan import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.spec import Spec
from tasks.lib.target import mounted_target
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

log = logging.getLogger("p2v.sync")

STAMP_FORMAT = "p2v-sync-stamp"
STAMP_VERSION = 1
SKIPPED_CONTENT_REASONS = ("network filesystem", "pseudo filesystem", "FUSE filesystem")


def contents_to_leave_behind(layout: Mapping[str, Any]) -> list[str]:
    """Mount points of pseudo and network filesystems: recreated empty, never copied."""
    return sorted({entry["file"] for entry in layout["fstab"]
                   if entry.get("status") == "skipped" and entry.get("reason") in SKIPPED_CONTENT_REASONS
                   and entry["file"].startswith("/")})


def swap_files(layout: Mapping[str, Any]) -> list[str]:
    return sorted(entry["spec"] for entry in layout["fstab"] if entry.get("status") == "swapfile")


def check_work_area(image: Path, plan: DiskPlan) -> None:
    """Refuse to start a copy the work area cannot hold (disk.img is sparse)."""
    usage = os.statvfs(image.parent)
    free = usage.f_bavail * usage.f_frsize
    data = sum(fs.used_bytes for fs in plan.filesystems)
    already = image.stat().st_blocks * 512  # what a resumed copy has written so far
    needed = max(0, data - already)
    if free < needed:
        raise P2VError(
            f"the work area {image.parent} has {free >> 20} MiB free, and the copy needs about {needed >> 20} MiB "
            f"more in {image.name} ({data >> 20} MiB of data, {already >> 20} MiB already written)",
            hint="free space on the work area or move the workdir, then rerun; the copy resumes",
        )


def sync_host(run: StageRun) -> None:
    spec = run.spec
    layout = read_layout(run.input(LAYOUT_FILE))
    plan = read_disk_plan(run.input(PLAN_FILE))
    image = spec.artifact("disk.img")
    mountpoints = [mount["mountpoint"] for mount in layout["mounts"]]
    if not image.is_file():
        raise P2VError(f"{image} does not exist", hint=f"run disk:{spec.host} first")
    check_work_area(image, plan)
    started = time.monotonic()
    with source_tree(spec, layout) as source, \
            mounted_target(image, plan, host=spec.host, direct_io=supports_direct_io(image.parent)) as target:
        result = copy_tree(
            source, target.root, mountpoints,
            log_file=spec.log_dir / "sync-copy.log",
            exclude_contents=contents_to_leave_behind(layout),
            swap_files=swap_files(layout),
            progress=console_progress(),
        )
    receipt = result.receipt()
    stamp: dict[str, Any] = {
        "format": STAMP_FORMAT,
        "version": STAMP_VERSION,
        "host": spec.host,
        "seconds": round(time.monotonic() - started, 1),
        "copy": receipt,
    }
    run.partial.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    log.info("synced %s files, %s bytes in %.1f s; manifest %s", receipt.get("files"), receipt.get("bytes"),
             stamp["seconds"], receipt.get("manifest_digest"))


def _config(spec: Spec) -> dict[str, object]:
    return {"stamp_version": STAMP_VERSION}


STAGE = Stage(
    name="sync",
    doc="copy every file of the source into the target image, verified -> rootfs-synced.stamp",
    target="rootfs-synced.stamp",
    inputs=(LAYOUT_FILE, PLAN_FILE),
    run=sync_host,
    config=_config,
)
