"""Small line-level text edits that keep everything they do not touch."""

from __future__ import annotations

import re

from tasks.lib.formats.shellvars import parse_shell_vars


def _assignment(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*(?:export\s+)?{re.escape(name)}\+?=")


def shell_quote(value: str) -> str:
    """Double quotes, as distributions write /etc/default/grub and ifcfg values."""
    escaped = re.sub(r'(["\\$`])', r"\\\1", value)
    return f'"{escaped}"'


def with_newline(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


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
