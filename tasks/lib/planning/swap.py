"""What the source's swap becomes (a partition, a file, both or none) and what it stands for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasks.lib.planning.context import PlanContext
from tasks.lib.planning.model import SWAP_FILE_PATH, mib, round_up_mib
from tasks.lib.runner import P2VError


@dataclass(frozen=True)
class SwapChoice:
    """What becomes of the source's swap: sizes of the swap partition and file to make (0: none)."""

    partition: int
    file: int
    file_path: str
    partitions: tuple[Mapping[str, Any], ...]  # source swap partitions in fstab (layout "swaps")
    files: tuple[Mapping[str, Any], ...]  # source swap file lines (layout "fstab", status swapfile)
    total: int  # bytes of swap the source had


def choose_swap(ctx: PlanContext) -> SwapChoice:
    """What the source's swap becomes (module doc)."""
    partitions = tuple(s for s in ctx.layout["swaps"] if s.get("in_fstab"))
    files = tuple(e for e in ctx.layout["fstab"] if e.get("status") == "swapfile")
    for entry in files:
        if "size" not in entry:
            raise P2VError(f"layout.json records the swap file {entry['spec']} without its size "
                           "(made by an older inspect)",
                           hint="run inspect:<host> again: doit forget inspect:<host>")
        if not int(entry["size"]):
            ctx.notes.append(f"the source's fstab names the swap file {entry['spec']}, which it does not hold "
                             f"({entry.get('reason', 'empty')}): no swap is planned for it")
    part_bytes = sum(int(s["size"]) for s in partitions)
    file_bytes = sum(int(e["size"]) for e in files)
    total = part_bytes + file_bytes
    existing = [e["spec"] for e in files if int(e["size"])]
    path = existing[0] if existing else SWAP_FILE_PATH
    choice = {"partition": 0, "file": 0}
    policy = ctx.policy.swap
    if policy == "none":
        if total:
            ctx.notes.append(f"swap: none; the source's {mib(total)} MiB of swap is dropped")
    elif not total and not files:
        ctx.notes.append("the source has no swap in fstab; none planned")
    elif policy == "partition":
        choice["partition"] = round_up_mib(total)
    elif policy == "file":
        choice["file"] = round_up_mib(total)
    else:
        choice = {"partition": round_up_mib(part_bytes), "file": round_up_mib(file_bytes)}
    return SwapChoice(partition=choice["partition"], file=choice["file"], file_path=path,
                       partitions=partitions, files=files, total=total)


def swap_partition_sources(ctx: PlanContext, swap: SwapChoice) -> list[str]:
    sources = [s["device"] for s in swap.partitions]
    if ctx.policy.swap == "partition":
        sources += [e["spec"] for e in swap.files if int(e["size"])]
    return sources
