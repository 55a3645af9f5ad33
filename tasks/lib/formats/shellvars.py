"""Shell variable files (KEY=value): os-release, ifcfg, /etc/default/grub, dracut.conf, ..."""

from __future__ import annotations

import re
import shlex

from tasks.lib.formats.lines import TextLines, load, render, with_newline

__all__ = ["TextLines", "load", "parse_shell_vars", "remove_shell_var", "render", "set_shell_var", "shell_quote",
           "with_newline"]

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


# ---------------------------------------------------------------- rewriting


def _assignment(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*(?:export\s+)?{re.escape(name)}\+?=")


def shell_quote(value: str) -> str:
    """Double quotes, as distributions write /etc/default/grub and ifcfg values."""
    escaped = re.sub(r'(["\\$`])', r"\\\1", value)
    return f'"{escaped}"'


def set_shell_var(text: str, name: str, value: str) -> str:
    """`name` set to `value`: the first assignment replaced, later ones dropped, or appended.

    A variable that already has the value is left exactly as written.
    """
    if parse_shell_vars(text)[0].get(name) == value:
        return text
    pattern = _assignment(name)
    out: list[str] = []
    done = False
    for line in text.splitlines():
        if pattern.match(line):
            if not done:
                out.append(f"{name}={shell_quote(value)}")
                done = True
            continue
        out.append(line)
    if not done:
        out.append(f"{name}={shell_quote(value)}")
    return with_newline(out)


def remove_shell_var(text: str, name: str) -> str:
    pattern = _assignment(name)
    lines = text.splitlines()
    kept = [line for line in lines if not pattern.match(line)]
    return text if len(kept) == len(lines) else with_newline(kept)
