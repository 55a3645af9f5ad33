"""grub legacy's grub.conf / menu.lst."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
