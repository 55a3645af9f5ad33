"""`plan_disk`: layout.json + the spec's target policy -> DiskPlan, step by step."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from tasks.lib.planning.context import PlanContext, receiver
from tasks.lib.planning.copy_method import choose_copy_methods
from tasks.lib.planning.fstab_map import fstab_change, swap_carriers
from tasks.lib.planning.layout import groups, lay_out, partition_slots, table_label
from tasks.lib.planning.model import (
    GPT_TAIL,
    CopyPlan,
    DiskPlan,
    PlanPolicy,
    SwapFilePlan,
    mib,
)
from tasks.lib.planning.sizing import final_sizes, make_draft
from tasks.lib.planning.swap import choose_swap, swap_partition_sources
from tasks.lib.spec import Spec


def plan_disk(layout: Mapping[str, Any], spec: Spec) -> DiskPlan:
    """Decide the target disk for one host (pure and deterministic)."""
    return _plan(PlanContext(layout, spec.target, spec.host, spec.file))


def _plan(ctx: PlanContext) -> DiskPlan:
    """The steps in the order their notes are made: the table, swap, the groups of mounts, features and
    sizes, the partitions, the copies and the fstab map."""
    label = table_label(ctx)
    swap = choose_swap(ctx)
    source_swaps = list(swap.partitions)
    ctx.swap_partition_sources = tuple(swap_partition_sources(ctx, swap))
    swap_part = swap.partition
    source_groups = groups(ctx)
    file_holder = receiver(swap.file_path, [base.mountpoint for base, _ in source_groups])
    drafts = [make_draft(ctx, base, members, base.mountpoint == "/",
                        swap.file if base.mountpoint == file_holder else 0)
              for base, members in source_groups]
    slots = partition_slots(ctx, label, drafts, swap_part)
    sizes = final_sizes(ctx, slots, label)
    partitions = lay_out(ctx, slots, sizes, label, source_swaps)
    disk_size = partitions[-1].end + (GPT_TAIL if label == "gpt" else 0)
    swap_file_plan = None
    if swap.file:
        sources = [e["spec"] for e in swap.files if int(e["size"])]
        if ctx.policy.swap == "file":
            sources = [s["device"] for s in swap.partitions] + sources
        swap_file_plan = SwapFilePlan(swap.file_path, swap.file, file_holder, tuple(sources))
        ctx.notes.append(f"swap: a {mib(swap.file)} MiB swap file {swap.file_path} in {file_holder}, "
                         f"for the source's {', '.join(sources)} (made by the fix stage)")
    swap_part_plan = next((p for p in partitions if p.swap is not None), None)
    if swap_part_plan is not None:
        ctx.notes.append(f"swap: a {mib(swap_part_plan.size)} MiB swap partition {swap_part_plan.number}, for "
                         f"the source's {', '.join(swap_partition_sources(ctx, swap))}")
    if ctx.layout["lvm"]["lvs"]:
        ctx.notes.append("LVM on the source is not recreated: the target has plain partitions")
    if ctx.layout.get("md"):
        ctx.notes.append("md RAID on the source is not recreated: the target has plain partitions")
    fs_by_mount = {p.filesystem.mountpoint: p for p in partitions if p.filesystem is not None}
    copies = choose_copy_methods(ctx, [CopyPlan(m.mountpoint, m.device, receiver(m.mountpoint, fs_by_mount))
                                       for m in ctx.mounts], partitions)
    plan = DiskPlan(
        host=ctx.host,
        policy=PlanPolicy(layout=ctx.policy.layout, root_fs=ctx.policy.root_fs, label=label,
                          swap=ctx.policy.swap, size=ctx.policy.size,
                          headroom_percent=ctx.policy.headroom_percent, min_headroom=ctx.min_headroom,
                          keep_uuids=ctx.policy.keep_uuids, copy=ctx.policy.copy),
        label=typing.cast(Literal["msdos", "gpt"], label),
        size=disk_size,
        bootloader=ctx.bootloader,
        firmware=ctx.firmware,
        kernel=ctx.kernel,
        partitions=tuple(partitions),
        swap_file=swap_file_plan,
        copies=copies,
        fstab=(),
        notes=(),
        source_swap=swap.total,
    )
    carriers = swap_carriers(ctx, swap, plan)
    fstab = tuple(fstab_change(ctx, entry, plan, copies, carriers) for entry in ctx.layout["fstab"])
    return dataclasses.replace(plan, fstab=fstab, notes=tuple(ctx.notes))
