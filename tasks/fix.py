"""Fix stage: make the copied system boot on OpenStack KVM.

    fix:<host>  rootfs-synced.stamp + disk-plan.json + layout.json  ->  fixed.stamp

The target tree is mounted as planned, /dev /proc /sys /run are bound for the
chroot, and a flat list of named steps runs, in this order:

    check-kernel       the newest kernel with virtio (an error before anything is written)
    fstab              new UUIDs, merged mounts removed, swap as planned
    bootloader-config  root=, resume=, no rd.lvm/rd.md/rd.luks, serial console
    network            addresses kept, MAC bindings removed, names stable on virtio
    cloud-init-config  datasources ConfigDrive and OpenStack; kept network stays kept
    initrd-config      virtio modules for initramfs-tools, resume device
    selinux            autorelabel where labels may not have survived
    swap-file          the planned swap file: zeros (not sparse), mode 0600, mkswap
    packages           cloud-init and the spec's extras, from the spec's package source
    cloud-init-clean   no instance state from the build
    services           the spec's hardware agents disabled
    initrd             regenerated non-hostonly; virtio drivers proven in it
    bootloader-install grub to the image's MBR (BIOS), or grub's EFI loader onto the ESP
                       and its fallback path EFI/BOOT/BOOTX64.EFI (UEFI); its config
                       regenerated and checked
    inode-flags        i (immutable) and a (append-only), as on the source: last, so
                       that every step before could still write (tasks/lib/inodeflags.py)

The ESP (vfat) is never mounted: the steps see a writable copy of its files
at its mount point (tasks/lib/esp.py), written back by mtools and proven
when every step has succeeded; on a failure the ESP is left as it was.

What to change is planned by pure functions (tasks/lib/fixes, tasks/lib/packages);
this module carries it out. Every file edit goes through paths confined to the
target root. Each step is idempotent: a second run finds nothing to do, or
redoes a command whose output is the same (see `_initrd_is_current`). A
second run first clears the i and a flags the first one set (the paths are in
the image's conversion record and in the sync receipt), and sets them again
at its end.
The receipt (the stamp) lists what each step changed, and its warnings. A
run that finishes a fix that was killed or failed half-way reports, for a
step the unfinished run had done, what that run did, and installs the
packages that were missing before it (tasks/lib/fixjournal.py): the receipt
is the one an uninterrupted run gives.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tasks.lib import fixes
from tasks.lib.fixes.steps.boot import (
    esp_working_copies,
    install_bootloader,
    regenerate_initrd,
    remove_stale_device_map,
)
from tasks.lib.fixes.steps.context import FixContext, StepReport
from tasks.lib.fixes.steps.flags import (
    applied_flag_paths,
    clear_deferred_flags,
    pending_flags,
    restore_deferred_flags,
    target_devices,
)
from tasks.lib.fixes.steps.packages import (
    clean_cloud_init,
    disable_services,
    install_packages,
    remove_stale_policy,
)
from tasks.lib.fixes.steps.record import _read_record, _write_record
from tasks.lib.fixes.steps.swapfile import make_swap_file
from tasks.lib.fixjournal import JOURNAL_FILE, FixJournal, discard
from tasks.lib.outputs import FixStamp, load_sync_stamp, write_fix_stamp
from tasks.lib.paths import RootTreeReader
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.model import DiskPlan
from tasks.lib.resources import chroot_binds
from tasks.lib.runner import P2VError
from tasks.lib.spec import Spec
from tasks.lib.target import MountedTarget, loop_direct_io, mounted_target
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

log = logging.getLogger("p2v.fix")

STAMP_FORMAT = "p2v-fix-stamp"
STAMP_VERSION = 2  # 2: steps swap-file and inode-flags
SYNC_STAMP = "rootfs-synced.stamp"
# The order steps run in; the spec's fix.skip may name any of them (for
# diagnosis: verify then shows what the step was for).
STEP_NAMES = ("fstab", "bootloader-config", "network", "cloud-init-config", "initrd-config", "selinux",
              "swap-file", "packages", "cloud-init-clean", "services", "initrd", "bootloader-install", "inode-flags")
EDIT_STEPS = ("fstab", "bootloader-config", "network", "cloud-init-config", "initrd-config", "selinux")


# ---------------------------------------------------------------- steps


def apply_edits(ctx: FixContext, step: str) -> None:
    """Write the planned edits of one step. The planner leaves out edits that would
    change nothing, so every edit here is a change."""
    report = ctx.report(step)
    for edit in (e for e in ctx.edits.edits if e.step == step):
        existed = ctx.tree.exists(edit.path)
        fixes.apply_edit(ctx.root, edit)
        verb = "removed" if edit.text is None else "edited" if existed else "wrote"
        report.changed(f"{verb} {edit.path}: {edit.why}")


# ---------------------------------------------------------------- the stage


def _steps() -> list[tuple[str, Callable[[FixContext], None]]]:
    edit_steps = [(name, functools.partial(apply_edits, step=name)) for name in EDIT_STEPS]
    return [*edit_steps, ("swap-file", make_swap_file), ("packages", install_packages),
            ("cloud-init-clean", clean_cloud_init),
            ("services", disable_services), ("initrd", regenerate_initrd), ("bootloader-install", install_bootloader)]


def fix_tree(spec: Spec, layout: Mapping[str, Any], plan: DiskPlan, target: MountedTarget,
             journal: FixJournal | None = None) -> FixContext:
    """Run every step but inode-flags on a mounted target (binds in place); return what each did."""
    edits = fixes.plan_edits(RootTreeReader(target.root), layout, plan, spec.fix)
    ctx = FixContext(spec=spec, layout=layout, plan=plan, target=target, edits=edits, journal=journal)
    for finding in edits.findings:
        ctx.report(finding.step).warnings.append(finding.message)
    unknown = sorted(set(spec.fix.skip) - set(STEP_NAMES))
    if unknown:
        raise P2VError(f"{spec.file}: fix.skip: unknown step(s) {', '.join(unknown)}",
                       hint=f"steps are: {', '.join(STEP_NAMES)}")
    # What a killed fix left in the image that no step would take for p2v's (a step that is skipped now
    # would not even look).
    remove_stale_policy(ctx)
    remove_stale_device_map(ctx)
    for name, step in _steps():
        report = ctx.report(name)
        if name in spec.fix.skip:
            report.status = "skipped"
            report.warnings.append("skipped by the spec (fix.skip)")
            log.warning("fix step %s skipped by the spec", name)
            continue
        _run_step(ctx, name, step)
    record = _read_record(target.root)
    summary = {"kernel": edits.kernel, "kernel_cmdline": list(edits.kernel_cmdline), "host": spec.host}
    if {k: record.get(k) for k in summary} != summary:
        _write_record(target.root, {**record, **summary})
    return ctx


def _run_step(ctx: FixContext, name: str, step: Callable[[FixContext], None]) -> None:
    report = ctx.report(name)
    started = time.monotonic()
    step(ctx)
    if ctx.journal is not None:
        earlier = ctx.journal.earlier(name)
        if earlier is not None and report.status == "unchanged":
            # Nothing left to do because an unfinished run of this copy did it: its receipt, not "unchanged".
            report = ctx.reports[name] = StepReport(name, earlier["status"], list(earlier["changes"]),
                                                    list(earlier["warnings"]), list(earlier["commands"]))
        ctx.journal.finished(report.to_json())
    log.info("fix %-18s %-9s %4.1f s%s", name, report.status, time.monotonic() - started,
             "".join(f"\n    {change}" for change in report.changes))
    for warning in report.warnings:
        log.warning("fix %s: %s", name, warning)


def finish_flags(ctx: FixContext, pending: Sequence[tuple[str, str]], devices: frozenset[int]) -> None:
    """The last step: outside the chroot binds, after everything else has written."""
    if "inode-flags" in ctx.spec.fix.skip:
        report = ctx.report("inode-flags")
        report.status = "skipped"
        report.warnings.append("skipped by the spec (fix.skip)" + (
            f": {len(pending)} entries stay without the i/a flags they have on the source" if pending else ""))
        log.warning("fix step inode-flags skipped by the spec")
        return
    _run_step(ctx, "inode-flags", lambda c: restore_deferred_flags(c, pending, devices))


def fix_host(run: StageRun) -> None:
    spec = run.spec
    layout = read_layout(run.input(LAYOUT_FILE))
    plan = read_disk_plan(run.input(PLAN_FILE))
    image = spec.artifact("disk.img")
    # Fatal before anything is written: no kernel that can boot on virtio, no initrd tool or
    # bootloader p2v runs (unless the spec skips the step that needs it).
    kernel = fixes.check_convertible(layout, spec.fix)
    log.info("kernel %s (it has virtio)", kernel)
    pending = pending_flags(load_sync_stamp(spec))
    copy = hashlib.sha256(run.input(SYNC_STAMP).read_bytes()).hexdigest()
    journal = FixJournal.open(spec.state_dir / JOURNAL_FILE, copy)
    started = time.monotonic()
    with mounted_target(image, plan, run_dir=spec.run_dir, direct_io=loop_direct_io(image.parent)) as target:
        devices = target_devices(target, plan)
        cleared = clear_deferred_flags(target.root, [*applied_flag_paths(target.root), *(p for p, _ in pending)],
                                       devices)
        if cleared:
            log.info("cleared i/a on %d entries an earlier fix set; set again at the end", cleared)
        with esp_working_copies(plan, target, spec.run_dir), chroot_binds(target.root):
            ctx = fix_tree(spec, layout, plan, target, journal)
        finish_flags(ctx, pending, devices)
    stamp: FixStamp = {
        "format": STAMP_FORMAT,
        "version": STAMP_VERSION,
        "host": spec.host,
        "seconds": round(time.monotonic() - started, 1),
        "kernel": ctx.edits.kernel,
        "kernel_cmdline": list(ctx.edits.kernel_cmdline),
        "installed_packages": ctx.installed_packages,
        "inode_flags": {"restored": [{"path": path, "flags": flags} for path, flags in ctx.restored_flags]},
        "steps": [ctx.report(name).to_json() for name in STEP_NAMES],
        "warnings": [f"{r.name}: {w}" for name in STEP_NAMES for r in [ctx.report(name)] for w in r.warnings],
        "sync_receipt_sha256": copy,
    }
    write_fix_stamp(run.partial, stamp)


def _config(spec: Spec) -> dict[str, object]:
    fix = spec.fix
    return {"stamp_version": STAMP_VERSION, "network": fix.network, "cloud_init_install": fix.cloud_init.install,
            "cloud_init_source": fix.cloud_init.source, "packages": list(fix.cloud_init.packages),
            "remove_services": list(fix.remove_services), "skip": list(fix.skip)}


STAGE = Stage(
    name="fix",
    doc="make the copy boot on KVM: fstab, grub, network, cloud-init, initrd, bootloader -> fixed.stamp",
    target="fixed.stamp",
    inputs=(SYNC_STAMP, LAYOUT_FILE, PLAN_FILE),
    run=fix_host,
    config=_config,
    committed=lambda spec: discard(spec.state_dir / JOURNAL_FILE),
)
