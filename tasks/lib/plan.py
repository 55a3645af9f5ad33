"""The disk planner's old home: every public name, re-exported from `tasks.lib.planning`.

The planner was one 1,300-line module with a 470-line class; it is now split by concern
(issue 12), in `tasks/lib/planning/`: `model` (DiskPlan and its parts, the JSON form),
`context` (what every step reads, and the notes), `features`, `sizing`, `swap`, `mkfs`,
`layout`, `fstab_map`, `planner` (`plan_disk`) and `render` (`render_plan`). The decisions
and why are in the package's docstring. New code imports from those modules.
"""

from __future__ import annotations

from tasks.lib.planning.features import (
    EXT_INCOMPAT,
    EXT_NEWER_DEFAULTS,
    EXT_STATE_FLAGS,
    XFS_BOOT_FLAGS,
    XFS_FLAGS,
    XFS_INODE_FLAGS,
    XFS_META_FLAGS,
    kernel_version,
    made_differences,
    oldest_kernel,
)
from tasks.lib.planning.fstab_map import (
    GENERIC_MOUNT_OPTIONS,
)
from tasks.lib.planning.model import (
    BIOS_BOOT_SIZE,
    EBR_GAP,
    ESP_MOUNTPOINTS,
    EXT_TYPES,
    FIRST_PARTITION_START,
    GPT_TAIL,
    GPT_TYPES,
    MSDOS_TYPES,
    PLAN_FORMAT,
    PLAN_VERSION,
    SUPPORTED_TYPES,
    SWAP_FILE_PATH,
    CopyPlan,
    DiskPlan,
    FilesystemPlan,
    FstabChange,
    GiB,
    MiB,
    PartitionPlan,
    PlanPolicy,
    Role,
    SourceMount,
    SwapFilePlan,
    SwapPlan,
    mib,
    parse_size,
    round_up_mib,
)
from tasks.lib.planning.planner import (
    plan_disk,
)
from tasks.lib.planning.render import (
    render_plan,
    swap_summary,
)
from tasks.lib.planning.sizing import (
    MIN_FS_SIZE,
    ext_inode_ratio,
    ext_journal_blocks,
    ext_overhead,
    vfat_overhead,
    xfs_log_size,
    xfs_overhead,
)

__all__ = [
    "BIOS_BOOT_SIZE",
    "EBR_GAP",
    "ESP_MOUNTPOINTS",
    "EXT_INCOMPAT",
    "EXT_NEWER_DEFAULTS",
    "EXT_STATE_FLAGS",
    "EXT_TYPES",
    "FIRST_PARTITION_START",
    "GENERIC_MOUNT_OPTIONS",
    "GPT_TAIL",
    "GPT_TYPES",
    "MIN_FS_SIZE",
    "MSDOS_TYPES",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "SUPPORTED_TYPES",
    "SWAP_FILE_PATH",
    "XFS_BOOT_FLAGS",
    "XFS_FLAGS",
    "XFS_INODE_FLAGS",
    "XFS_META_FLAGS",
    "CopyPlan",
    "DiskPlan",
    "FilesystemPlan",
    "FstabChange",
    "GiB",
    "MiB",
    "PartitionPlan",
    "PlanPolicy",
    "Role",
    "SourceMount",
    "SwapFilePlan",
    "SwapPlan",
    "ext_inode_ratio",
    "ext_journal_blocks",
    "ext_overhead",
    "kernel_version",
    "made_differences",
    "mib",
    "oldest_kernel",
    "parse_size",
    "plan_disk",
    "render_plan",
    "round_up_mib",
    "swap_summary",
    "vfat_overhead",
    "xfs_log_size",
    "xfs_overhead",
]
