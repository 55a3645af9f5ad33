"""Carrying out one FileEdit on the mounted target tree, never outside it."""

from __future__ import annotations

from pathlib import Path

from tasks.lib.fixes.model import FileEdit
from tasks.lib.paths import remove_in_root, write_text_in_root


def apply_edit(root: Path, edit: FileEdit) -> None:
    """Write (atomically, keeping mode, owner and xattrs) or delete `edit.path` inside `root`."""
    if edit.text is None:
        remove_in_root(root, edit.path)
    else:
        write_text_in_root(root, edit.path, edit.text, mode=edit.mode)
