"""The bootloader's configuration on the target: new root, resume, console, no LVM/md.

- grub2: /etc/default/grub (grub-mkconfig writes grub.cfg from it later),
  and on BLS systems (RHEL 8/9) every /boot/loader/entries/*.conf `options`
  line, /etc/kernel/cmdline (what kernel-install gives new kernels) and the
  grubenv `kernelopts` (RHEL 8's entries say `options $kernelopts`).
- grub legacy (CentOS 6): grub.conf/menu.lst itself, which nothing
  regenerates: kernel arguments, `root (hd0,N)` for the partition that holds
  /boot (or / when /boot is not separate), serial and terminal lines.
- UEFI: the ESP's stub grub.cfg finds /boot by UUID; it gets the new one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.lib.fixes.cmdline import CmdlineTarget, rewrite_args
from tasks.lib.fixes.model import Changes, TreeReader
from tasks.lib.formats.bls import edit_bls_entry, parse_bls_entry
from tasks.lib.formats.grub2 import expand_grub_vars, rewrite_efi_stub
from tasks.lib.formats.grub_defaults import mkconfig_args, parse_grub_defaults, set_grub_default
from tasks.lib.formats.grub_legacy import edit_grub_legacy, legacy_cmdline
from tasks.lib.formats.grubenv import GrubenvFull, parse_grubenv, set_grubenv_value
from tasks.lib.planning.model import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.source.model import Bootloader

__all__ = ["legacy_cmdline", "rewrite_efi_stub"]  # their old home

STEP = "bootloader-config"
DEFAULT_GRUB = "/etc/default/grub"
BLS_DIR = "/boot/loader/entries"
KERNEL_CMDLINE = "/etc/kernel/cmdline"
GRUB_SERIAL_COMMAND = "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1"
LEGACY_SERIAL = "serial --unit=0 --speed=115200"
LEGACY_TERMINAL = "terminal --timeout=5 serial console"
LOOP_DEVICE = re.compile(r"/dev/(?:mapper/)?loop\d+|\bloop\d+p\d+")


def cmdline_target(plan: DiskPlan, pin_ifnames: bool) -> CmdlineTarget:
    root = plan.filesystem("/")
    swap = next((p.swap for p in plan.partitions if p.swap is not None), None)
    return CmdlineTarget(
        root=f"UUID={root.uuid}",
        root_fstype=root.fstype,
        # A swap file would need resume_offset, which only exists once the file does: no resume.
        resume=f"UUID={swap.uuid}" if swap is not None and swap.uuid else None,
        pin_ifnames=pin_ifnames,
    )


def boot_moves_into_root(layout: Mapping[str, Any], plan: DiskPlan) -> bool:
    """The source's /boot is a filesystem of its own and the target's is part of /."""
    source = any(m["mountpoint"] == "/boot" for m in layout["mounts"])
    return source and all(fs.mountpoint != "/boot" for fs in plan.filesystems)


def _boot_path(path: str, moved: bool) -> str:
    """A kernel or initrd path as the bootloader reads it, relative to the filesystem that holds /boot."""
    return f"/boot{path}" if moved and path.startswith("/") and not path.startswith("/boot/") else path


# ---------------------------------------------------------------- grub2


def _serial_unit(command: str) -> int:
    found = re.search(r"--unit=(\d+)", command)
    return int(found.group(1)) if found else 0


def rewrite_default_grub(text: str, target: CmdlineTarget) -> str:
    values = parse_grub_defaults(text)
    new = set_grub_default(text, "GRUB_CMDLINE_LINUX", " ".join(
        rewrite_args(values.get("GRUB_CMDLINE_LINUX", "").split(), target, primary=True, set_root=False)))
    if "GRUB_CMDLINE_LINUX_DEFAULT" in values:
        new = set_grub_default(new, "GRUB_CMDLINE_LINUX_DEFAULT", " ".join(
            rewrite_args(values["GRUB_CMDLINE_LINUX_DEFAULT"].split(), target, primary=False, set_root=False)))
    # GRUB_TERMINAL overrides GRUB_TERMINAL_INPUT/OUTPUT in grub-mkconfig.
    if not {"console", "serial"} <= set(values.get("GRUB_TERMINAL", "").split()):
        new = set_grub_default(new, "GRUB_TERMINAL", "console serial")
    if "GRUB_SERIAL_COMMAND" not in values or _serial_unit(values["GRUB_SERIAL_COMMAND"]) != 0:
        new = set_grub_default(new, "GRUB_SERIAL_COMMAND", GRUB_SERIAL_COMMAND)
    if values.get("GRUB_DISABLE_LINUX_UUID") == "true":
        new = set_grub_default(new, "GRUB_DISABLE_LINUX_UUID", "false")
    return new


def mkconfig_cmdline(default_grub: str, target: CmdlineTarget) -> tuple[str, ...]:
    """The arguments grub-mkconfig's 10_linux gives the normal entries."""
    return (f"root={target.root}", "ro", *mkconfig_args(default_grub))


