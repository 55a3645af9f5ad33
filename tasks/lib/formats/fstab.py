"""fstab: parse it, and decide for each entry what inspection does with it.

Pure functions: the text in, entries out; and the field rewriter the fix
step uses (`rewrite_fields`). Resolving an entry's source to a
device needs the discovered devices and lives in tasks/inspect.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render

# Filesystems that hold no data of the server's own: pseudo, memory and
# network filesystems. Their mount points are recreated empty, never copied.
PSEUDO_FS = frozenset({
    "proc", "sysfs", "devpts", "tmpfs", "devtmpfs", "securityfs", "cgroup", "cgroup2", "pstore",
    "debugfs", "tracefs", "configfs", "hugetlbfs", "mqueue", "binfmt_misc", "efivarfs", "usbfs", "rpc_pipefs",
    "autofs", "fusectl", "bpf", "none",
})
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smbfs", "glusterfs", "ceph", "9p", "fuse.sshfs", "davfs", "afs"})
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "jfs", "reiserfs", "auto"})


@dataclass(frozen=True)
class FstabEntry:
    spec: str  # fs_spec as written: UUID=..., LABEL=..., /dev/...
    file: str  # mount point, or "none"/"swap" for swap
    vfstype: str
    options: tuple[str, ...]
    freq: int
    passno: int
    line: int  # 1-based line number, for messages

    @property
    def is_swap(self) -> bool:
        return self.vfstype == "swap"

    @property
    def is_bind(self) -> bool:
        return "bind" in self.options or "rbind" in self.options

    @property
    def nofail(self) -> bool:
        return "nofail" in self.options

    @property
    def noauto(self) -> bool:
        return "noauto" in self.options

    def to_json(self) -> dict[str, object]:
        return {
            "spec": self.spec, "file": self.file, "vfstype": self.vfstype, "options": list(self.options),
            "freq": self.freq, "passno": self.passno, "line": self.line,
        }


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """fstab escapes spaces and tabs in paths as \\040 and \\011."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_fstab(text: str) -> tuple[list[FstabEntry], list[str]]:
    """Return the entries and a warning for every line that is not one."""
    entries: list[FstabEntry] = []
    warnings: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        fields = line.split()
        if len(fields) < 3:
            warnings.append(f"fstab line {number}: too few fields, ignored: {raw.strip()!r}")
            continue
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ("defaults",)
        try:
            freq = int(fields[4]) if len(fields) > 4 else 0
            passno = int(fields[5]) if len(fields) > 5 else 0
        except ValueError:
            warnings.append(f"fstab line {number}: dump/pass are not numbers, taken as 0: {raw.strip()!r}")
            freq = passno = 0
        entries.append(FstabEntry(
            spec=unescape(fields[0]), file=unescape(fields[1]), vfstype=fields[2], options=options,
            freq=freq, passno=passno, line=number,
        ))
    return entries, warnings


def skip_reason(entry: FstabEntry) -> str | None:
    """Why inspection does not mount this entry from a source disk, or None."""
    if entry.vfstype in NETWORK_FS or ":" in entry.spec.split("=", 1)[0] or entry.spec.startswith("//"):
        return "network filesystem"
    if entry.is_bind:
        return "bind mount"
    if entry.vfstype in PSEUDO_FS:
        return "pseudo filesystem"
    if entry.is_swap:
        return None
    if entry.noauto:
        return "noauto"
    if entry.vfstype in ("iso9660", "udf") or entry.spec.startswith("/dev/cdrom") or entry.spec.startswith("/dev/sr"):
        return "removable media"
    if entry.vfstype.startswith("fuse"):
        return "FUSE filesystem"
    return None


def mount_order(mountpoints: list[str]) -> list[str]:
    """Parents before children: `/` before `/var` before `/var/log`."""
    def depth(path: str) -> tuple[int, str]:
        parts = [p for p in path.split("/") if p]
        return (len(parts), path)

    return sorted(set(mountpoints), key=depth)


def source_kind(spec: str) -> tuple[str, str]:
    """Classify fs_spec: ('uuid', value), ('label', value), ('partuuid', …), ('path', /dev/…)."""
    prefixes = (("UUID=", "uuid"), ("LABEL=", "label"), ("PARTUUID=", "partuuid"), ("PARTLABEL=", "partlabel"))
    for prefix, kind in prefixes:
        if spec.startswith(prefix):
            return kind, spec[len(prefix):].strip('"')
    return "path", spec


# ---------------------------------------------------------------- rewriting


_DEFAULT_FIELDS = ("", "", "auto", "defaults", "0", "0")


def rewrite_fields(line: str, values: dict[int, str]) -> str:
    """Replace fields by index (0 = spec), keeping the original spacing where the new value fits."""
    indent = line[: len(line) - len(line.lstrip())]
    parts = re.findall(r"(\S+)(\s*)", line.strip())
    fields = [field for field, _ in parts]
    gaps = [gap for _, gap in parts]
    while len(fields) < max(values) + 1:
        fields.append(_DEFAULT_FIELDS[len(fields)])
        gaps.append("")
    out = indent
    for index, (old, gap) in enumerate(zip(fields, gaps, strict=True)):
        new = values.get(index, old)
        if index == len(fields) - 1:
            gap = ""
        elif new != old and len(gap) > 1 and "\t" not in gap:  # aligned columns stay aligned
            gap = " " * max(1, len(old) + len(gap) - len(new))
        else:
            gap = gap or " "
        out += new + gap
    return out
