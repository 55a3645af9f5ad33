"""grubenv, grub's saved environment block (saved_entry and friends)."""

from __future__ import annotations

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render


def parse_grubenv(text: str) -> dict[str, str]:
    """grubenv: 'key=value' lines, '#' comments and the '#' padding block."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


# ---------------------------------------------------------------- rewriting


class GrubenvFull(Exception):
    """The new values do not fit the fixed-size block grub rewrites in place."""

    def __init__(self, needed: int, size: int):
        super().__init__(f"{needed} bytes needed, {size} available")
        self.needed = needed
        self.size = size


def set_grubenv_value(text: str, key: str, value: str) -> str:
    """grubenv with the `key=` line set to `value` and the '#' padding adjusted to keep its size.

    grubenv is a fixed-size block (1024 bytes) that grub itself rewrites in
    place: the new text must keep that size exactly (GrubenvFull when it cannot).
    """
    size = len(text.encode())
    body = text.rstrip("#")  # the padding: every '#' after the last newline
    lines = [f"{key}={value}" if line.startswith(f"{key}=") else line for line in body.split("\n")]
    new = "\n".join(lines)
    if len(new.encode()) > size:
        raise GrubenvFull(len(new.encode()), size)
    return new + "#" * (size - len(new.encode()))
