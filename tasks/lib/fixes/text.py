"""Small line-level text edits that keep everything they do not touch.

They live with their format now (tasks/lib/formats/shellvars.py, lines.py);
this module keeps the old import path.
"""

from __future__ import annotations

from tasks.lib.formats.lines import with_newline
from tasks.lib.formats.shellvars import remove_shell_var, set_shell_var, shell_quote

__all__ = ["remove_shell_var", "set_shell_var", "shell_quote", "with_newline"]
