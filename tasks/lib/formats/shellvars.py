"""Shell variable files (KEY=value): os-release, ifcfg, /etc/default/grub, dracut.conf, ..."""

from __future__ import annotations

import re
import shlex

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(\+?)=(.*)$")


def parse_shell_vars(text: str) -> tuple[dict[str, str], list[str]]:
    """KEY=value lines as the shell would read them (os-release, ifcfg, /etc/default/grub).

    Returns the values (the last assignment wins, `+=` appends as in bash) and
    the problems found. Command substitutions are kept as text, never run.
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGNMENT.match(line)
        if not match:
            problems.append(f"line {number}: not a KEY=value line: {stripped[:80]!r}")
            continue
        key, append, raw = match.groups()
        try:
            words = shlex.split(raw, comments=True, posix=True)
        except ValueError as exc:
            problems.append(f"line {number}: {key}: {exc}")
            words = [raw.strip().strip("\"'")]
        value = " ".join(words)
        values[key] = values.get(key, "") + value if append else value
    return values, problems
