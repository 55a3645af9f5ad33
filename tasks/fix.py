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
    packages           cloud-init and the spec's extras, from the spec's package source
    cloud-init-clean   no instance state from the build
    services           the spec's hardware agents disabled
    initrd             regenerated non-hostonly; virtio drivers proven in it
    bootloader-install grub to the image's MBR (BIOS), or grub's EFI loader onto the ESP
                       and its fallback path EFI/BOOT/BOOTX64.EFI (UEFI); its config
                       regenerated and checked

The ESP (vfat) is never mounted: the steps see a writable copy of its files
at its mount point (tasks/lib/esp.py), written back by mtools and proven
when every step has succeeded; on a failure the ESP is left as it was.

What to change is planned by pure functions (tasks/lib/fixes, tasks/lib/packages);
this module carries it out. Every file edit goes through paths confined to the
target root. Each step is idempotent: a second run finds nothing to do, or
redoes a command whose output is the same (see `_initrd_is_current`).
The receipt (the stamp) lists what each step changed, and its warnings.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.disk import supports_direct_io
from tasks.lib import esp, fixes
from tasks.lib.fixes import EditPlan
from tasks.lib.packages import APT_SCRATCH, REPO_MOUNT, PackageSource, plan_install, write_apt_index
from tasks.lib.paths import RootTreeReader, read_text_in_root, remove_in_root, resolve_in_root, write_text_in_root
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.plan import DiskPlan
from tasks.lib.resources import chroot_binds, mounted
from tasks.lib.runner import P2VError, chroot_run
from tasks.lib.spec import Spec
from tasks.lib.target import MountedTarget, mounted_target
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

log = logging.getLogger("p2v.fix")

STAMP_FORMAT = "p2v-fix-stamp"
STAMP_VERSION = 1
SYNC_STAMP = "rootfs-synced.stamp"
VIRTIO_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_pci", "virtio_net")
# Inside the target: what p2v did, for the server's next administrator, and
# what lets a rerun see that the initrd is already current.
CONVERSION_RECORD = "/var/lib/p2v/conversion.json"
# The order steps run in; the spec's fix.skip may name any of them (for
# diagnosis: verify then shows what the step was for).
STEP_NAMES = ("fstab", "bootloader-config", "network", "cloud-init-config", "initrd-config", "selinux",
              "packages", "cloud-init-clean", "services", "initrd", "bootloader-install")
EDIT_STEPS = ("fstab", "bootloader-config", "network", "cloud-init-config", "initrd-config", "selinux")


@dataclass
class StepReport:
    name: str
    status: str = "unchanged"  # changed | unchanged | skipped
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def changed(self, what: str) -> None:
        self.status = "changed"
        self.changes.append(what)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "changes": self.changes, "warnings": self.warnings,
                "commands": self.commands}


@dataclass
class FixContext:
    spec: Spec
    layout: Mapping[str, Any]
    plan: DiskPlan
    target: MountedTarget
    edits: EditPlan
    reports: dict[str, StepReport] = field(default_factory=dict)
    installed_packages: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.target.root

    @property
    def tree(self) -> RootTreeReader:
        return RootTreeReader(self.root)

    def report(self, step: str) -> StepReport:
        return self.reports.setdefault(step, StepReport(step))

    def chroot(self, step: str, argv: Sequence[str], *, timeout: float = 900,
               env: Mapping[str, str] | None = None, input: str | None = None) -> str:
        """Run a command in the target; its line goes into the step's report."""
        self.report(step).commands.append(" ".join(argv))
        result = chroot_run(self.root, list(argv), env=env, timeout=timeout, input=input)
        return result.stdout


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


