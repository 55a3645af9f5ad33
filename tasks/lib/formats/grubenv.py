"""grubenv, grub's saved environment block (saved_entry and friends)."""

from __future__ import annotations


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
