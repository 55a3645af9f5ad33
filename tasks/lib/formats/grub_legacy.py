"""grub legacy's grub.conf / menu.lst."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.lines import with_newline
from tasks.lib.source.model import BootEntry, kver_from_kernel_path


@dataclass(frozen=True)
class GrubLegacyConfig:
    default: str | None
    entries: tuple[BootEntry, ...]


def parse_grub_legacy(text: str, source: str) -> tuple[GrubLegacyConfig, list[str]]:
    """grub.conf / menu.lst: global 'default=0', then 'title' stanzas."""
    default: str | None = None
    entries: list[BootEntry] = []
    problems: list[str] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            entries.append(
                BootEntry(
                    title=current["title"],
                    id=None,
                    kernel=current.get("kernel"),
                    kernel_version=kver_from_kernel_path(current.get("kernel")),
                    initrd=current.get("initrd"),
                    args=tuple(current.get("args", ())),
                    grub_root=current.get("root"),
                    source=source,
                )
            )

    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^([A-Za-z_]+)\s*(?:=\s*|\s+|$)(.*)$", stripped)
        if not match:
            problems.append(f"line {number}: cannot parse: {stripped[:80]!r}")
            continue
        keyword, rest = match.group(1).lower(), match.group(2).strip()
        if keyword == "title":
            close()
            current = {"title": rest}
        elif current is None:
            if keyword == "default":
                default = rest
        elif keyword == "kernel":
            words = rest.split()
            # 'kernel --type=netbsd /path' options come before the path
            while words and words[0].startswith("--"):
                words.pop(0)
            if words:
                current["kernel"] = words[0]
                current["args"] = words[1:]
        elif keyword == "initrd":
            if rest:
                current["initrd"] = rest.split()[0]
        elif keyword in ("root", "rootnoverify"):
            current["root"] = rest
    close()
    return GrubLegacyConfig(default=default, entries=tuple(entries)), problems


# ---------------------------------------------------------------- rewriting


def edit_grub_legacy(text: str, *, serial: str, terminal: str, partition: int,
                     kernel_args: Callable[[list[str]], Sequence[str]], boot_path: Callable[[str], str]) -> str:
    """grub.conf with the global `serial` and `terminal` lines (added before the first title when
    missing), the splash image commented out, every `root (hdX,Y)` on `partition` of the first disk,
    and each kernel's arguments and kernel/initrd paths mapped; the text unchanged when nothing changes."""
    lines = text.splitlines()
    out: list[str] = []
    first_title = next((i for i, line in enumerate(lines) if re.match(r"^\s*title\b", line)), len(lines))
    has_serial = any(re.match(r"^\s*serial\b", line) for line in lines[:first_title])
    has_terminal = any(re.match(r"^\s*terminal\b", line) for line in lines[:first_title])
    for index, line in enumerate(lines):
        indent = line[: len(line) - len(line.lstrip())]
        words = line.split()
        keyword = words[0] if words else ""
        if index == first_title:
            if not has_serial:
                out.append(serial)
            if not has_terminal:
                out.append(terminal)
        if index < first_title and keyword == "serial":
            line = serial
        elif index < first_title and keyword == "terminal":
            line = terminal
        elif keyword.startswith("splashimage"):
            # grub legacy shows its menu either as a splash image or on the
            # serial line; the serial line is what OpenStack's console log shows.
            line = f"#{line.lstrip()}"
        elif keyword == "root" and len(words) > 1 and words[1].startswith("(hd"):
            line = f"{indent}root (hd0,{partition})"
        elif keyword == "kernel" and len(words) > 1:
            head = [keyword]
            rest = words[1:]
            while rest and rest[0].startswith("--"):
                head.append(rest.pop(0))
            if rest:
                head.append(boot_path(rest.pop(0)))
            line = indent + " ".join([*head, *kernel_args(rest)])
        elif keyword == "initrd" and len(words) > 1:
            line = indent + " ".join([keyword, boot_path(words[1]), *words[2:]])
        out.append(line)
    new = with_newline(out)
    return text if new.rstrip("\n") == text.rstrip("\n") else new


def legacy_cmdline(text: str, kernel: str) -> tuple[str, ...]:
    """The arguments of the kernel line that boots vmlinuz-`kernel`; () when none does."""
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "kernel":
            rest = [w for w in words[1:] if not w.startswith("--")]
            if rest and rest[0].endswith(f"vmlinuz-{kernel}"):
                return tuple(rest[1:])
    return ()
