"""grub2's grub.cfg as grub-mkconfig writes it, and grub's $variable expansion."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.source.model import BootEntry, kver_from_kernel_path


def expand_grub_vars(args: Sequence[str], env: Mapping[str, str]) -> tuple[str, ...]:
    """Expand $var / ${var} as grub does: from `env`, an unset variable is empty."""

    def expand(word: str) -> str:
        return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), word)

    out: list[str] = []
    for arg in args:
        out.extend(expand(arg).split())
    return tuple(out)


@dataclass(frozen=True)
class Grub2Config:
    entries: tuple[BootEntry, ...]
    top_level: tuple[int, ...]  # index into entries of each top-level item (a submenu: its first entry)
    defaults: tuple[str, ...]  # every 'set default=' value, in order
    uses_blscfg: bool
    blscfg_at: int | None  # where blscfg inserts the BLS entries: (index into entries)
    blscfg_top: int | None  # ... and into top_level
    stub: bool  # an EFI stub that only loads another grub.cfg ('configfile')


_MENU_TITLE = re.compile(r"""^(menuentry|submenu)\s+(?:'([^']*)'|"([^"]*)"|(\S+))(.*)$""")


_MENU_ID = re.compile(r"""\$menuentry_id_option\s+(?:'([^']*)'|"([^"]*)"|(\S+))""")


def parse_grub2_cfg(text: str, source: str) -> tuple[Grub2Config, list[str]]:
    """grub.cfg as grub-mkconfig writes it: menuentry/submenu blocks with linux/initrd lines.

    Entries inside a submenu are listed too, titled "Submenu>Entry". `top_level`
    maps grub's numeric default (which counts a submenu as one item) to entries.
    """
    reader = _Grub2Reader(source)
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            reader.line(number, stripped)
    return reader.finish()


class _Grub2Reader:
    """The state of one pass over grub.cfg: open blocks, entries so far, blscfg's place."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.entries: list[BootEntry] = []
        self.top_level: list[int] = []
        self.defaults: list[str] = []
        self.problems: list[str] = []
        # open blocks: (kind, title, data); kind is menuentry, submenu or block (function ... {)
        self.stack: list[tuple[str, str, dict[str, Any]]] = []
        self.awaiting_top = False  # a top-level item is open and has no entry yet
        self.uses_blscfg = False
        self.blscfg_at: int | None = None
        self.blscfg_top: int | None = None
        self.has_configfile = False

    def line(self, number: int, stripped: str) -> None:
        match = _MENU_TITLE.match(stripped)
        if match:
            self._open_menu(number, stripped, match)
        elif stripped.startswith("}"):
            if not self.stack:
                self.problems.append(f"line {number}: unbalanced '}}'")
            else:
                self._close_block()
        elif stripped.endswith("{"):
            self.stack.append(("block", "", {}))
        else:
            self._command(stripped)

    def _open_menu(self, number: int, stripped: str, match: re.Match[str]) -> None:
        kind = match.group(1)
        title = next(g for g in match.group(2, 3, 4) if g is not None)
        ident = _MENU_ID.search(match.group(5))
        ident_value = next((g for g in ident.groups() if g is not None), None) if ident else None
        if not any(k != "block" for k, _, _ in self.stack):
            if self.awaiting_top:
                self.top_level.append(-1)  # an empty submenu still counts
            self.awaiting_top = True
        self.stack.append((kind, title, {"id": ident_value}))
        if not stripped.endswith("{"):
            self.problems.append(f"line {number}: {kind} without an opening brace on the line")

    def _close_block(self) -> None:
        kind, title, data = self.stack.pop()
        if kind != "menuentry":
            return
        path = ">".join([t for k, t, _ in self.stack if k == "submenu"] + [title])
        self.entries.append(
            BootEntry(
                title=path,
                id=data.get("id"),
                kernel=data.get("kernel"),
                kernel_version=kver_from_kernel_path(data.get("kernel")),
                initrd=data.get("initrd"),
                args=tuple(data.get("args", ())),
                grub_root=data.get("root"),
                source=self.source,
            )
        )
        if self.awaiting_top:
            self.top_level.append(len(self.entries) - 1)
            self.awaiting_top = False

    def _command(self, stripped: str) -> None:
        words = stripped.split()
        command = words[0]
        if command == "blscfg":
            self.uses_blscfg = True
            if self.blscfg_at is None:
                self.blscfg_at, self.blscfg_top = len(self.entries), len(self.top_level)
        elif command == "configfile":
            self.has_configfile = True
        elif command == "set" and len(words) > 1 and words[1].startswith("default="):
            self.defaults.append(stripped.split("=", 1)[1].strip().strip("'\""))
        entry = next((d for k, _, d in reversed(self.stack) if k == "menuentry"), None)
        if entry is None:
            return
        if command in ("linux", "linux16", "linuxefi", "kernel") and len(words) > 1:
            entry["kernel"] = words[1]
            entry["args"] = words[2:]
        elif command in ("initrd", "initrd16", "initrdefi") and len(words) > 1:
            entry["initrd"] = words[1]
        elif command == "set" and len(words) > 1 and words[1].startswith("root="):
            entry["root"] = words[1].split("=", 1)[1].strip("'\"")

    def finish(self) -> tuple[Grub2Config, list[str]]:
        if self.stack:
            self.problems.append("unbalanced braces: a block is never closed")
            while self.stack:  # keep what the unclosed entries say
                self._close_block()
        if self.awaiting_top:
            self.top_level.append(-1)
        stub = self.has_configfile and not self.entries and not self.uses_blscfg
        return (
            Grub2Config(
                entries=tuple(self.entries),
                top_level=tuple(self.top_level),
                defaults=tuple(self.defaults),
                uses_blscfg=self.uses_blscfg,
                blscfg_at=self.blscfg_at,
                blscfg_top=self.blscfg_top,
                stub=stub,
            ),
            self.problems,
        )


# ---------------------------------------------------------------- rewriting


def rewrite_efi_stub(text: str, uuids: Mapping[str, str], boot_moved: bool) -> str:
    """An EFI stub grub.cfg that finds /boot by filesystem UUID: the old UUIDs replaced by the new,
    and `($dev)/grub2` under /boot when /boot became part of /."""
    for old, new in uuids.items():
        text = re.sub(re.escape(old), new, text, flags=re.IGNORECASE)
    if boot_moved:
        text = re.sub(r"\(\$dev\)/grub2?\b", lambda m: m.group(0).replace(")/", ")/boot/"), text)
    return text
