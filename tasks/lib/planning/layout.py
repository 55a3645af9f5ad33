"""Which target filesystems receive which source mounts (the proven-readable rule for /boot),
the partition table, and the partitions in disk order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from tasks.lib.planning.context import PlanContext
from tasks.lib.planning.features import (
    EXT_INCOMPAT,
    XFS_BOOT_FLAGS,
    ext_feature_set,
    ext_features_for,
    xfs_features_for,
    xfs_flags,
)
from tasks.lib.planning.mkfs import finish_filesystem, swap_plan
from tasks.lib.planning.model import (
    BIOS_BOOT_SIZE,
    EBR_GAP,
    ESP_MOUNTPOINTS,
    EXT_TYPES,
    FIRST_PARTITION_START,
    GPT_TYPES,
    MSDOS_TYPES,
    SUPPORTED_TYPES,
    PartitionPlan,
    Role,
    SourceMount,
)
from tasks.lib.planning.sizing import TargetDraft, layout_overhead
from tasks.lib.runner import P2VError


def groups(ctx: PlanContext) -> list[tuple[SourceMount, list[SourceMount]]]:
    """(the source mount whose filesystem the target recreates, the mounts it receives)."""
    root = next(m for m in ctx.mounts if m.mountpoint == "/")
    if ctx.policy.layout == "keep":
        for mount in ctx.mounts:
            if mount.fstype not in SUPPORTED_TYPES:
                raise P2VError(f"target.layout keep cannot recreate {mount.mountpoint} ({mount.fstype}); "
                               f"p2v makes {', '.join(SUPPORTED_TYPES)}",
                               hint=f"use target.layout: flatten in {ctx.spec_file}")
        return [(m, [m]) for m in ctx.mounts]
    kept = [m for m in ctx.mounts if m.mountpoint in ESP_MOUNTPOINTS and m.fstype == "vfat"]
    boot = next((m for m in ctx.mounts if m.mountpoint == "/boot"), None)
    if boot is not None and not _merge_boot(ctx, boot, root):
        kept.insert(0, boot)
    merged = [m for m in ctx.mounts if m not in kept]
    for mount in merged:
        if mount is not root:
            ctx.notes.append(f"{mount.mountpoint} ({mount.device}, {mount.fstype}) merged into /")
    return [(m, [m]) for m in kept] + [(root, merged)]


def _merge_boot(ctx: PlanContext, boot: SourceMount, root: SourceMount) -> bool:
    """The proven-readable rule (module docstring): may /boot live in the target root?"""
    if ctx.bootloader != "grub2":
        ctx.notes.append(f"/boot kept separate: the bootloader is {ctx.bootloader}, whose configuration "
                         "names kernels relative to the /boot partition")
        return False
    root_type = ctx.root_type(root)
    if root_type != boot.fstype:
        ctx.notes.append(f"/boot kept separate: grub reads {boot.fstype} there today; nothing on the server "
                         f"shows it reads the target root's {root_type}")
        return False
    boot_fs = ctx.by_device[boot.device]
    if root_type in EXT_TYPES:
        target = ext_features_for(ctx, root, root_type)[0]
        extra = sorted((target & EXT_INCOMPAT) - ext_feature_set(boot_fs.get("features", [])))
    else:
        flags = xfs_features_for(ctx, root, root_type)[0]
        boot_flags = xfs_flags(boot_fs.get("features", {}))
        extra = [f"{k}={flags[k]}" for k in XFS_BOOT_FLAGS if flags[k] > boot_flags[k]]
    if extra:
        ctx.notes.append(f"/boot kept separate: the target root has {', '.join(extra)}, which the source /boot "
                         "(read by grub today) does not")
        return False
    ctx.notes.append(f"/boot merged into /: grub reads {boot.fstype} with the root's features on the source /boot")
    return True


def lay_out(ctx: PlanContext, slots: Sequence[tuple[Role, TargetDraft | None, int]], sizes: Sequence[int], label: str,
            source_swaps: Sequence[Mapping[str, Any]]) -> list[PartitionPlan]:
    types_ = MSDOS_TYPES if label == "msdos" else GPT_TYPES
    extended = label == "msdos" and len(slots) > 4
    partitions: list[PartitionPlan] = []
    position = FIRST_PARTITION_START
    number = 0
    boot_mount = "/boot" if any(d is not None and d.mountpoint == "/boot" for _, d, _ in slots) else "/"
    total_end = sum(sizes) + layout_overhead(len(slots), label)  # msdos: the end of the last partition
    for index, ((role, draft, _), size) in enumerate(zip(slots, sizes, strict=True)):
        kind: Literal["primary", "logical"] = "primary"
        if extended and index >= 3:
            if index == 3:
                partitions.append(PartitionPlan(
                    number=4, start=position, size=total_end - position, role="extended", kind="extended",
                    type_id=MSDOS_TYPES["extended"], flags=()))
                number = 4
            position += EBR_GAP
            kind = "logical"
        number += 1
        flags: list[str] = []
        filesystem = swap = None
        if role == "bios_boot":
            type_id = types_["bios_boot"]
            flags.append("bios_grub")
        elif role == "swap":
            type_id = types_["swap"]
            swap = swap_plan(ctx, source_swaps)
        else:
            assert draft is not None
            filesystem = finish_filesystem(ctx, draft, size)
            type_id = types_["esp"] if filesystem.esp else types_["filesystem"]
            if filesystem.esp:
                flags.append("esp")
            if draft.mountpoint == boot_mount and ctx.firmware == "bios":
                if label == "msdos":
                    flags.append("boot")
                elif ctx.bootloader == "extlinux":
                    flags.append("legacy_boot")
        partitions.append(PartitionPlan(number=number, start=position, size=size, role=role, kind=kind,
                                        type_id=type_id, flags=tuple(flags), filesystem=filesystem, swap=swap))
        position += size
    return partitions


def table_label(ctx: PlanContext) -> str:
    """The partition table: target.label, or for auto the one the server's firmware boots from."""
    label = ctx.policy.label
    if label == "auto":
        # UEFI servers come on GPT (the ESP's natural home); BIOS ones on msdos, the way grub-pc boots them.
        label = "gpt" if ctx.firmware == "uefi" else "msdos"
    if label not in ("msdos", "gpt"):
        raise P2VError(f"unknown partition table type {label!r}")
    if label == "gpt" and ctx.firmware == "bios" and ctx.bootloader == "grub-legacy":
        raise P2VError("target.label gpt: grub legacy cannot boot from a GPT disk",
                       hint=f"use target.label: msdos in {ctx.spec_file}")
    return label


