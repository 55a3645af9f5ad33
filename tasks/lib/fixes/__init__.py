"""The fix stage's planning: every file edit and command line, decided without touching anything.

`plan_edits(tree, layout, plan, policy)` reads the copied target tree
through a `TreeReader` and returns an `EditPlan`: the full new text of each
file to change (or None to delete it), non-fatal findings, the chosen kernel
and its final kernel arguments. The command lines come from
`initrd_commands`, `initrd_check_command`, `bootloader_install_commands`,
`bootloader_config_commands` and `service_commands`. tasks/fix.py carries
all of it out (`apply_edit` writes one edit, confined to the target root).

The steps, in order: fstab, bootloader-config, initrd-config, network,
cloud-init-config, selinux. Planning on an already fixed tree yields no
edits: each step rewrites what is there and drops rewrites that change
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.lib.fixes.apply import apply_edit
from tasks.lib.fixes.bootconfig import cmdline_target, fix_bootloader_config
from tasks.lib.fixes.commands import (
    EFI_MODULES,
    GRUB_PC_INSTALL_DEVICES,
    OS_PROBER_SCRIPT,
    VIRTIO_BOOT_DISK,
    EfiLoader,
    bootloader_config_commands,
    bootloader_install_commands,
    debconf_install_device_command,
    efi_loader,
    service_commands,
)
from tasks.lib.fixes.fstab import fix_fstab, rewrite_fstab
from tasks.lib.fixes.guest import CLOUD_INIT_CONFIG, fix_cloud_init, fix_selinux
from tasks.lib.fixes.initrd import (
    choose_kernel,
    expected_initrd_drivers,
    fix_initrd_config,
    initrd_check_command,
    initrd_commands,
)
from tasks.lib.fixes.model import (
    VIRTIO_MODULES,
    Changes,
    Command,
    EditPlan,
    FileEdit,
    Finding,
    TreeReader,
    describe,
)
from tasks.lib.fixes.network import decide_naming, fix_network
from tasks.lib.planning.model import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.spec import FixPolicy

__all__ = [
    "CLOUD_INIT_CONFIG",
    "EFI_MODULES",
    "GRUB_PC_INSTALL_DEVICES",
    "OS_PROBER_SCRIPT",
    "VIRTIO_BOOT_DISK",
    "VIRTIO_MODULES",
    "Command",
    "EditPlan",
    "EfiLoader",
    "FileEdit",
    "Finding",
    "TreeReader",
    "apply_edit",
    "bootloader_config_commands",
    "bootloader_install_commands",
    "check_convertible",
    "choose_kernel",
    "debconf_install_device_command",
    "describe",
    "efi_loader",
    "expected_initrd_drivers",
    "initrd_check_command",
    "initrd_commands",
    "plan_edits",
    "rewrite_fstab",
    "service_commands",
]


def check_convertible(layout: Mapping[str, Any], policy: FixPolicy) -> str:
    """What the fix stage needs from the source, checked before it writes anything: a kernel
    that boots on virtio, an initrd tool and a bootloader p2v configures, unless the spec skips
    the step that needs them. Returns the kernel; raises P2VError with a hint."""
    kernel = choose_kernel(layout)
    if "initrd" not in policy.skip:
        initrd_commands(layout, kernel)
    if "bootloader-config" not in policy.skip:
        bootloader_config_commands(layout)
    return kernel


def plan_edits(tree: TreeReader, layout: Mapping[str, Any], plan: DiskPlan, policy: FixPolicy) -> EditPlan:
    """Every file edit the fix stage makes on the target tree (pure: reads `tree` only)."""
    if not plan.complete:
        raise P2VError("the fix stage needs the completed disk plan (disk-plan.json, with the UUIDs mkfs made)",
                       hint="rerun disk:<host>")
    system = describe(layout)
    kernel = choose_kernel(layout)
    naming, naming_findings = decide_naming(tree, system, policy)
    target = cmdline_target(plan, naming.pin_ifnames)
    boot, cmdline = fix_bootloader_config(tree, layout, system.bootloader, plan, target, kernel)
    network = fix_network(tree, system, policy, naming, plan.host)
    for finding in naming_findings:
        network.note(finding)
    steps: list[Changes] = [
        fix_fstab(tree, plan),
        boot,
        fix_initrd_config(tree, system, plan),
        network,
        fix_cloud_init(tree, system, policy),
    ]
    edits = [edit for step in steps for edit in step.edits]
    steps.append(fix_selinux(tree, system, layout, plan, policy, edits))
    edits = [edit for step in steps for edit in step.edits]
    paths = [edit.path for edit in edits]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise P2VError(f"two fix steps edit the same file: {', '.join(twice)}")
    return EditPlan(
        edits=tuple(edits),
        findings=tuple(finding for step in steps for finding in step.findings),
        kernel_cmdline=cmdline,
        kernel=kernel,
    )
