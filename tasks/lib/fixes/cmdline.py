"""Kernel command line rewriting, the same for every place a bootloader keeps one.

The target disk has plain partitions only (p2v never recreates LVM, md or
LUKS), so every argument that asks the initrd to assemble or unlock one must
go: a stale `rd.lvm.lv` drops CentOS 7.4+ into an emergency shell waiting
for a volume group that no longer exists (dracut#283). Arguments that
*disable* assembly (`rd.lvm=0`, EL6's `rd_NO_LVM`) are true of the target
and stay.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SERIAL_CONSOLE = ("console=tty0", "console=ttyS0,115200n8")
IFNAMES_PIN = ("net.ifnames=0", "biosdevname=0")

# Activating LVM/md/LUKS/dmraid arguments, dracut (rd.*) and EL6 (rd_*) forms.
_STALE = re.compile(
    r"^(rd\.lvm\.\S+|rd\.md\.\S+|rd\.luks\.\S+|rd\.dm\.uuid=\S*"
    r"|rd_LVM_LV=\S*|rd_LVM_VG=\S*|rd_MD_UUID=\S*|rd_LUKS_UUID=\S*|rd_DM_UUID=\S*)$"
)
# Consoles p2v replaces with its own pair: the physical server's serial line
# (IPMI SOL on ttyS1, other speeds) means nothing on KVM, whose is ttyS0.
_REPLACED_CONSOLE = re.compile(r"^console=(ttyS\d+\S*|tty0)$")


@dataclass(frozen=True)
class CmdlineTarget:
    """What the target's kernel arguments must say."""

    root: str  # "UUID=..." of the target root filesystem
    root_fstype: str
    resume: str | None  # "UUID=..." of the target swap partition; None: no resume= at all
    pin_ifnames: bool  # add net.ifnames=0 biosdevname=0 (kernel-style NIC names stay eth0..)


def key(arg: str) -> str:
    return arg.split("=", 1)[0]


def is_stale(arg: str) -> bool:
    return bool(_STALE.match(arg))


def _replace_value(args: list[str], name: str, value: str | None, *, add: bool) -> list[str]:
    """Every `name=...` replaced by `name=value` (the first kept in place), or dropped when value is None."""
    out: list[str] = []
    placed = False
    for arg in args:
        if key(arg) == name:
            if value is not None and not placed:
                out.append(f"{name}={value}")
                placed = True
            continue
        out.append(arg)
    if add and value is not None and not placed:
        out.insert(0, f"{name}={value}")
    return out


def _pin(args: list[str], wanted: str) -> list[str]:
    name = key(wanted)
    if any(key(a) == name for a in args):
        return [wanted if key(a) == name else a for a in args]
    return [*args, wanted]


def rewrite_args(args: Sequence[str], target: CmdlineTarget, *, primary: bool, set_root: bool) -> tuple[str, ...]:
    """The kernel arguments for the target.

    `primary`: this is the line p2v adds to (console, name pinning); a
    secondary line (GRUB_CMDLINE_LINUX_DEFAULT) only loses stale arguments.
    `set_root`: this line must carry root= (a BLS entry, a grub legacy kernel
    line); otherwise an existing root= is replaced but none is added
    (grub-mkconfig writes its own).
    """
    out = [a for a in args if not is_stale(a)]
    out = _replace_value(out, "root", target.root, add=set_root)
    if any(key(a) == "rootfstype" for a in out):
        out = _replace_value(out, "rootfstype", target.root_fstype, add=False)
    had_resume = any(key(a) == "resume" for a in out)
    out = _replace_value(out, "resume", target.resume, add=False)
    if had_resume and target.resume is None:
        out = [a for a in out if key(a) != "resume_offset"]
    # The primary line carries the serial console, once; a secondary one loses its copies.
    out = [a for a in out if not _REPLACED_CONSOLE.match(a)]
    if primary:
        if target.pin_ifnames:
            for wanted in IFNAMES_PIN:
                out = _pin(out, wanted)
        out += SERIAL_CONSOLE  # last: the last console= becomes /dev/console
    return tuple(out)