def partition_slots(ctx: PlanContext, label: str, drafts: Sequence[TargetDraft],
                    swap_part: int) -> list[tuple[Role, TargetDraft | None, int]]:
    """The partitions in disk order (module doc of tasks.lib.planning): role, draft, minimum size."""
    root = next(d for d in drafts if d.mountpoint == "/")
    others = [d for d in drafts if d is not root]
    ordered = [d for d in others if d.mountpoint == "/boot"] + \
              [d for d in others if d.mountpoint in ESP_MOUNTPOINTS] + \
              [d for d in others if d.mountpoint != "/boot" and d.mountpoint not in ESP_MOUNTPOINTS]

    slots: list[tuple[Role, TargetDraft | None, int]] = []  # role, draft, minimum size
    if label == "gpt" and ctx.firmware == "bios" and ctx.bootloader != "extlinux":
        slots.append(("bios_boot", None, BIOS_BOOT_SIZE))
    slots += [("filesystem", d, d.min_size) for d in ordered if d.mountpoint in ("/boot", *ESP_MOUNTPOINTS)]
    if swap_part:
        slots.append(("swap", None, swap_part))
    slots += [("filesystem", d, d.min_size) for d in ordered if d.mountpoint not in ("/boot", *ESP_MOUNTPOINTS)]
    slots.append(("filesystem", root, root.min_size))
    return slots
