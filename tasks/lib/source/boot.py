"""The bootloader of a tree (grub2, grub legacy, extlinux; BIOS or UEFI) and what the boot sector says."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from tasks.lib.formats.bls import bls_entry
from tasks.lib.formats.grub2 import Grub2Config, parse_grub2_cfg
from tasks.lib.formats.grub_legacy import parse_grub_legacy
from tasks.lib.formats.grubenv import parse_grubenv
from tasks.lib.formats.netfields import parse_bool
from tasks.lib.formats.shellvars import parse_shell_vars
from tasks.lib.source.kernels import version_key
from tasks.lib.source.model import BootEntry, Bootloader, BootloaderKind, Firmware, Link
from tasks.lib.source.tree import SourceTree


def resolve_default(default: str | None, entries: Sequence[BootEntry], top_level: Sequence[int]) -> int | None:
    """Which entry a grub default ('0', a title, an id, 'Submenu>Entry') selects."""
    if default is None:
        return 0 if entries else None
    value = default.strip()
    if value == "":
        return 0 if entries else None
    if value.isdigit():
        number = int(value)
        if number < len(top_level) and top_level[number] >= 0:
            return top_level[number]
        return None
    for index, entry in enumerate(entries):
        if value in (entry.title, entry.id):
            return index
    last = value.rsplit(">", 1)[-1]
    for index, entry in enumerate(entries):
        if last in (entry.title.rsplit(">", 1)[-1], entry.id):
            return index
    return None


_EFI_LOADERS = re.compile(r"^(grub.*|shim.*|boot(x64|ia32|aa64)|elilo)\.efi$", re.IGNORECASE)


def describe_bootloader(tree: SourceTree, mountpoints: Sequence[str]) -> Bootloader:
    """grub2, grub legacy or extlinux; `mountpoints` are the fstab's (for the ESP)."""
    efi_binaries, efi_configs = _efi_files(tree)
    esp_mountpoint = next((m for m in mountpoints if m.rstrip("/") in ("/boot/efi", "/efi")), None)
    firmware: Firmware = "uefi" if efi_binaries or esp_mountpoint else "bios"

    # grub2 configurations: parse all, pick the one grub reads.
    grub2 = _grub2_configs(tree, efi_configs)
    real = [p for p, c in grub2.items() if not c.stub]
    efi_real = [p for p in real if p.startswith("/boot/efi/")]
    grub2_main = (efi_real[0] if firmware == "uefi" and efi_real else None) or next(iter(real), None)

    legacy_path = tree.first_file(
        ["/boot/grub/grub.conf", "/boot/grub/menu.lst", *(p for p in efi_configs if p.endswith(".conf"))]
    )
    if legacy_path and firmware == "uefi":
        efi_legacy = [p for p in efi_configs if p.endswith(".conf")]
        legacy_path = efi_legacy[0] if efi_legacy else legacy_path

    defaults_file, defaults = _grub_defaults(tree)
    grubenv_file, grubenv = _grubenv(tree, efi_configs)
    kernel_cmdline_text = tree.read_text("/etc/kernel/cmdline")
    kernel_cmdline = tuple(kernel_cmdline_text.split()) if kernel_cmdline_text is not None else None

    if grub2_main is not None:
        if legacy_path:
            tree.warn(f"both grub2 ({grub2_main}) and grub legacy ({legacy_path}) configs: using grub2")
        menu = _grub2_menu(tree, grub2_main, grub2[grub2_main], defaults, grubenv)
    elif legacy_path is not None:
        menu = _legacy_menu(tree, legacy_path)
    elif tree.first_file(_EXTLINUX_CONFIGS):
        config = tree.first_file(_EXTLINUX_CONFIGS)
        tree.warn(f"bootloader extlinux ({config}) is not supported: entries not read")
        menu = _Menu(kind="extlinux", config=config)
    else:
        tree.warn("no bootloader configuration found (grub.cfg, grub.conf, menu.lst)")
        menu = _Menu()

    config = menu.config
    configs = sorted({*grub2, *([legacy_path] if legacy_path else []), *efi_configs, *([config] if config else [])})
    return Bootloader(
        kind=menu.kind,
        firmware=firmware,
        config_path=config,
        configs=tuple(configs),
        efi_binaries=tuple(sorted(efi_binaries)),
        esp_mountpoint=esp_mountpoint,
        bls=menu.bls,
        entries=menu.entries,
        default=menu.default,
        default_index=menu.default_index,
        defaults_file=defaults_file,
        defaults=dict(sorted(defaults.items())),
        cmdline_linux=tuple(defaults.get("GRUB_CMDLINE_LINUX", "").split()),
        cmdline_linux_default=tuple(defaults.get("GRUB_CMDLINE_LINUX_DEFAULT", "").split()),
        kernel_cmdline=kernel_cmdline,
        grubenv_file=grubenv_file,
        grubenv=dict(sorted(grubenv.items())),
        links=_links(tree),
    )