def rewrite_bls_entry(text: str, target: CmdlineTarget, boot_moved: bool,
                      inline_kernelopts: tuple[str, ...] | None = None) -> str:
    """`inline_kernelopts`: grubenv's kernelopts, to write in place of `$kernelopts`
    where grubenv cannot hold the new value (see GrubenvOverflow)."""
    def options(words: list[str]) -> tuple[str, ...]:
        if inline_kernelopts is not None and "$kernelopts" in words:
            at = words.index("$kernelopts")
            words[at:at + 1] = inline_kernelopts
        from_env = "$kernelopts" in words  # RHEL 8: the arguments live in grubenv
        return rewrite_args(words, target, primary=not from_env, set_root=not from_env)

    return edit_bls_entry(text, options, (lambda path: _boot_path(path, boot_moved)) if boot_moved else None)


class GrubenvOverflow(Exception):
    """The rewritten grubenv does not fit the block grub rewrites in place."""

    def __init__(self, needed: int, size: int, kernelopts: tuple[str, ...]):
        super().__init__(f"{needed} bytes needed, {size} available")
        self.needed = needed
        self.size = size
        self.kernelopts = kernelopts  # the value as the source had it


def rewrite_grubenv(text: str, target: CmdlineTarget) -> str | None:
    """grubenv with `kernelopts` rewritten, padded to its block size; None when it has none.

    grubenv is a fixed-size block (1024 bytes) that grub itself rewrites in
    place: the new text must keep that size exactly. GrubenvOverflow when it
    cannot: the caller must not leave the old kernelopts in use silently.
    """
    values = parse_grubenv(text)
    if "kernelopts" not in values:
        return None
    args = rewrite_args(values["kernelopts"].split(), target, primary=True, set_root=True)
    try:
        return set_grubenv_value(text, "kernelopts", " ".join(args))
    except GrubenvFull as full:
        raise GrubenvOverflow(full.needed, full.size, tuple(values["kernelopts"].split())) from full


def _efi_stubs(bootloader: Bootloader) -> list[str]:
    return [p for p in bootloader.configs if p.startswith("/boot/efi/") and p.endswith(".cfg")
            and p != bootloader.config_path]


def uuid_map(layout: Mapping[str, Any], plan: DiskPlan) -> dict[str, str]:
    """Source filesystem UUID -> the UUID of the target filesystem that now holds its files."""
    source = {fs["device"]: fs.get("uuid", "") for fs in layout["filesystems"]}
    mapping = {}
    for copy in plan.copies:
        old = source.get(copy.source_device, "")
        new = plan.filesystem(copy.target_mountpoint).uuid
        if old and new and old != new:
            mapping[old] = new
    return mapping


