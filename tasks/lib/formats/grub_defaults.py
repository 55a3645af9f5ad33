"""/etc/default/grub: the shell variables grub-mkconfig reads (a shell variable file)."""

from __future__ import annotations

from tasks.lib.formats.lines import load as load
from tasks.lib.formats.lines import render as render
from tasks.lib.formats.shellvars import parse_shell_vars, set_shell_var


def parse_grub_defaults(text: str) -> dict[str, str]:
    return parse_shell_vars(text)[0]


def mkconfig_args(text: str) -> tuple[str, ...]:
    """The arguments grub-mkconfig's 10_linux adds after root= and ro to the normal entries."""
    values = parse_grub_defaults(text)
    return (*values.get("GRUB_CMDLINE_LINUX", "").split(), *values.get("GRUB_CMDLINE_LINUX_DEFAULT", "").split())


def set_grub_default(text: str, name: str, value: str) -> str:
    """`name` set to `value` in double quotes, as distributions write it (see set_shell_var)."""
    return set_shell_var(text, name, value)