_EXTLINUX_CONFIGS = ("/boot/extlinux/extlinux.conf", "/boot/extlinux.conf", "/boot/syslinux/syslinux.cfg")


@dataclass(frozen=True)
class _Menu:
    """The boot menu the bootloader's configuration holds."""

    kind: BootloaderKind = "unknown"
    config: str | None = None
    entries: tuple[BootEntry, ...] = ()
    default: str | None = None
    default_index: int | None = None
    bls: bool = False


def _efi_files(tree: SourceTree) -> tuple[list[str], list[str]]:
    """The EFI loaders and the grub configurations under /boot/efi/EFI/<vendor>/."""
    efi_binaries: list[str] = []
    efi_configs: list[str] = []
    for vendor in tree.listdir("/boot/efi/EFI"):
        directory = f"/boot/efi/EFI/{vendor}"
        for name in tree.listdir(directory):
            if _EFI_LOADERS.match(name) and tree.is_file(f"{directory}/{name}"):
                efi_binaries.append(f"{directory}/{name}")
            if name in ("grub.cfg", "grub.conf") and tree.is_file(f"{directory}/{name}"):
                efi_configs.append(f"{directory}/{name}")
    return efi_binaries, efi_configs


def _grub2_configs(tree: SourceTree, efi_configs: Sequence[str]) -> dict[str, Grub2Config]:
    grub2: dict[str, Grub2Config] = {}
    bios_paths = ("/boot/grub2/grub.cfg", "/boot/grub/grub.cfg")
    for path in (*bios_paths, *(p for p in efi_configs if p.endswith(".cfg"))):
        text = tree.read_text(path)
        if text is None:
            continue
        parsed, problems = parse_grub2_cfg(text, path)
        for problem in problems:
            tree.warn(f"{path}: {problem}")
        grub2[path] = parsed
    return grub2


def _grub_defaults(tree: SourceTree) -> tuple[str | None, dict[str, str]]:
    """/etc/default/grub, when there is one, and its GRUB_* values."""
    defaults_file = "/etc/default/grub" if tree.is_file("/etc/default/grub") else None
    defaults: dict[str, str] = {}
    if defaults_file:
        values, problems = parse_shell_vars(tree.read_text(defaults_file) or "")
        for problem in problems:
            tree.warn(f"{defaults_file}: {problem}")
        defaults = {k: v for k, v in values.items() if k.startswith("GRUB_")}
    return defaults_file, defaults


