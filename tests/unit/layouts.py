"""The recorded layouts (tests/unit/data/layouts) and variations of them, for planner and disk tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

LAYOUTS = Path(__file__).parent / "data" / "layouts"


def layout(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((LAYOUTS / f"{name}.json").read_text())
    return data


def with_extra_mounts(name: str, points: list[str]) -> dict[str, Any]:
    """`name` with more xfs mounts like its /srv (disk2p2, disk2p3, ...)."""
    lay = layout(name)
    template = next(f for f in lay["filesystems"] if f.get("mountpoint") == "/srv")
    for index, point in enumerate(points, start=2):
        device = f"disk2p{index}"
        fs = copy.deepcopy(template)
        fs.update(device=device, mountpoint=point, uuid=f"00000000-0000-4000-8000-00000000000{index}")
        lay["filesystems"].append(fs)
        lay["mounts"].append({"device": device, "fstab_line": 20 + index, "fstype": "xfs", "mountpoint": point,
                              "options": ["defaults"]})
        lay["fstab"].append({"device": device, "file": point, "freq": 0, "line": 20 + index, "options": ["defaults"],
                             "passno": 0, "spec": f"UUID={fs['uuid']}", "status": "mounted", "vfstype": "xfs"})
    return lay


def without_xfs(name: str, kernel: str, bootloader: str = "grub2") -> dict[str, Any]:
    """`name` without its xfs filesystems, with one kernel and the given bootloader."""
    lay = layout(name)
    lay["filesystems"] = [f for f in lay["filesystems"] if f["type"] != "xfs"]
    lay["mounts"] = [m for m in lay["mounts"] if m["fstype"] != "xfs"]
    lay["fstab"] = [e for e in lay["fstab"] if e["vfstype"] != "xfs"]
    lay["system"]["kernels"] = [{**lay["system"]["kernels"][0], "version": kernel}]
    lay["boot"]["bootloader"] = bootloader
    return lay


def with_swap_file(name: str, path: str = "/swap.img", size: int = 2 << 30, *, keep_partitions: bool = False,
                   reason: str | None = None) -> dict[str, Any]:
    """`name` whose swap is a swap file, as inspect records one (fstab status swapfile, with its size).

    The file's line takes the place of the first swap partition's line; with
    `keep_partitions` it is one more line and the partitions stay. `reason`
    (with size 0): a swap file fstab names and the source does not hold.
    """
    lay = layout(name)
    # The file's blocks are in its filesystem's usage, as statvfs showed it to inspect.
    holder = max((m for m in lay["mounts"] if m["mountpoint"] == "/" or path.startswith(m["mountpoint"] + "/")),
                 key=lambda m: len(m["mountpoint"]))
    next(fs for fs in lay["filesystems"] if fs["device"] == holder["device"])["used_bytes"] += size
    record = {"file": "none", "freq": 0, "options": ["sw"], "passno": 0, "spec": path, "status": "swapfile",
              "vfstype": "swap", "size": size, **({"reason": reason} if reason else {})}
    swap_lines = [e for e in lay["fstab"] if e["status"] == "swap"]
    if keep_partitions or not swap_lines:
        lay["fstab"].append({**record, "line": max(e["line"] for e in lay["fstab"]) + 1})
    else:
        first = lay["fstab"].index(swap_lines[0])
        lay["fstab"][first] = {**record, "line": swap_lines[0]["line"]}
        lay["fstab"] = [e for e in lay["fstab"] if e not in swap_lines[1:]]
        for swap in lay["swaps"]:
            swap["in_fstab"] = False
    return lay