def _fix_grub2(changes: Changes, tree: TreeReader, boot: Bootloader, target: CmdlineTarget, kernel: str,
               boot_moved: bool) -> tuple[str, ...]:
    defaults_file = boot.defaults_file or DEFAULT_GRUB
    text = tree.read(defaults_file)
    default_grub = ""
    if text is None:
        changes.note(f"{defaults_file} is missing: grub-mkconfig will use its own defaults (no serial console)")
    else:
        default_grub = rewrite_default_grub(text, target)
        changes.write(defaults_file, default_grub, "new root/resume, no LVM/md arguments, serial console")
    cmdline = mkconfig_cmdline(default_grub, target)
    if not boot.bls:
        return cmdline
    env: dict[str, str] = {}
    inline: tuple[str, ...] | None = None
    if boot.grubenv_file:
        grubenv = tree.read(boot.grubenv_file)
        if grubenv is not None:
            try:
                new_env = rewrite_grubenv(grubenv, target)
            except GrubenvOverflow as overflow:
                # The old kernelopts would still boot the old root: the entries
                # carry the arguments themselves, and the receipt says so.
                new_env = None
                inline = overflow.kernelopts
                changes.note(f"{boot.grubenv_file}: the new kernelopts do not fit its {overflow.size}-byte block "
                             f"({overflow.needed} bytes needed); grubenv keeps the old value, and the BLS entries "
                             "carry the new arguments in place of $kernelopts")
            if new_env is not None:
                changes.write(boot.grubenv_file, new_env, "kernelopts: the same arguments as the BLS entries")
                grubenv = new_env
            env = parse_grubenv(grubenv)
    for name in tree.listdir(BLS_DIR):
        if not name.endswith(".conf"):
            continue
        path = f"{BLS_DIR}/{name}"
        entry = tree.read(path)
        if entry is None:
            continue
        new = rewrite_bls_entry(entry, target, boot_moved, inline)
        changes.write(path, new, "BLS entry options: new root/resume, no LVM/md arguments, serial console"
                      + ("; the arguments written in place of $kernelopts" if inline and "$kernelopts" in entry
                         else ""))
        values = parse_bls_entry(new)
        if values.get("version", [""])[0] == kernel or values.get("linux", [""])[0].endswith(f"vmlinuz-{kernel}"):
            cmdline = expand_grub_vars(values.get("options", []), env)
    kernel_cmdline = tree.read(KERNEL_CMDLINE)
    if kernel_cmdline is not None:
        args = rewrite_args(kernel_cmdline.split(), target, primary=True, set_root=True)
        changes.write(KERNEL_CMDLINE, " ".join(args) + "\n", "the arguments kernel-install gives new kernels")
    return cmdline


# ---------------------------------------------------------------- grub legacy


def grub_legacy_partition(plan: DiskPlan) -> int:
    """grub legacy's partition index (0-based) of the filesystem that holds /boot."""
    holder = "/boot" if any(fs.mountpoint == "/boot" for fs in plan.filesystems) else "/"
    return plan.partition_of(holder).number - 1


def rewrite_grub_legacy(text: str, target: CmdlineTarget, partition: int, boot_moved: bool) -> str:
    return edit_grub_legacy(
        text,
        serial=LEGACY_SERIAL,
        terminal=LEGACY_TERMINAL,
        partition=partition,
        kernel_args=lambda args: rewrite_args(args, target, primary=True, set_root=True),
        boot_path=lambda path: _boot_path(path, boot_moved),
    )


# ---------------------------------------------------------------- the step


def fix_bootloader_config(tree: TreeReader, layout: Mapping[str, Any], boot: Bootloader, plan: DiskPlan,
                          target: CmdlineTarget, kernel: str) -> tuple[Changes, tuple[str, ...]]:
    """(the edits, the chosen kernel's final arguments)."""
    changes = Changes(tree, STEP)
    moved = boot_moves_into_root(layout, plan)
    cmdline: Sequence[str] = ()
    if boot.kind == "grub2":
        cmdline = _fix_grub2(changes, tree, boot, target, kernel, moved)
        uuids = uuid_map(layout, plan)
        for stub in _efi_stubs(boot):
            text = tree.read(stub)
            if text is not None:
                changes.write(stub, rewrite_efi_stub(text, uuids, moved), "the ESP's grub.cfg finds the new /boot")
    elif boot.kind == "grub-legacy" and boot.config_path:
        text = tree.read(boot.config_path)
        if text is None:
            changes.note(f"{boot.config_path} is missing on the target")
        else:
            new = rewrite_grub_legacy(text, target, grub_legacy_partition(plan), moved)
            changes.write(boot.config_path, new, "new root and (hd0,N), no LVM/md arguments, serial console")
            cmdline = legacy_cmdline(new, kernel)
    else:
        changes.note(f"bootloader {boot.kind}: its configuration is not rewritten")
    if boot.default_kernel is not None and boot.default_kernel != kernel:
        changes.note(f"the default boot entry starts kernel {boot.default_kernel}, not the chosen {kernel}")
    for edit in changes.edits:
        if edit.text is not None and LOOP_DEVICE.search(edit.text):
            raise P2VError(f"{edit.path} would name a loop device: {LOOP_DEVICE.search(edit.text)}",
                           hint="the source's kernel arguments name a loop device; fix them on the server")
    return changes, tuple(cmdline)
