"""Boot Loader Specification entries (/boot/loader/entries/*.conf)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.lines import with_newline
from tasks.lib.source.model import BootEntry, kver_from_kernel_path


def parse_bls_entry(text: str) -> dict[str, list[str]]:
    """A Boot Loader Specification entry: 'key value' lines; keys may repeat (initrd)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, _, value = stripped.partition(" ")
        values.setdefault(key, []).append(value.strip())
    return values


def bls_entry(text: str, source: str) -> BootEntry:
    values = parse_bls_entry(text)
    stem = source.rsplit("/", 1)[-1].removesuffix(".conf")
    kernel = values.get("linux", [None])[0]
    initrds = [word for value in values.get("initrd", []) for word in value.split() if not word.startswith("$")]
    args = [word for value in values.get("options", []) for word in value.split()]
    version = values.get("version", [None])[0] or kver_from_kernel_path(kernel)
    return BootEntry(
        title=values.get("title", [stem])[0],
        id=stem,
        kernel=kernel,
        kernel_version=version,
        initrd=initrds[0] if initrds else None,
        args=tuple(args),
        grub_root=None,
        source=source,
    )


# ---------------------------------------------------------------- rewriting


def edit_bls_entry(text: str, options: Callable[[list[str]], Sequence[str]],
                   path: Callable[[str], str] | None = None) -> str:
    """The entry with every `options` line's words mapped by `options`, and, given `path`, every word of
    the `linux` and `initrd` lines; indentation kept, and the text unchanged when nothing changes."""
    out: list[str] = []
    for line in text.splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "options":
            line = f"{indent}options {' '.join(options(rest.split()))}"
        elif keyword in ("linux", "initrd") and path is not None:
            line = f"{indent}{keyword} " + " ".join(path(w) for w in rest.split())
        out.append(line)
    new = with_newline(out)
    return text if new.rstrip("\n") == text.rstrip("\n") else new
