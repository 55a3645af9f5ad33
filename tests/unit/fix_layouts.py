"""Layouts and completed disk plans for the fix planner's tests.

- Synthetic trees (tests/fixtures/synthetic.py) have a system description
  but no disks: `synthetic_layout` makes up the disk side of layout.json
  from the tree's fstab, the way inspect would record it (an LVM or md
  device for /dev/mapper names, partitions otherwise).
- Recorded layouts (tests/unit/data/layouts) have no tree: `fixture_tree`
  writes the files the fix planner reads, with the text the fixture builder
  (tests/fixtures/system.py) wrote into the real server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.inspect import swap_file_size
from tasks.lib.fstab import parse_fstab, skip_reason, source_kind
from tasks.lib.paths import read_text_in_root
from tasks.lib.plan import DiskPlan, plan_disk
from tasks.lib.spec import FixPolicy, GlancePolicy, Source, Spec, TargetPolicy
from tasks.lib.system import describe_system
from tests.fixtures import system as fixture_system
from tests.fixtures.description import load_description
from tests.fixtures.synthetic import write_tree

GiB = 1 << 30
EXT4_FEATURES = ["dir_index", "dir_nlink", "ext_attr", "extent", "extra_isize", "filetype", "flex_bg", "has_journal",
                 "huge_file", "large_file", "resize_inode", "sparse_super", "uninit_bg"]
XFS_FEATURES = {"attr": 2, "bigtime": 0, "crc": 1, "data.bsize": 4096, "finobt": 1, "ftype": 1, "inobtcount": 0,
                "isize": 512, "log.bsize": 4096, "naming.bsize": 4096, "nrext64": 0, "projid32bit": 1,
                "reflink": 1, "rmapbt": 0, "sparse": 1}


def _device(spec: str, number: int) -> str:
    _, value = source_kind(spec)
    if value.startswith("/dev/mapper/"):
        vg, _, lv = value.removeprefix("/dev/mapper/").replace("--", "\0").partition("-")
        return f"lv:{vg.replace(chr(0), '-')}/{lv.replace(chr(0), '-')}"
    if "dm-uuid-LVM" in value:
        return "lv:ubuntu-vg/ubuntu-lv"
    return f"disk1p{number}"


def _uuid(number: int) -> str:
    return f"00000000-0000-4000-8000-{number:012d}"


def synthetic_layout(name: str, root: Path) -> dict[str, Any]:
    """Write the synthetic tree `name` into `root`, and return its layout.json as a dict."""
    write_tree(name, root)
    return tree_layout(name, root)


def tree_layout(host: str, root: Path) -> dict[str, Any]:
    """The layout.json inspect would record for the tree at `root` (its disk side made up)."""
    system = describe_system(root)
    entries, _ = parse_fstab(read_text_in_root(root, "/etc/fstab") or "")
    filesystems: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    fstab: list[dict[str, Any]] = []
    swaps: list[dict[str, Any]] = []
    lvs: list[dict[str, Any]] = []
    for number, entry in enumerate(entries, start=1):
        record: dict[str, Any] = entry.to_json()
        fstab.append(record)
        reason = skip_reason(entry)
        if reason:
            record.update(status="skipped", reason=reason)
            continue
        if entry.is_swap and not entry.spec.startswith(("/dev/", "UUID=", "LABEL=")):
            size, missing = swap_file_size(root, entry.spec)  # as inspect records it
            record.update(status="swapfile", size=size, **({"reason": missing} if missing else {}))
            continue
        device = _device(entry.spec, number)
        record["device"] = device
        if device.startswith("lv:"):
            lvs.append({"device": device, "name": device.split("/")[-1], "vg": device[3:].split("/")[0]})
        if entry.is_swap:
            record["status"] = "swap"
            swaps.append({"device": device, "in_fstab": True, "label": "", "size": GiB, "uuid": _uuid(900 + number)})
            continue
        record["status"] = "mounted"
        source_kind_, value = source_kind(entry.spec)
        fs: dict[str, Any] = {"device": device, "type": entry.vfstype, "mountpoint": entry.file, "label": "",
                              "uuid": value if source_kind_ == "uuid" else _uuid(number),
                              "size": 8 * GiB, "used_bytes": GiB, "used_inodes": 20000, "needs_recovery": False}
        if entry.vfstype == "xfs":
            fs["features"] = dict(XFS_FEATURES)
        elif entry.vfstype.startswith("ext"):
            fs.update(features=list(EXT4_FEATURES), block_size=4096, inode_size=256)
        filesystems.append(fs)
        mounts.append({"device": device, "fstab_line": entry.line, "fstype": entry.vfstype,
                       "mountpoint": entry.file, "options": list(entry.options)})
    root_device = next(m["device"] for m in mounts if m["mountpoint"] == "/")
    return {
        "format": "p2v-layout", "version": 2, "host": host,
        "boot": {"bootloader": system.bootloader.kind, "firmware": system.bootloader.firmware},
        "filesystems": filesystems, "mounts": mounts, "fstab": fstab, "swaps": swaps,
        "lvm": {"lvs": lvs, "pvs": [], "vgs": []}, "md": [], "root": root_device,
        "system": system.to_json(),
    }


_DEBIAN_DEFAULT_GRUB = (
    "# If you change this file, run 'update-grub' afterwards to update\n"
    "# /boot/grub/grub.cfg.\n"
    "# For full documentation of the options in this file, see:\n"
    "#   info -f grub -n 'Simple configuration'\n"
    "\n"
    "GRUB_DEFAULT=0\n"
    "GRUB_TIMEOUT=5\n"
    "GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n"
    'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
    'GRUB_CMDLINE_LINUX=""\n'
)
_DEBIAN_INITRAMFS_MODULES = (
    "# List of modules that you want to include in your initramfs.\n"
    "# They will be loaded at boot time in the order below.\n"
    "#\n"
    "# Syntax:  module_name [args ...]\n"
    "#\n"
    "# You must run update-initramfs(8) to effect this change.\n"
    "#\n"
    "# Examples:\n"
    "#\n"
    "# raid1\n"
    "# sd_mod\n"
)


def fixture_tree(name: str, layout: dict[str, Any], root: Path) -> None:
    """The files of the fixture server `name` (whose recorded layout is `layout`), as its builder wrote them."""
    desc = load_description(name)

    def write(path: str, text: str) -> None:
        fixture_system.write(root, path, text)

    entries = [fixture_system.FstabEntry(e["spec"], e["file"], e["vfstype"], ",".join(e["options"]), e["passno"])
               for e in sorted(layout["fstab"], key=lambda e: e["line"])]
    write("/etc/fstab", fixture_system.fstab_text(entries))
    write("/etc/default/grub", fixture_system.set_shell_variables(_DEBIAN_DEFAULT_GRUB,
                                                                  fixture_system.grub_defaults(desc)))
    fixture_system.configure_network(root, desc)
    write("/usr/lib/systemd/systemd", "")
    if desc.initramfs == "initramfs-tools":
        write("/etc/initramfs-tools/modules", _DEBIAN_INITRAMFS_MODULES)
        swap = next((e for e in entries if e.fstype == "swap"), None)
        write("/etc/initramfs-tools/conf.d/resume", f"RESUME={swap.source if swap else 'none'}\n")
    else:
        write("/etc/dracut.conf.d/10-p2v-fixture.conf",
              'hostonly="no"\nhostonly_cmdline="no"\nadd_dracutmodules+=" lvm "\n')


def make_spec(host: str, **target: Any) -> Spec:
    return Spec(host=host, path=Path(f"/nonexistent/specs/{host}.yaml"), file=f"specs/{host}.yaml",
                source=Source(images=(Path("/nonexistent/disk1.img"),)), workdir=Path("/nonexistent/work"),
                target=TargetPolicy(**target), fix=FixPolicy(), glance=GlancePolicy())


def completed_plan(layout: dict[str, Any], /, **target: Any) -> DiskPlan:
    """plan_disk for the layout, with UUIDs as mkfs would report them (deterministic: 1111..., 2222...)."""
    draft = plan_disk(layout, make_spec(layout["host"], **target))
    uuids = {p.number: f"{p.number:08d}-aaaa-4bbb-8ccc-{p.number:012d}" for p in draft.partitions
             if p.filesystem is not None or p.swap is not None}
    for part in draft.partitions:
        if part.filesystem is not None and part.filesystem.fstype == "vfat":
            uuids[part.number] = f"{part.number:04d}-ABCD"
        if part.filesystem is not None and part.filesystem.keep_uuid and part.filesystem.uuid:
            uuids[part.number] = part.filesystem.uuid
    return draft.with_uuids(uuids)
