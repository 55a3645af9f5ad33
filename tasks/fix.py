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

from tasks.lib import esp, fixes, inodeflags
from tasks.lib.debconf import CONFIG_DAT, question_value
from tasks.lib.fixes import EditPlan
from tasks.lib.outputs import FixStamp, StepReceipt, SyncStamp, load_sync_stamp, write_fix_stamp
from tasks.lib.packages import APT_SCRATCH, REPO_MOUNT, PackageSource, plan_install, write_apt_index
from tasks.lib.paths import RootTreeReader, read_text_in_root, remove_in_root, resolve_in_root, write_text_in_root
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.model import DiskPlan
from tasks.lib.resources import chroot_binds, mounted
from tasks.lib.runner import P2VError, chroot_run, run
from tasks.lib.spec import Spec
from tasks.lib.target import MountedTarget, loop_direct_io, mounted_target
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

log = logging.getLogger("p2v.fix")

STAMP_FORMAT = "p2v-fix-stamp"
STAMP_VERSION = 2  # 2: steps swap-file and inode-flags
SYNC_STAMP = "rootfs-synced.stamp"
VIRTIO_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_pci", "virtio_net")
# Inside the target: what p2v did, for the server's next administrator, and
# what lets a rerun see that the initrd is already current.
CONVERSION_RECORD = "/var/lib/p2v/conversion.json"
# The order steps run in; the spec's fix.skip may name any of them (for
# diagnosis: verify then shows what the step was for).
STEP_NAMES = ("fstab", "bootloader-config", "network", "cloud-init-config", "initrd-config", "selinux",
              "swap-file", "packages", "cloud-init-clean", "services", "initrd", "bootloader-install", "inode-flags")
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

    def to_json(self) -> StepReceipt:
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
    restored_flags: list[tuple[str, str]] = field(default_factory=list)  # (path, letters) set by inode-flags

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
            stack.enter_context(host_resolver(ctx.root))
        yield


@contextlib.contextmanager
def host_resolver(root: Path) -> Iterator[None]:
    """Name lookups in the chroot through this host's resolver, for the package step only.

    The server's own resolver is the old network's. Its /etc/resolv.conf is
    often a link into /run (systemd-resolved, resolvconf), which in the chroot
    is p2v's empty tmpfs: the link's target is made there, a throw-away file.
    A link into the image itself, or no file at all, gets a file for the
    duration that is removed again; the link itself is never changed.
    """
    host_text = Path("/etc/resolv.conf").read_text()
    link = root / "etc/resolv.conf"
    resolved = resolve_in_root(root, "/etc/resolv.conf")
    with contextlib.ExitStack() as stack:
        if resolved.is_file():
            stack.enter_context(mounted("/etc/resolv.conf", resolved, bind=True, options=["ro"]))
        else:
            # A link into /run lands in the chroot's tmpfs; anything else is on
            # the image, and removed again with the directories made for it.
            made = _make_missing_dirs(resolved.parent)
            resolved.write_text(host_text)
            stack.callback(_remove_made, resolved, made)
        log.debug("chroot resolver for the package step: %s (link %s)", resolved,
                  os.readlink(link) if link.is_symlink() else "none")
        yield


def _make_missing_dirs(directory: Path) -> list[Path]:
    made: list[Path] = []
    for parent in [*reversed(directory.parents), directory]:
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    return made


def _remove_made(file: Path, directories: Sequence[Path]) -> None:
    file.unlink(missing_ok=True)
    for directory in reversed(directories):
        with contextlib.suppress(OSError):
            directory.rmdir()


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


SWAP_SIGNATURE = b"SWAPSPACE2"  # mkswap's v1 header ends the first 4 KiB page with it (x86_64)
SWAP_PAGE = 4096


def is_swap_area(path: Path, size: int) -> bool:
    """Whether `path` is a regular file of `size` bytes with a swap signature (made by an earlier run)."""
    try:
        info = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path) or info.st_size != size:
            return False
        with open(path, "rb") as handle:
            handle.seek(SWAP_PAGE - len(SWAP_SIGNATURE))
            return handle.read(len(SWAP_SIGNATURE)) == SWAP_SIGNATURE
    except OSError:
        return False


