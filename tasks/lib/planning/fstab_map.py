"""How each line of the source's fstab maps onto the target: replaced, removed (saying why) or kept."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.lib.planning.context import PlanContext
from tasks.lib.planning.model import CopyPlan, DiskPlan, FstabChange, new_spec
from tasks.lib.planning.swap import SwapChoice
from tasks.lib.runner import P2VError

# Mount options every Linux filesystem takes; others are dropped when the type changes.
GENERIC_MOUNT_OPTIONS = frozenset({
    "defaults", "rw", "ro", "auto", "noauto", "nofail", "user", "nouser", "users", "owner", "group", "dev", "nodev",
    "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime", "sync", "async", "dirsync", "_netdev",
    "mand", "nomand", "silent", "loud", "iversion", "noiversion",
})


def swap_carriers(ctx: PlanContext, swap: SwapChoice, plan: DiskPlan) -> dict[int, str]:
    """fstab line -> "partition" or "file": the source swap line that becomes the planned swap area's line."""
    by_device = {e.get("device"): e for e in ctx.layout["fstab"] if e.get("status") == "swap"}
    partition_lines = [int(by_device[s["device"]]["line"]) for s in swap.partitions if s["device"] in by_device]
    file_lines = [int(e["line"]) for e in swap.files if int(e["size"])]
    carriers: dict[int, str] = {}
    if plan.swap_partition is not None:
        line = (partition_lines or file_lines)[:1]
        carriers.update(dict.fromkeys(line, "partition"))
    if plan.swap_file is not None:
        line = [n for n in file_lines if n not in carriers][:1] or \
            [n for n in partition_lines if n not in carriers][:1]
        carriers.update(dict.fromkeys(line, "file"))
    return carriers


def fstab_change(ctx: PlanContext, entry: Mapping[str, Any], plan: DiskPlan, copies: Sequence[CopyPlan],
                  carriers: Mapping[int, str]) -> FstabChange:
    base = {"line": int(entry["line"]), "spec": entry["spec"], "file": entry["file"],
            "vfstype": entry["vfstype"]}
    options = tuple(entry.get("options", ()))
    status = entry.get("status")
    if status in ("skipped", "unresolved"):
        return FstabChange(**base, action="keep", target=None, new_spec=None, new_vfstype=None,
                           new_options=options, new_passno=None, dropped_options=(),
                           reason=f"{status}: {entry.get('reason', '')}")
    if status in ("swap", "swapfile"):
        return _swap_change(ctx, entry, base, options, plan, carriers.get(int(entry["line"])))
    mountpoint = entry["file"]
    fs_mounts = {fs.mountpoint for fs in plan.filesystems}
    if mountpoint not in fs_mounts:
        receiver = next((c.target_mountpoint for c in copies if c.source_mountpoint == mountpoint), None)
        if receiver is None:
            raise P2VError(f"layout.json: fstab line {entry['line']} mounts {mountpoint}, which is not among "
                           "its mounts", hint="rerun inspect:<host>")
        return _removed(base, options, f"merged into {receiver}", target=receiver)
    part = plan.partition_of(mountpoint)
    fs = part.filesystem
    assert fs is not None
    source_type = entry["vfstype"]
    if fs.fstype == source_type or source_type == "auto":
        kept, dropped = options, ()
    else:
        kept = tuple(o for o in options if o in GENERIC_MOUNT_OPTIONS or o.startswith(("x-", "comment=")))
        dropped = tuple(o for o in options if o not in kept)
        kept = kept or ("defaults",)
    passno = int(entry.get("passno", 0))
    if fs.fstype == "xfs" or fs.fstype != source_type:
        passno = 0 if fs.fstype == "xfs" else (1 if mountpoint == "/" else 2)
    return FstabChange(**base, action="replace", target=mountpoint,
                       new_spec=new_spec(entry["spec"], fs.label, fs.uuid), new_vfstype=fs.fstype,
                       new_options=kept, new_passno=passno, dropped_options=dropped,
                       reason=f"partition {part.number}")


def _swap_change(ctx: PlanContext, entry: Mapping[str, Any], base: Mapping[str, Any], options: tuple[str, ...],
                 plan: DiskPlan, carries: str | None) -> FstabChange:
    """A source swap line: the line of a planned swap area, or removed saying what (if anything) replaced it."""
    part = plan.swap_partition
    swap_file = plan.swap_file
    if carries == "partition" and part is not None and part.swap is not None:
        return FstabChange(**base, action="replace", target="swap",
                           new_spec=new_spec(entry["spec"], part.swap.label, part.swap.uuid),
                           new_vfstype="swap", new_options=options, new_passno=0, dropped_options=(),
                           reason=f"swap partition {part.number}")
    if carries == "file" and swap_file is not None:
        return FstabChange(**base, action="replace", target=swap_file.path, new_spec=swap_file.path,
                           new_vfstype="swap", new_options=options, new_passno=0, dropped_options=(),
                           reason=f"swap file {swap_file.path}, made by the fix stage")
    is_file = entry.get("status") == "swapfile"
    what = "swap file, not copied; " if is_file else ""
    if is_file and not int(entry.get("size") or 0):
        return _removed(base, options, f"{entry.get('reason') or 'an empty swap file'}: "
                                            "no swap planned for it")
    if plan.policy.swap == "none":
        return _removed(base, options, "swap: none")
    # Which planned area this source swap went into: one of its own kind when there is one.
    into_file = swap_file is not None and entry.get("device", entry["spec"]) in swap_file.sources
    if into_file and swap_file is not None:
        return _removed(base, options, f"{what}merged into the swap file {swap_file.path}")
    if part is not None:
        return _removed(base, options, f"{what}merged into swap partition {part.number}")
    raise P2VError(f"internal: no planned swap for fstab line {entry['line']} ({entry['spec']})")


def _removed(base: Mapping[str, Any], options: tuple[str, ...], reason: str,
             target: str | None = None) -> FstabChange:
    return FstabChange(**base, action="remove", target=target, new_spec=None, new_vfstype=None,
                       new_options=(), new_passno=None, dropped_options=(), reason=reason)