@contextlib.contextmanager
def package_repository(ctx: FixContext, source: PackageSource) -> Iterator[None]:
    """Make the spec's package source reachable from the chroot, for this step only."""
    with contextlib.ExitStack() as stack:
        if source.kind == "directory":
            directory = Path(source.location)
            if not directory.is_dir():
                raise P2VError(f"{ctx.spec.file}: fix.cloud_init.source: {directory} is not a directory",
                               hint="a directory of packages for the server's release, `distro`, or a mirror URL")
            repo = resolve_in_root(ctx.root, REPO_MOUNT)  # in the chroot's tmpfs /run
            pool = repo / "pool"
            pool.mkdir(parents=True, exist_ok=True)
            if ctx.layout["system"].get("package_manager") == "apt":
                count = write_apt_index(directory, repo)
                log.info("indexed %d packages from %s", count, directory)
            stack.enter_context(mounted(str(directory), pool, bind=True, options=["ro"]))
        else:
            # The server's resolver is the old network's; name lookups must work from here.
            resolv = resolve_in_root(ctx.root, "/etc/resolv.conf")
            if resolv.is_file():
                stack.enter_context(mounted("/etc/resolv.conf", resolv, bind=True, options=["ro"]))
        yield


@contextlib.contextmanager
def services_held_back(ctx: FixContext) -> Iterator[None]:
    """Package scripts must not start daemons in the chroot (Debian's policy-rc.d)."""
    if ctx.layout["system"].get("package_manager") != "apt":
        yield
        return
    policy = "/usr/sbin/policy-rc.d"
    existing = read_text_in_root(ctx.root, policy)
    if existing is not None:
        yield
        return
    write_text_in_root(ctx.root, policy, "#!/bin/sh\n# p2v: no daemons while installing in a chroot\nexit 101\n",
                       mode=0o755)
    try:
        yield
    finally:
        remove_in_root(ctx.root, policy)