def _grubenv(tree: SourceTree, efi_configs: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    grubenv_file = next(
        (
            p
            for p in (
                "/boot/grub2/grubenv",
                "/boot/grub/grubenv",
                *(c.rsplit("/", 1)[0] + "/grubenv" for c in efi_configs),
            )
            if tree.is_file(p)
        ),
        None,
    )
    grubenv = parse_grubenv(tree.read_text(grubenv_file) or "") if grubenv_file else {}
    return grubenv_file, grubenv


def _grub2_menu(tree: SourceTree, config: str, parsed: Grub2Config, defaults: Mapping[str, str],
                grubenv: Mapping[str, str]) -> _Menu:
    entries, top_level = parsed.entries, parsed.top_level
    bls = parsed.uses_blscfg or parse_bool(defaults.get("GRUB_ENABLE_BLSCFG")) is True
    if bls:
        bls_entries = [bls_entry(tree.read_text(p) or "", p) for p in tree.files("/boot/loader/entries", "*.conf")]
        # grub2's blscfg lists the newest version first, where the blscfg command is.
        bls_entries.sort(key=lambda e: version_key(e.kernel_version or e.id or ""), reverse=True)
        at = parsed.blscfg_at if parsed.blscfg_at is not None else len(entries)
        top = parsed.blscfg_top if parsed.blscfg_top is not None else len(top_level)
        count = len(bls_entries)
        entries = (*entries[:at], *bls_entries, *entries[at:])
        top_level = (
            *top_level[:top],
            *range(at, at + count),
            *(i + count if i >= at else i for i in top_level[top:]),
        )
    candidates = [d for d in parsed.defaults if "next_entry" not in d]
    default = candidates[-1] if candidates else None
    if default in ("${saved_entry}", "$saved_entry"):
        default = grubenv.get("saved_entry") or None
    return _Menu(kind="grub2", config=config, entries=entries, default=default,
                 default_index=resolve_default(default, entries, top_level), bls=bls)


def _legacy_menu(tree: SourceTree, legacy_path: str) -> _Menu:
    legacy, problems = parse_grub_legacy(tree.read_text(legacy_path) or "", legacy_path)
    for problem in problems:
        tree.warn(f"{legacy_path}: {problem}")
    entries, default = legacy.entries, legacy.default
    default_index = resolve_default(default, entries, range(len(entries))) if default != "saved" else None
    return _Menu(kind="grub-legacy", config=legacy_path, entries=entries, default=default,
                 default_index=default_index)


def _links(tree: SourceTree) -> tuple[Link, ...]:
    """The distribution's links to the real configuration files (/etc/grub.conf, ...), resolved in the tree."""
    links = []
    for path in (
        "/etc/grub.conf",
        "/boot/grub/menu.lst",
        "/boot/grub/grub.conf",
        "/etc/grub2.cfg",
        "/etc/grub2-efi.cfg",
        "/etc/sysconfig/grub",
        "/boot/grub2/grubenv",
    ):
        if tree.is_symlink(path):
            target = tree.resolve(path)
            if target is not None:
                links.append(Link(path, target))
            else:
                tree.warn(f"{path}: dangling symbolic link")
    return tuple(links)


def guess_boot_sector(data: bytes) -> Literal["grub", "lilo"] | None:
    """What the first sectors of a disk say (ReaR's guess: 'GRUB' or 'LILO' in the first 2 KiB)."""
    head = data[:2048]
    if b"GRUB" in head:
        return "grub"
    if b"LILO" in head:
        return "lilo"
    return None


def combine_bootloader(tree_guess: Bootloader, sector: Literal["grub", "lilo"] | None) -> tuple[str, list[str]]:
    """Combine the tree's bootloader with the disk's boot sector guess: (kind, warnings).

    The boot sector cannot tell grub legacy from grub2 (both stage 1 images say
    "GRUB"); the tree can. The boot sector tells whether the disk really boots
    with it.
    """
    warnings: list[str] = []
    if sector == "lilo":
        warnings.append("the disk boots with LILO, which p2v does not convert; grub will be installed instead")
        return "lilo", warnings
    if sector == "grub":
        if tree_guess.kind == "unknown":
            warnings.append("the disk has GRUB boot code but the tree has no grub configuration")
        return tree_guess.kind, warnings
    if tree_guess.firmware == "bios":
        warnings.append(
            "no GRUB boot code in the first 2 KiB of the disk: the server may boot from another disk "
            "or from a partition boot record"
        )
    return tree_guess.kind, warnings
