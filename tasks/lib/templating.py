"""The one way p2v renders text files from jinja2 templates.

StrictUndefined: a value the template names and the caller did not give is an error, not an
empty string (a rendered file never silently loses a field). Autoescape is off: the outputs are
config files, scripts and Markdown, not HTML; a template escapes what its format needs through a
filter of its own. Block tags on lines of their own leave no blank line behind (trim_blocks,
lstrip_blocks), and a template's last newline is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2


def environment(directory: Path, filters: dict[str, Callable[..., Any]] | None = None) -> jinja2.Environment:
    env = jinja2.Environment(  # noqa: S701 - config files, shell-free scripts and Markdown, not HTML
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(filters or {})
    return env