def make_swap_file(ctx: FixContext) -> None:
    """The plan's swap file: written with zeros (swapon refuses holes, and older kernels the unwritten
    extents fallocate leaves on xfs), mode 0600, mkswap from the server's own util-linux; made under a
    temporary name and renamed, so that a killed run never leaves a half-made one at the planned path."""
    report = ctx.report("swap-file")
    planned = ctx.plan.swap_file
    if planned is None:
        report.status = "skipped"
        report.changes.append("no swap file in the plan")
        return
    size_mib = planned.size // (1 << 20)
    path = resolve_in_root(ctx.root, planned.path, follow_last=False)
    if os.path.lexists(path):
        if is_swap_area(path, planned.size):
            if os.lstat(path).st_mode & 0o777 != 0o600:
                os.chmod(path, 0o600)
                report.changed(f"{planned.path}: mode 0600")
            report.changes.append(f"{planned.path} is already the planned {size_mib} MiB swap area")
            return
        raise P2VError(f"{planned.path} exists on the target and is not the planned {size_mib} MiB swap file, "
                       "so the swap-file step would overwrite a file of the server",
                       hint=f"choose target.swap: partition (or none) in {ctx.spec.file}, or move that file on "
                            "the server")
    partial = path.with_name(f".{path.name}.p2v-partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    os.chmod(partial, 0o600)  # past the umask
    argv = ["dd", "if=/dev/zero", f"of={partial}", "bs=1M", f"count={size_mib}", "conv=notrunc,fsync",
            "status=none"]
    report.commands.append(" ".join(argv))
    run(argv, timeout=3600)
    ctx.chroot("swap-file", ["mkswap", "/" + str(partial.relative_to(ctx.root))], timeout=600)
    os.replace(partial, path)
    report.changed(f"made the swap file {planned.path}: {size_mib} MiB of zeros (not sparse), mode 0600, mkswap")


def target_devices(target: MountedTarget, plan: DiskPlan) -> frozenset[int]:
    """The st_dev of every target filesystem: flags are set there and nowhere else (not through a bind)."""
    return frozenset(os.stat(resolve_in_root(target.root, mp)).st_dev for mp in plan.mount_order)


def pending_flags(sync_stamp: SyncStamp) -> list[tuple[str, str]]:
    """(path, letters) the sync stage left for this stage to set: i and a."""
    return [(row["path"], row["flags"]) for row in sync_stamp["copy"]["inode_flags"]["pending"]]


def applied_flag_paths(root: Path) -> list[str]:
    rows = _read_record(root).get("inode_flags", {}).get("applied", [])
    return [row["path"] for row in rows if isinstance(row, dict) and isinstance(row.get("path"), str)]


def clear_deferred_flags(root: Path, paths: Sequence[str], devices: frozenset[int]) -> int:
    """Clear i and a (set by an earlier run) so that the steps can write; return how many were set."""
    cleared = 0
    for path in sorted(set(paths), key=os.fsencode, reverse=True):
        with inodeflags.open_entry(root, path, devices) as fd:
            if fd is None or not (inodeflags.get_raw(fd) or 0) & inodeflags.DEFERRED:
                continue
            inodeflags.apply_flags(fd, 0, inodeflags.DEFERRED)
            if (inodeflags.get_raw(fd) or 0) & inodeflags.DEFERRED:
                raise P2VError(f"cannot clear the immutable or append-only flag of {path} on the target")
            cleared += 1
    return cleared


def set_deferred_flags(root: Path, pending: Sequence[tuple[str, str]],
                       devices: frozenset[int]) -> list[tuple[str, str]]:
    """Set i and a where the source had them; read each back; return (path, letters) set.

    The paths go into the image's conversion record first, so that a later
    run (fix again, or sync into this image) knows what to unlock even if
    this one is killed halfway.
    """
    record = _read_record(root)
    applied = [{"path": path, "flags": flags} for path, flags in pending]
    if record.get("inode_flags", {}).get("applied") != applied:
        _write_record(root, {**record, "inode_flags": {"applied": applied}})
    done = []
    missing = []
    for path, flags in pending:
        want = inodeflags.bits_of(flags) & inodeflags.DEFERRED
        with inodeflags.open_entry(root, path, devices) as fd:
            if fd is None:
                missing.append(path)
                continue
            got, refused = inodeflags.apply_flags(fd, want, inodeflags.DEFERRED)
        if refused or got & want != want:
            why = "; ".join(sorted(set(refused.values()))) or "not there when read back"
            raise P2VError(f"could not make {path} {inodeflags.describe(want)} on the target: {why}")
        done.append((path, inodeflags.letters(got & inodeflags.DEFERRED)))
    if missing:
        raise P2VError(f"{len(missing)} entries the source had immutable or append-only are not on the target: "
                       f"{', '.join(missing[:5])}", hint="rerun sync:<host>; the copy was verified, so something "
                                                         "removed them since")
    return done


def restore_deferred_flags(ctx: FixContext, pending: Sequence[tuple[str, str]], devices: frozenset[int]) -> None:
    """The inode-flags step: i and a where the source had them, after every other step (set_deferred_flags)."""
    report = ctx.report("inode-flags")
    if not pending:
        report.changes.append("no immutable or append-only file or directory on the source")
        return
    ctx.restored_flags = set_deferred_flags(ctx.root, pending, devices)
    counts = {letter: sum(1 for _, flags in ctx.restored_flags if letter in flags) for letter in "ia"}
    listed = ", ".join(f"{path} ({flags})" for path, flags in ctx.restored_flags[:20])
    more = f" and {len(ctx.restored_flags) - 20} more" if len(ctx.restored_flags) > 20 else ""
    report.changed(f"set i (immutable) on {counts['i']} and a (append only) on {counts['a']} entries, as on the "
                   f"source, read back: {listed}{more}")


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
        with os_prober_hidden(ctx.root, report):
            for argv in fixes.bootloader_config_commands(ctx.layout):
                ctx.chroot("bootloader-install", argv, timeout=600, env={"GRUB_DISABLE_OS_PROBER": "true"})
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
    _point_grub_pc_at_virtio(ctx)


@contextlib.contextmanager
def os_prober_hidden(root: Path, report: StepReport) -> Iterator[None]:
    """grub-mkconfig without os-prober: in the chroot it would list the conversion
    host's own disks (bound /dev) as other systems to boot. The image's script is
    covered by a bind mount of a no-op for this run only, so the image keeps its
    own file, whatever its /etc/default/grub says about GRUB_DISABLE_OS_PROBER."""
    script = resolve_in_root(root, fixes.OS_PROBER_SCRIPT)
    if not script.is_file():
        yield
        return
    # In the chroot's /run: a tmpfs of this run, gone with it.
    stub = resolve_in_root(root, "/run/p2v-os-prober-off")
    stub.write_text("#!/bin/sh\n# p2v: no other systems on a converted server's menu\nexit 0\n")
    stub.chmod(0o755)
    report.commands.append(f"(hidden for grub-mkconfig: {fixes.OS_PROBER_SCRIPT})")
    with mounted(str(stub), script, bind=True, options=["ro"]):
        yield


def _point_grub_pc_at_virtio(ctx: FixContext) -> None:
    """grub-pc's debconf answer names the disks its upgrades install boot code to."""
    report = ctx.report("bootloader-install")
    command = fixes.debconf_install_device_command(ctx.layout, ctx.plan)
    if command is None or not _is_installed(ctx, "grub-pc"):
        return
    before = question_value(read_text_in_root(ctx.root, CONFIG_DAT) or "", fixes.GRUB_PC_INSTALL_DEVICES)
    if before == fixes.VIRTIO_BOOT_DISK:
        return
    ctx.chroot("bootloader-install", command.argv, input=command.input, timeout=120)
    after = question_value(read_text_in_root(ctx.root, CONFIG_DAT) or "", fixes.GRUB_PC_INSTALL_DEVICES)
    if after != fixes.VIRTIO_BOOT_DISK:
        raise P2VError(f"debconf {fixes.GRUB_PC_INSTALL_DEVICES} is {after!r} after debconf-set-selections, "
                       f"not {fixes.VIRTIO_BOOT_DISK}", hint=f"see {CONFIG_DAT} in the image and the fix log")
    report.changed(f"debconf {fixes.GRUB_PC_INSTALL_DEVICES}: {before or '(unset)'} -> {fixes.VIRTIO_BOOT_DISK} "
                   "(grub-pc upgrades install to the virtio disk)")


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
    return [*edit_steps, ("swap-file", make_swap_file), ("packages", install_packages),
            ("cloud-init-clean", clean_cloud_init),
            ("services", disable_services), ("initrd", regenerate_initrd), ("bootloader-install", install_bootloader)]


def fix_tree(spec: Spec, layout: Mapping[str, Any], plan: DiskPlan, target: MountedTarget) -> FixContext:
    """Run every step but inode-flags on a mounted target (binds in place); return what each did."""
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
    started = time.monotonic()
    with mounted_target(image, plan, run_dir=spec.run_dir, direct_io=loop_direct_io(image.parent)) as target:
        devices = target_devices(target, plan)
        cleared = clear_deferred_flags(target.root, [*applied_flag_paths(target.root), *(p for p, _ in pending)],
                                       devices)
        if cleared:
            log.info("cleared i/a on %d entries an earlier fix set; set again at the end", cleared)
        with esp_working_copies(plan, target, spec.run_dir), chroot_binds(target.root):
            ctx = fix_tree(spec, layout, plan, target)
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
        "sync_receipt_sha256": hashlib.sha256(run.input(SYNC_STAMP).read_bytes()).hexdigest(),
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
)
