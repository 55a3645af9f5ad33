"""The plan as a table for operators (`doit plan:<host>`), and its swap line."""

from __future__ import annotations

from collections.abc import Sequence

from tasks.lib.planning.model import GPT_TYPES, DiskPlan, GiB, mib


def _size(value: int) -> str:
    return f"{mib(value)} MiB" if value < 10 * GiB else f"{value / GiB:.1f} GiB"


def _wrap(items: Sequence[str], width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for item in items:
        piece = item if not current else f",{item}"
        if current and len(current) + len(piece) > width:
            lines.append(current + ",")
            current = item
        else:
            current += piece
    if current:
        lines.append(current)
    return lines or ["-"]


_GPT_NAMES = {GPT_TYPES["filesystem"]: "linux", GPT_TYPES["swap"]: "swap", GPT_TYPES["esp"]: "esp",
              GPT_TYPES["bios_boot"]: "bios"}


def swap_summary(plan: DiskPlan) -> str:
    """What the plan does with swap, against what the source had, in one line."""
    areas = []
    part = plan.swap_partition
    if part is not None:
        areas.append(f"swap partition p{part.number} of {_size(part.size)}")
    if plan.swap_file is not None:
        areas.append(f"swap file {plan.swap_file.path} of {_size(plan.swap_file.size)} (made by the fix stage)")
    if plan.source_swap is None:
        had = "the plan does not record the source's swap (made by an older p2v)"
    else:
        had = f"the source had {_size(plan.source_swap)} of swap in fstab" if plan.source_swap else \
            "the source had no swap"
    if plan.policy.swap == "none" and plan.source_swap:
        return f"{had}; none planned (target.swap: none)"
    return f"{had}; " + (" and ".join(areas) if areas else "none planned")


def render_plan(plan: DiskPlan) -> str:
    """The plan as a table for operators (`doit plan:<host>`)."""
    policy = plan.policy
    lines = [
        f"{plan.host}: {policy.layout}, {plan.label}, {_size(plan.size)} disk "
        f"(size {policy.size}, headroom {policy.headroom_percent}% or at least {_size(policy.min_headroom)}); "
        f"{plan.bootloader} on {plan.firmware}; features for kernel {plan.kernel or 'unknown'}",
        "",
    ]
    header = ("SOURCE", "DEVICE", "TYPE", "USED", "", "TARGET", "PART", "TYPE", "SIZE", "COPY")
    rows: list[tuple[str, ...]] = []
    for copy in plan.copies:
        fs = plan.filesystem(copy.target_mountpoint)
        part = plan.partition_of(copy.target_mountpoint)
        source = next(s for s in fs.sources if s.mountpoint == copy.source_mountpoint)
        if copy.target_mountpoint == copy.source_mountpoint:
            target = (copy.target_mountpoint, f"p{part.number}", fs.fstype, _size(part.size))
        else:
            target = (f"(into {copy.target_mountpoint})", f"p{part.number}", "", "")
        rows.append((copy.source_mountpoint, source.device, source.fstype, _size(source.used_bytes), "->", *target,
                     copy.method))
    for part in plan.partitions:
        if part.swap is not None:
            sources = ", ".join(part.swap.sources) or "-"
            rows.append(("swap", sources, "swap", "", "->", "swap", f"p{part.number}", "swap", _size(part.size), ""))
    if plan.swap_file is not None:
        rows.append(("swap", ", ".join(plan.swap_file.sources) or "-", "swap", "", "->", plan.swap_file.path,
                     f"(file in {plan.swap_file.filesystem})", "swap", _size(plan.swap_file.size), ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())

    lines += ["", f"  copy (target.copy: {policy.copy}):"]
    lines += [f"    {copy.source_mountpoint} by {copy.method}: {copy.why}" for copy in plan.copies]
    lines += ["", f"  swap: {swap_summary(plan)}"]
    lines += ["", "  partitions:"]
    for part in plan.partitions:
        what: str = part.role
        if part.filesystem is not None:
            fs = part.filesystem
            label = f" label {fs.label!r}" if fs.label else ""
            uuid = f" UUID {fs.uuid}" if fs.uuid else " new UUID"
            what = f"{fs.fstype} {fs.mountpoint}{label}{uuid}"
        elif part.swap is not None:
            what = "swap" + (f" label {part.swap.label!r}" if part.swap.label else "") + \
                (f" UUID {part.swap.uuid}" if part.swap.uuid else " new UUID")
        flags = f" [{','.join(part.flags)}]" if part.flags else ""
        type_name = _GPT_NAMES.get(part.type_id, part.type_id)
        lines.append(f"  p{part.number:<2} {mib(part.start):>7} MiB +{_size(part.size):>10}  "
                     f"{part.kind:<8} {type_name:<5} {what}{flags}")
        if part.filesystem is not None:
            fs = part.filesystem
            lines.append(f"       data {_size(fs.used_bytes)}, headroom {_size(fs.headroom)}, "
                         f"overhead ~{_size(fs.overhead)}; features: {fs.features_from}")
            shown = [*fs.features, *(f"^{f}" for f in fs.features_off)]
            lines += [f"         {line}" for line in _wrap(shown, 90)]
    changes = [c for c in plan.fstab if c.action != "keep"]
    if changes:
        lines += ["", "  fstab:"]
        for change in changes:
            if change.action == "remove":
                lines.append(f"    line {change.line}: {change.file} ({change.spec}) removed: {change.reason}")
            else:
                new = change.new_spec or "UUID=<new>"
                extra = f", options {','.join(change.new_options)}" if change.dropped_options else ""
                lines.append(f"    line {change.line}: {change.file} {change.spec} -> {new} "
                             f"{change.new_vfstype}{extra}")
    if plan.notes:
        lines += ["", "  notes:"]
        lines += [f"    - {note}" for note in plan.notes]
    return "\n".join(lines)
