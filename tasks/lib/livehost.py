"""What the live system knows about the server it booted on: its kernel command
line, its disks, and which of them the spec means.

Pure functions over text and `lsblk --json` output, so that the live runner
(live/runner.py) decides nothing it cannot be tested on here.

Disk names in a spec (`source.disks`) must survive device renaming between
boots (sda and sdb swap when a controller probes in another order), because a
second PXE boot resumes the conversion and doit's state names disk1, disk2:
- `auto`: every non-removable local disk, the one with boot code first, then
  by WWN, serial and name;
- `/dev/disk/by-id/<name>`, `serial:<serial>`, `wwn:<wwn>`: exactly that disk.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.lib.runner import P2VError

# Kernel names of block devices that are never a server's own disk in the live system.
NOT_LOCAL = ("loop", "ram", "zram", "sr", "nbd", "fd", "dm-", "md")


# The runner's mounts of the work area before it refuses (site.yaml `work_area_tries`): 10 s apart and
# each given up to 60 s, about 4 minutes for an NFS server that is restarting.
WORK_AREA_TRIES = 6


@dataclass(frozen=True)
class LiveArgs:
    """The p2v.* arguments `doit pxe` puts on the live system's kernel command line."""

    host: str
    work_server: str
    work_path: str
    debug: bool = False
    work_tries: int = WORK_AREA_TRIES  # mounts of the work area before the runner refuses


def parse_cmdline(text: str) -> LiveArgs:
    values: dict[str, str] = {}
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        if key.startswith("p2v."):
            values[key.removeprefix("p2v.")] = value
    missing = [f"p2v.{key}" for key in ("host", "work") if not values.get(key)]
    if missing:
        raise P2VError(f"the kernel command line lacks {', '.join(missing)}",
                       hint="this server was not booted from `doit pxe`'s files; render them again")
    server, sep, path = values["work"].partition(":")
    if not sep or not path.startswith("/"):
        raise P2VError(f"p2v.work={values['work']} is not <server>:<absolute path>",
                       hint="render the boot files again with `doit pxe`")
    tries = values.get("work_tries", str(WORK_AREA_TRIES))
    if not tries.isdigit() or int(tries) < 1:
        raise P2VError(f"p2v.work_tries={tries} is not a whole number of tries (1 or more)",
                       hint="set work_area_tries in the site file, then render the boot files again with `doit pxe`")
    return LiveArgs(host=values["host"], work_server=server, work_path=path, debug=values.get("debug") == "1",
                    work_tries=int(tries))


def console_devices(active: str) -> list[str]:
    """The device nodes of the kernel's consoles, each once, from /sys/class/tty/console/active
    ("tty0 ttyS0"). /dev/console is only the last of them: writing there and to ttyS0 would
    print every line twice on the serial console and never on the screen's."""
    names = dict.fromkeys(active.split())
    return [f"/dev/{name}" for name in names] or ["/dev/console"]


@dataclass(frozen=True)
class LocalDisk:
    name: str  # sda
    path: str  # /dev/sda
    size: int
    serial: str
    wwn: str
    boots: bool  # boot code in its first sectors (GRUB or LILO), or an EFI system partition

    def describe(self) -> str:
        ids = ", ".join(f"{k} {v}" for k, v in (("serial", self.serial), ("wwn", self.wwn)) if v)
        return f"{self.path} ({self.size / (1 << 30):.1f} GiB{', ' + ids if ids else ''})"


def _normalise_wwn(text: str) -> str:
    return text.lower().removeprefix("0x")


def local_disks(lsblk: Mapping[str, Any], booting: Sequence[str]) -> list[LocalDisk]:
    """The server's own disks from `lsblk --json --bytes -o NAME,PATH,TYPE,RM,SIZE,SERIAL,WWN`,
    `auto`'s order: boot disk first, then by WWN, serial and name. `booting`: names of disks
    whose first sectors hold boot code or that carry an ESP."""
    disks = []
    for device in lsblk.get("blockdevices", []):
        name = str(device.get("name", ""))
        if device.get("type") != "disk" or name.startswith(NOT_LOCAL) or _flag(device.get("rm")):
            continue
        disks.append(LocalDisk(name=name, path=str(device.get("path") or f"/dev/{name}"),
                               size=int(device.get("size") or 0), serial=str(device.get("serial") or "").strip(),
                               wwn=_normalise_wwn(str(device.get("wwn") or "")), boots=name in booting))
    return sorted(disks, key=lambda d: (not d.boots, d.wwn or "~", d.serial or "~", d.name))


def _flag(value: Any) -> bool:
    return value in (True, 1, "1", "true")


def resolve_disks(wanted: Sequence[str], disks: Sequence[LocalDisk], by_id: Mapping[str, str]) -> list[str]:
    """Device nodes for the spec's `source.disks`, in the spec's order.

    `by_id`: /dev/disk/by-id/<name> -> the kernel name it points at (sda).
    """
    if not disks:
        raise P2VError("the live system sees no local disk on this server",
                       hint="check that the storage controller's driver is in the live system (dmesg)")
    if tuple(wanted) == ("auto",):
        return [d.path for d in disks]
    by_name = {d.name: d for d in disks}
    found: list[str] = []
    for index, item in enumerate(wanted):
        match: LocalDisk | None = None
        if item.startswith("/dev/disk/by-id/"):
            match = by_name.get(by_id.get(item.removeprefix("/dev/disk/by-id/"), ""))
        elif item.startswith("serial:"):
            match = next((d for d in disks if d.serial and d.serial == item.removeprefix("serial:")), None)
        elif item.startswith("wwn:"):
            match = next((d for d in disks if d.wwn and d.wwn == _normalise_wwn(item.removeprefix("wwn:"))), None)
        if match is None:
            seen = "; ".join(d.describe() for d in disks)
            raise P2VError(f"source.disks[{index}]: {item} matches no local disk of this server (it has: {seen})",
                           hint="correct the spec's source.disks, or use `auto`")
        if match.path in found:
            raise P2VError(f"source.disks[{index}]: {item} is {match.path}, which an earlier entry names too")
        found.append(match.path)
    return found
