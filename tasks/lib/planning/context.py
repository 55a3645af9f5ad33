"""`PlanContext`: what every step of the planner reads (the layout, the target policy, the
source's mounts and filesystems, the oldest kernel) and the notes it collects, in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tasks.lib.planning.features import oldest_kernel
from tasks.lib.planning.model import SUPPORTED_TYPES, SourceMount, parse_size
from tasks.lib.runner import P2VError
from tasks.lib.spec import TargetPolicy


class PlanContext:
    """What every part of the planner reads: the layout, the policy, the source's mounts and
    filesystems; and the notes it collects, in the order they are made."""

    def __init__(self, layout: Mapping[str, Any], policy: TargetPolicy, host: str, spec_file: str):
        self.layout = layout
        self.policy = policy
        self.host = host
        self.spec_file = spec_file
        self.notes: list[str] = []
        self.swap_partition_sources: tuple[str, ...] = ()  # what the swap partition stands for
        self.by_device = {fs["device"]: fs for fs in layout["filesystems"]}
        self.bootloader: str = layout["boot"]["bootloader"]
        self.firmware: str = layout["boot"]["firmware"]
        self.kernel = oldest_kernel(layout)
        self.min_headroom = parse_size(policy.min_headroom)
        self.mounts = [self.source_mount(m) for m in layout["mounts"]]
        # Source swap files are left out of the copy: their space is no data to hold.
        self.left_out: dict[str, int] = {}
        for entry in layout["fstab"]:
            if entry.get("status") == "swapfile" and int(entry.get("size") or 0):
                holder = receiver(entry["spec"], [m.mountpoint for m in self.mounts])
                self.left_out[holder] = self.left_out.get(holder, 0) + int(entry["size"])

    def source_mount(self, mount: Mapping[str, Any]) -> SourceMount:
        fs = self.by_device[mount["device"]]
        return SourceMount(mountpoint=mount["mountpoint"], device=mount["device"], fstype=fs["type"],
                           used_bytes=int(fs["used_bytes"]), used_inodes=int(fs.get("used_inodes", 0)),
                           uuid=fs.get("uuid", ""), label=fs.get("label", ""))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def headroom(self, used: int) -> int:
        return max(used * self.policy.headroom_percent // 100, self.min_headroom)

    def used(self, members: Sequence[SourceMount]) -> int:
        return sum(max(0, m.used_bytes - self.left_out.get(m.mountpoint, 0)) for m in members)

    def root_type(self, root: SourceMount) -> str:
        wanted = self.policy.root_fs
        if wanted == "auto":
            if root.fstype not in SUPPORTED_TYPES or root.fstype == "vfat":
                raise P2VError(f"the source root is {root.fstype}, which p2v does not make",
                               hint=f"set target.root_fs to ext4 or xfs in {self.spec_file}")
            return root.fstype
        return wanted

    def source_block_size(self, mount: SourceMount) -> int:
        fs = self.by_device[mount.device]
        if fs["type"] == "xfs":
            return int(fs.get("features", {}).get("data.bsize", 4096))
        return int(fs.get("block_size") or 4096)


def receiver(mountpoint: str, fs_mounts: Iterable[str]) -> str:
    """The deepest filesystem (of `fs_mounts`, "/" among them) whose mountpoint contains `mountpoint`."""
    candidates = [m for m in fs_mounts if m == "/" or mountpoint == m or mountpoint.startswith(m + "/")]
    return max(candidates, key=len)