def install_packages(ctx: FixContext) -> None:
    report = ctx.report("packages")
    policy = ctx.spec.fix.cloud_init
    wanted = [*(["cloud-init"] if policy.install else []), *policy.packages]
    if not wanted:
        report.status = "skipped"
        report.changes.append("nothing to install (fix.cloud_init.install is false and no packages are listed)")
        return
    missing = [name for name in wanted if not _is_installed(ctx, name)]
    if not missing:
        ctx.installed_packages = wanted
        return
    install = plan_install(ctx.layout, PackageSource.from_spec(policy.source), missing)
    with package_repository(ctx, PackageSource.from_spec(policy.source)), services_held_back(ctx):
        for path, text in install.files.items():
            target = resolve_in_root(ctx.root, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        try:
            for argv in install.commands:
                ctx.chroot("packages", argv, timeout=1800)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(resolve_in_root(ctx.root, APT_SCRATCH))
    still_missing = [name for name in wanted if not _is_installed(ctx, name)]
    if still_missing:
        raise P2VError(f"packages not installed after the install step: {', '.join(still_missing)}",
                       hint=f"see the log; the package source was {policy.source}")
    ctx.installed_packages = wanted
    report.changed(f"installed {', '.join(missing)} from {policy.source}")


def _is_installed(ctx: FixContext, package: str) -> bool:
    manager = ctx.layout["system"].get("package_manager")
    if manager == "apt":
        result = chroot_run(ctx.root, ["dpkg-query", "-W", "-f=${db:Status-Status}", package], check=False)
        return result.returncode == 0 and result.stdout.strip() == "installed"
    result = chroot_run(ctx.root, ["rpm", "-q", package], check=False)
    return result.returncode == 0


def clean_cloud_init(ctx: FixContext) -> None:
    report = ctx.report("cloud-init-clean")
    if not os.path.exists(resolve_in_root(ctx.root, "/usr/bin/cloud-init")):
        report.status = "skipped"
        return
    state = resolve_in_root(ctx.root, "/var/lib/cloud")
    had_state = state.is_dir() and any(p.name != "data" for p in state.iterdir())
    ctx.chroot("cloud-init-clean", ["cloud-init", "clean", "--logs"], timeout=300)
    if had_state:
        report.changed("removed cloud-init instance state and logs")


def disable_services(ctx: FixContext) -> None:
    report = ctx.report("services")
    names = ctx.spec.fix.remove_services
    if not names:
        report.status = "skipped"
        return
    for argv, description in fixes.service_commands(ctx.layout, ctx.spec.fix):
        result = chroot_run(ctx.root, list(argv), check=False, timeout=300)
        report.commands.append(" ".join(argv))
        if result.returncode == 0:
            if description:
                report.changed(description)
        else:
            report.warnings.append(f"{' '.join(argv)} exited {result.returncode} (ignored): "
                                   f"{(result.stdout + result.stderr).strip()[-200:]}")


def regenerate_initrd(ctx: FixContext) -> None:
    report = ctx.report("initrd")
    kernel = ctx.edits.kernel
    inputs = _initrd_inputs(ctx, kernel)
    record = _read_record(ctx.root)
    if record.get("initrd", {}).get("inputs") == inputs and _initrd_drivers(ctx, kernel, quiet=True) == []:
        report.changes.append(f"initrd for {kernel} already regenerated by p2v with these inputs")
        return
    for argv in fixes.initrd_commands(ctx.layout, kernel):
        # SOURCE_DATE_EPOCH: same inputs, same initrd bytes, where the tool honours it.
        ctx.chroot("initrd", argv, timeout=1800, env={"SOURCE_DATE_EPOCH": "0"})
    missing = _initrd_drivers(ctx, kernel, quiet=False)
    if missing:
        raise P2VError(f"the new initrd for {kernel} lacks {', '.join(missing)}",
                       hint="the kernel's modules may be missing from /lib/modules; see the fix log")
    _write_record(ctx.root, {**record, "initrd": {"kernel": kernel, "inputs": inputs}})
    report.changed(f"regenerated the initrd of {kernel} without host-only, with {' '.join(VIRTIO_DRIVERS)}")


def _initrd_inputs(ctx: FixContext, kernel: str) -> str:
    """A digest of what the initrd is made from: the configs we edit and the command."""
    digest = hashlib.sha256()
    for argv in fixes.initrd_commands(ctx.layout, kernel):
        digest.update(" ".join(argv).encode() + b"\n")
    for path in ("/etc/fstab", "/etc/initramfs-tools/modules", "/etc/initramfs-tools/initramfs.conf",
                 "/etc/initramfs-tools/conf.d/resume", "/etc/dracut.conf", "/etc/crypttab"):
        digest.update(path.encode() + b"\0" + (read_text_in_root(ctx.root, path) or "").encode() + b"\0")
    for directory in ("/etc/dracut.conf.d", "/etc/initramfs-tools/conf.d"):
        for name in sorted(RootTreeReader(ctx.root).listdir(directory)):
            path = f"{directory}/{name}"
            digest.update(path.encode() + b"\0" + (read_text_in_root(ctx.root, path) or "").encode() + b"\0")
    modules = resolve_in_root(ctx.root, f"/lib/modules/{kernel}/modules.dep")
    if modules.is_file():
        digest.update(hashlib.sha256(modules.read_bytes()).digest())
    return digest.hexdigest()


def _initrd_drivers(ctx: FixContext, kernel: str, *, quiet: bool) -> list[str]:
    """The virtio drivers missing from the kernel's initrd (built in counts as present)."""
    argv = fixes.initrd_check_command(ctx.layout, kernel)
    result = chroot_run(ctx.root, argv, check=not quiet, timeout=600)
    if quiet and result.returncode != 0:
        return list(VIRTIO_DRIVERS)
    if not quiet:
        ctx.report("initrd").commands.append(" ".join(argv))
    listing = result.stdout
    # Built-in drivers have no module file to list; the planner leaves them out.
    return [name for name in fixes.expected_initrd_drivers(ctx.layout, kernel)
            if not re.search(rf"/{name}\.ko(\.[gx]z|\.zst)?$", listing, re.MULTILINE)]


def install_bootloader(ctx: FixContext) -> None:
    report = ctx.report("bootloader-install")
    disk = ctx.target.loop.path
    bootloader = ctx.layout["system"]["bootloader"]
    efi = fixes.efi_loader(fixes.describe(ctx.layout), ctx.plan) if ctx.plan.firmware == "uefi" else None
    if efi is not None and not ctx.tree.exists(fixes.EFI_MODULES):
        raise P2VError(f"the server has no grub modules for UEFI ({fixes.EFI_MODULES}), so no EFI loader can be "
                       "built for the image", hint="install grub-efi-amd64-bin (Debian) or grub2-efi-x64-modules "
                       "(RHEL) on the server, then convert again")
    with _grub2_device_map(ctx, disk):
        for command in fixes.bootloader_install_commands(ctx.layout, ctx.plan, disk):
            ctx.chroot("bootloader-install", command.argv, input=command.input, timeout=600)
        for argv in fixes.bootloader_config_commands(ctx.layout):
            ctx.chroot("bootloader-install", argv, timeout=600)
    _pin_grub_root(ctx)
    regenerated = f"; {bootloader['config_path']} regenerated" if bootloader.get("config_path") else ""
    if ctx.plan.firmware == "bios":
        report.changed(f"{bootloader.get('kind')} installed to the image's MBR{regenerated}")
    elif efi is None:
        report.changed(f"the ESP's boot chain and fallback loader kept as they were{regenerated}")
    else:
        images = {hashlib.sha256(resolve_in_root(ctx.root, path).read_bytes()).hexdigest() for path in efi.written}
        if len(images) != 1:
            raise P2VError(f"the EFI loaders {', '.join(efi.written)} are not the one image just built")
        report.changed(efi.why + regenerated)


@contextlib.contextmanager
def esp_working_copies(plan: DiskPlan, target: MountedTarget, scratch: Path) -> Iterator[None]:
    """Each ESP as a writable view in the target tree; written back by mtools when the steps succeed."""
    with contextlib.ExitStack() as stack:
        for fs in plan.filesystems:
            if fs.fstype == "vfat":
                node = target.loop.partition(plan.partition_of(fs.mountpoint).number)
                stack.enter_context(esp.esp_working_copy(node, resolve_in_root(target.root, fs.mountpoint), scratch))
        yield


@contextlib.contextmanager
def _grub2_device_map(ctx: FixContext, disk: str) -> Iterator[None]:
    """grub2's probes then write hd0 hints, not loop ones; the map is ours and goes away again."""
    bootloader = ctx.layout["system"]["bootloader"]
    config_path = bootloader.get("config_path")
    if bootloader.get("kind") != "grub2" or not config_path:
        yield
        return
    device_map = f"{os.path.dirname(config_path)}/device.map"
    if ctx.tree.exists(device_map):
        yield
        return
    write_text_in_root(ctx.root, device_map, f"(hd0) {disk}\n")
    try:
        yield
    finally:
        remove_in_root(ctx.root, device_map)


_LINUX_ROOT = re.compile(r"(^\s*linux(?:16)?\s+\S+.*?\s)root=\S+", re.MULTILINE)


def _pin_grub_root(ctx: FixContext) -> None:
    """grub-mkconfig in a chroot without udev names the loop partition as root=: use the UUID."""
    config_path = ctx.layout["system"]["bootloader"].get("config_path")
    if not config_path:
        return
    text = read_text_in_root(ctx.root, config_path)
    if text is None:
        raise P2VError(f"the bootloader config {config_path} is missing after the install step")
    root_spec = f"UUID={ctx.plan.filesystem('/').uuid}"
    pinned = _LINUX_ROOT.sub(lambda m: f"{m.group(1)}root={root_spec}", text)
    leftovers = [line.strip() for line in pinned.splitlines() if "/dev/loop" in line]
    if leftovers:
        raise P2VError(f"{config_path} still names this machine's loop devices: {leftovers[:3]}")
    if pinned != text:
        write_text_in_root(ctx.root, config_path, pinned)


def _read_record(root: Path) -> dict[str, Any]:
    text = read_text_in_root(root, CONVERSION_RECORD)
    try:
        data = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(root: Path, record: Mapping[str, Any]) -> None:
    resolve_in_root(root, os.path.dirname(CONVERSION_RECORD)).mkdir(parents=True, exist_ok=True)
    write_text_in_root(root, CONVERSION_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o644)


# ---------------------------------------------------------------- the stage


def _steps() -> list[tuple[str, Callable[[FixContext], None]]]:
    edit_steps = [(name, functools.partial(apply_edits, step=name)) for name in EDIT_STEPS]
    return [*edit_steps, ("packages", install_packages), ("cloud-init-clean", clean_cloud_init),
            ("services", disable_services), ("initrd", regenerate_initrd), ("bootloader-install", install_bootloader)]


def fix_tree(spec: Spec, layout: Mapping[str, Any], plan: DiskPlan, target: MountedTarget) -> FixContext:
    """Run every step on a mounted target (binds in place); return what each did."""
    edits = fixes.plan_edits(RootTreeReader(target.root), layout, plan, spec.fix)
    ctx = FixContext(spec=spec, layout=layout, plan=plan, target=target, edits=edits)
    for finding in edits.findings:
        ctx.report(finding.step).warnings.append(finding.message)
    unknown = sorted(set(spec.fix.skip) - set(STEP_NAMES))
    if unknown:
        raise P2VError(f"{spec.file}: fix.skip: unknown step(s) {', '.join(unknown)}",
                       hint=f"steps are: {', '.join(STEP_NAMES)}")
    for name, step in _steps():
        report = ctx.report(name)
        if name in spec.fix.skip:
            report.status = "skipped"
            report.warnings.append("skipped by the spec (fix.skip)")
            log.warning("fix step %s skipped by the spec", name)
            continue
        started = time.monotonic()
        step(ctx)
        log.info("fix %-18s %-9s %4.1f s%s", name, report.status, time.monotonic() - started,
                 "".join(f"\n    {change}" for change in report.changes))
        for warning in report.warnings:
            log.warning("fix %s: %s", name, warning)
    record = _read_record(target.root)
    summary = {"kernel": edits.kernel, "kernel_cmdline": list(edits.kernel_cmdline), "host": spec.host}
    if {k: record.get(k) for k in summary} != summary:
        _write_record(target.root, {**record, **summary})
    return ctx


def fix_host(run: StageRun) -> None:
    spec = run.spec
    layout = read_layout(run.input(LAYOUT_FILE))
    plan = read_disk_plan(run.input(PLAN_FILE))
    image = spec.artifact("disk.img")
    # Fatal before anything is written: no kernel that can boot on virtio.
    kernel = fixes.choose_kernel(layout)
    log.info("kernel %s (it has virtio)", kernel)
    started = time.monotonic()
    with mounted_target(image, plan, run_dir=spec.run_dir, direct_io=supports_direct_io(image.parent)) as target, \
            esp_working_copies(plan, target, spec.run_dir), chroot_binds(target.root):
        ctx = fix_tree(spec, layout, plan, target)
    stamp = {
        "format": STAMP_FORMAT,
        "version": STAMP_VERSION,
        "host": spec.host,
        "seconds": round(time.monotonic() - started, 1),
        "kernel": ctx.edits.kernel,
        "kernel_cmdline": list(ctx.edits.kernel_cmdline),
        "installed_packages": ctx.installed_packages,
        "steps": [ctx.report(name).to_json() for name in STEP_NAMES],
        "warnings": [f"{r.name}: {w}" for name in STEP_NAMES for r in [ctx.report(name)] for w in r.warnings],
        "sync_receipt_sha256": hashlib.sha256(run.input(SYNC_STAMP).read_bytes()).hexdigest(),
    }
    run.partial.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


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
)
