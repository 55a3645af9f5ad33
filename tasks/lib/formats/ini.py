"""ini-style files ([Section], key=value): NetworkManager keyfiles and systemd-networkd."""

from __future__ import annotations


def parse_ini(text: str, *, comments: str = "#;") -> tuple[list[tuple[str, list[tuple[str, str]]]], list[str]]:
    """'[Section]' and 'key=value' lines -> [(section, [(key, value), ...]), ...] in file order.

    A section that appears twice (systemd's [Route], [Address]) stays two
    sections; keys may repeat inside one.
    """
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    problems: list[str] = []
    current: list[tuple[str, str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in comments:
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]"):
                problems.append(f"line {number}: bad section header {stripped[:80]!r}")
                current = None
                continue
            current = []
            sections.append((stripped[1:-1].strip(), current))
            continue
        key, sep, value = stripped.partition("=")
        if not sep:
            problems.append(f"line {number}: not key=value: {stripped[:80]!r}")
            continue
        if current is None:
            problems.append(f"line {number}: key outside a section: {stripped[:80]!r}")
            continue
        current.append((key.strip(), value.strip()))
    return sections, problems
